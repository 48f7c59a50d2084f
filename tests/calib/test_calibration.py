"""Statistics equal brute-force values; layer-sequential equals all-at-once; streamed equals in-memory."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import tiny_model

from kvtool.calib.collect import collect_statistics, collect_statistics_full_forward
from kvtool.calib.stats import ALL_STATS
from kvtool.models import load_model, wrap_model


def windows(n=5, length=24, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


@torch.no_grad()
def brute_force(model, ids):
    """Record raw tensors with plain hooks during one full forward pass, then form every Gram in float64."""
    arch = importlib.import_module(f"transformers.models.{model.config.model_type}.modeling_{model.config.model_type}")
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    grab: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def pre(name, i=i):
            return lambda m, a: grab.__setitem__((i, name), a[0].detach().clone())
        handles += [layer.self_attn.q_proj.register_forward_pre_hook(pre("attn_in")),
                    layer.self_attn.o_proj.register_forward_pre_hook(pre("o_in")),
                    layer.mlp.gate_proj.register_forward_pre_hook(pre("mlp_in")),
                    layer.mlp.down_proj.register_forward_pre_hook(pre("down_in"))]
    model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    pos = torch.arange(ids.shape[1])[None]
    cos, sin = model.model.rotary_emb(grab[(0, "attn_in")], pos)
    out = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = grab[(i, "attn_in")]
        b, length, _ = x.shape
        q = attn.q_proj(x).view(b, length, heads, d)
        k = attn.k_proj(x).view(b, length, kv, d)
        v = attn.v_proj(x).view(b, length, kv, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = arch.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        for name in ("attn_in", "o_in", "mlp_in", "down_in"):
            t = grab[(i, name)].reshape(-1, grab[(i, name)].shape[-1]).double()
            out[(i, name)] = t.T @ t
        per_group = heads // kv
        for name, t in (("k", k), ("v", v)):
            out[(i, name)] = torch.stack([t[:, :, g].reshape(-1, d).double().T @ t[:, :, g].reshape(-1, d).double()
                                          for g in range(kv)])
        qs = []
        for g in range(kv):
            acc = torch.zeros(d, d, dtype=torch.float64)
            for h in range(g * per_group, (g + 1) * per_group):
                qh = q[:, :, h].reshape(-1, d).double()
                acc += qh.T @ qh
            qs.append(acc)
        out[(i, "q")] = torch.stack(qs)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_statistics_equal_brute_force(arch):
    model = tiny_model(arch)
    ids = windows()
    expected = brute_force(model, ids)
    store = collect_statistics(wrap_model(model), ids, ALL_STATS, batch_size=2)
    assert store.layers() == [0, 1, 2]
    for (i, name), ref in expected.items():
        got = store.sum(i, name)
        assert got.dtype == torch.float64
        assert got.shape == ref.shape, (i, name)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
        assert store.count(i, name) == ids.numel()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_layer_sequential_equals_all_at_once(arch):
    loaded = wrap_model(tiny_model(arch, seed=3))
    ids = windows(n=6, seed=4)
    seq = collect_statistics(loaded, ids, ALL_STATS, batch_size=4)
    full = collect_statistics_full_forward(loaded, ids, ALL_STATS, batch_size=4)
    assert sorted(seq.sums) == sorted(full.sums)
    for key in full.sums:
        torch.testing.assert_close(seq.sums[key], full.sums[key], rtol=1e-10, atol=1e-10)
        assert seq.counts[key] == full.counts[key]


def test_batch_size_and_offload_do_not_change_results():
    loaded = wrap_model(tiny_model("llama", seed=5))
    ids = windows(n=5)
    a = collect_statistics(loaded, ids, "attn_in,k,mlp_in", batch_size=5)
    b = collect_statistics(loaded, ids, "attn_in,k,mlp_in", batch_size=2, offload=True)
    for key in a.sums:
        torch.testing.assert_close(a.sums[key], b.sums[key], rtol=1e-9, atol=1e-9)


def test_layer_subset_only_collects_those_layers():
    loaded = wrap_model(tiny_model("llama"))
    store = collect_statistics(loaded, windows(n=2), "attn_in", layers=[1])
    assert store.layers() == [1]
    ref = collect_statistics(loaded, windows(n=2), "attn_in")
    torch.testing.assert_close(store.sum(1, "attn_in"), ref.sum(1, "attn_in"))


def test_streamed_layers_equal_in_memory(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    ids = windows(n=3)
    in_memory = collect_statistics(load_model(str(path)), ids, "attn_in,q,k,v")
    streamed_model = load_model(str(path), lazy=True)
    assert streamed_model.model.model.layers[0].self_attn.q_proj.weight.is_meta
    streamed = collect_statistics(streamed_model, ids, "attn_in,q,k,v")
    assert streamed_model.model.model.layers[0].self_attn.q_proj.weight.is_meta  # freed again
    for key in in_memory.sums:
        torch.testing.assert_close(streamed.sums[key], in_memory.sums[key], rtol=1e-10, atol=1e-10)


def test_tensor_core_grams_stay_within_their_bound_of_the_exact_float64_path():
    """bf16 activations: per-batch Gram products in float32 (exact products, float32 accumulation) summed in float64
    differ from all-float64 products by at most ~sqrt(rows) * 2^-24 relative (the transforms damp covariances by
    1e-2 * mean(diag), some 10^4 times larger)."""
    import math

    from conftest import tiny_model

    from kvtool.calib.collect import collect_statistics
    from kvtool.models import wrap_model

    model = tiny_model("llama", seed=2).to(torch.bfloat16)
    loaded = wrap_model(model)
    windows = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(3))
    exact = collect_statistics(loaded, windows, "attn_in,o_in,mlp_in", batch_size=4, exact=True)
    fast = collect_statistics(loaded, windows, "attn_in,o_in,mlp_in", batch_size=4, exact=False)
    rows = 4 * 64
    bound = 4 * math.sqrt(rows) * 2.0 ** -24
    for key, ref in exact.sums.items():
        rel = float((fast.sums[key] - ref).norm() / ref.norm())
        assert rel < bound, (key, rel, bound)
        assert rel > 0 or key[1] == "o_in"  # really a different (float32) path, not the float64 one


def test_layer_streamer_points_layers_home_again_without_copies():
    """A layer taken to the compute device points at its own home tensors again on release (the pass is
    read-only: no copy back), parameters and buffers alike; close() gives back a layer that was never acquired.
    (The compute device here is ``meta``: the swap logic is the same as for a GPU.)"""
    from conftest import tiny_model

    from kvtool.models import LayerStreamer, wrap_model

    loaded = wrap_model(tiny_model("llama", seed=4))
    layer = loaded.spec.layers(loaded.model)[1]
    before = {n: t for n, t in list(layer.named_parameters()) + list(layer.named_buffers())}
    ptrs = {n: t.data_ptr() for n, t in before.items()}
    streamer = LayerStreamer(loaded, "cpu")
    streamer.device = torch.device("meta")
    moved = streamer.acquire(1)
    assert all(p.is_meta for p in moved.parameters())
    streamer.release(1)
    after = dict(list(layer.named_parameters()) + list(layer.named_buffers()))
    assert {n: t.data_ptr() for n, t in after.items()} == ptrs
    assert all(after[n] is before[n] for n, _ in layer.named_parameters())  # the same Parameter objects
    streamer._copy_in(0)  # as a prefetch would
    assert loaded.spec.layers(loaded.model)[0].self_attn.q_proj.weight.is_meta
    streamer.close()
    assert not loaded.spec.layers(loaded.model)[0].self_attn.q_proj.weight.is_meta
