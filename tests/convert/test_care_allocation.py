"""Sensitivity-driven rank allocation: the measured α per layer, the joint K/V pool and its budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from kvtool.calib.collect import collect_statistics
from kvtool.calib.sensitivity import kv_sensitivity
from kvtool.convert.care import CareOptions, convert_layers
from kvtool.errors import KvtoolError
from kvtool.models import wrap_model


def test_kv_sensitivity_is_the_mean_squared_gradient_and_leaves_the_model_alone():
    model = tiny_model("llama", num_hidden_layers=2)
    loaded = wrap_model(model)
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    alpha = kv_sensitivity(loaded, ids, batch_size=2)
    assert len(alpha["k"]) == len(alpha["v"]) == 2 and min(alpha["k"] + alpha["v"]) > 0
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    # brute force for layer 1's v_proj: gradient of the summed next-token loss w.r.t. its output
    grabbed = {}

    def hook(module, args, out):
        grabbed["o"] = out.detach().requires_grad_(True)
        return grabbed["o"]

    handle = model.model.layers[1].self_attn.v_proj.register_forward_hook(hook)
    total = 0.0
    for batch in (ids[:2], ids[2:]):
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        (g,) = torch.autograd.grad(loss, grabbed["o"])
        total += float(g.double().pow(2).sum()) / g.shape[-1]
    handle.remove()
    assert alpha["v"][1] == pytest.approx(total / ids.numel(), rel=1e-4)


def allocate(layers: int, rank_alloc: str, sens: dict | None):
    """Convert a tiny llama at KV ratio 0.5 (uniform r_K = r_V = 16) with given sensitivities: (r_K list, r_V list,
    report), plus a callable converting without sensitivities."""
    model = tiny_model("llama", num_hidden_layers=layers)
    loaded = wrap_model(model)
    store = collect_statistics(loaded, torch.randint(0, 300, (6, 40), generator=torch.Generator().manual_seed(1)),
                               "attn_in")
    opts = CareOptions(rank_alloc=rank_alloc, kv_ratio=0.5)
    _, report = convert_layers(model.state_dict(), store, loaded.spec, opts, sensitivity=sens)
    rk = [r["r_k"] for r in report["layers"]]
    rv = [r["r_v"] for r in report["layers"]]
    return rk, rv, report, lambda: convert_layers(model.state_dict(), store, loaded.spec, opts)


def test_sensitivity_allocation_pools_k_and_v_and_keeps_the_budget():
    sens = {"k": [1.0, 1.0, 1.0, 1.0], "v": [1.0, 1.0, 1.0, 0.0]}  # layer 3's V does not matter
    rk, rv, report, without = allocate(4, "sensitivity", sens)
    assert sum(rk) + sum(rv) == 4 * 32 and report["kv_ratio"] == pytest.approx(0.5)
    assert rv[3] == min(rk + rv) == 8  # the floor (half the uniform 16)
    assert max(rk + rv) <= 32
    with pytest.raises(KvtoolError, match="sensitivities"):
        without()


def test_sensitivity_split_keeps_every_layer_at_the_uniform_width():
    """sensitivity-split moves rank between K and V inside each layer only: equal widths (one kv_lora_rank)."""
    sens = {"k": [1.0, 1.0, 1e-6], "v": [1.0, 1e-6, 1.0]}  # layer 1's V and layer 2's K hardly matter
    rk, rv, _, without = allocate(3, "sensitivity-split", sens)
    assert [k + v for k, v in zip(rk, rv, strict=True)] == [32, 32, 32]
    assert rv[1] == 8 and rk[1] == 24  # V at the floor (half the uniform 16), K takes the rest
    assert rk[2] == 8 and rv[2] == 24
    with pytest.raises(KvtoolError, match="sensitivities"):
        without()


def test_deepseek_export_refuses_allocations_with_unequal_widths():
    from kvtool.convert.deepseek_export import check_exportable

    check_exportable(None, "decoupled", "strided", "sensitivity-split")
    with pytest.raises(KvtoolError, match="one kv_lora_rank"):
        check_exportable(None, "decoupled", "strided", "sensitivity")
