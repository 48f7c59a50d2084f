"""CARE GQA->MLA: exactness at full rank, the PCA identity, allocation, formats, validation and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.calib.collect import collect_statistics
from kvtool.cli import app
from kvtool.convert.care import (
    CareOptions,
    allocate_ranks,
    convert_layers,
    damped_sqrt,
    mla_state_dict,
    spectrum,
    weighted_error,
)
from kvtool.errors import KvtoolError
from kvtool.models import wrap_model
from kvtool.runtime.mla import MLA_MODELS, mla_config

runner = CliRunner()


def ids(n=4, length=32, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def convert(model, opts, stats_ids=None):
    loaded = wrap_model(model)
    store = collect_statistics(loaded, stats_ids if stats_ids is not None else ids(6, 40, 1), "attn_in")
    layers, report = convert_layers(model.state_dict(), store, loaded.spec, opts)
    cfg = mla_config(model.config, [(r["r_k"], r["r_v"]) for r in report["layers"]], opts.rope,
                     report["rope_dim"], [r.get("rope_pairs", []) for r in report["layers"]])
    mla = MLA_MODELS[loaded.spec.model_type](cfg).eval()
    mla.load_state_dict(mla_state_dict(model.state_dict(), layers, loaded.spec, torch.float32), strict=True)
    return mla, report, store


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("method", ["care", "svd"])
def test_full_rank_keep_reproduces_original_logits(arch, method):
    model = tiny_model(arch)
    mla, report, _ = convert(model, CareOptions(method=method, kv_ratio=1.0, rope="keep"))
    assert report["kv_ratio"] == 1.0
    x = ids(2, 24, 7)
    with torch.no_grad():
        torch.testing.assert_close(mla(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_decoupled_is_exact_for_one_kv_head_with_full_rope():
    model = tiny_model("llama", num_key_value_heads=1)
    mla, report, _ = convert(model, CareOptions(kv_ratio=1.0, rope="decoupled", rope_dim=16, rope_select="uniform"))
    assert report["layers"][0]["rope_pairs"] == list(range(8))
    x = ids(2, 24, 7)
    with torch.no_grad():
        torch.testing.assert_close(mla(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_care_factor_is_pca_of_outputs_without_damping():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    c = x.T @ x / 500
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    s, s_inv = damped_sqrt(c, 0.0)
    u, sv, vh = spectrum(w, s)
    r = 3
    up = vh[:r].T  # out x r
    evals, evecs = torch.linalg.eigh(w @ c @ w.T)
    top = evecs[:, -r:]
    torch.testing.assert_close(up @ up.T, top @ top.T, rtol=1e-8, atol=1e-8)
    down = (s_inv @ (u[:, :r] * sv[:r])).T
    torch.testing.assert_close(up @ down, up @ up.T @ w, rtol=1e-8, atol=1e-8)  # Ŵ = P_r W


def test_care_has_lower_weighted_error_than_svd_at_equal_rank():
    model = tiny_model("llama")
    _, care, store = convert(model, CareOptions(method="care", kv_ratio=0.5, damping=0.0))
    _, svd, _ = convert(model, CareOptions(method="svd", kv_ratio=0.5, damping=0.0))
    for a, b in zip(care["layers"], svd["layers"], strict=True):
        assert a["err_k"] <= b["err_k"] + 1e-12 and a["err_v"] <= b["err_v"] + 1e-12
    assert care["mean_err_k"] + care["mean_err_v"] < svd["mean_err_k"] + svd["mean_err_v"]


def test_weighted_error_is_the_activation_error():
    """weighted_error(W, Ŵ, C) = E‖x(W-Ŵ)ᵀ‖² / E‖xWᵀ‖² computed from the activations themselves."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 24, dtype=torch.float64, generator=gen) * torch.linspace(0.1, 3.0, 24, dtype=torch.float64)
    w = torch.randn(10, 24, dtype=torch.float64, generator=gen)
    approx = w + 0.1 * torch.randn(10, 24, dtype=torch.float64, generator=gen)
    brute = ((x @ (w - approx).T) ** 2).sum(1).mean() / ((x @ w.T) ** 2).sum(1).mean()
    assert weighted_error(w, approx, x.T @ x / x.shape[0]) == pytest.approx(float(brute), rel=1e-10)


def test_allocation_respects_budget_floor_ceiling_and_prefers_heavy_tails():
    flat = torch.ones(16)
    steep = torch.tensor([100.0] + [1e-3] * 15)
    ranks = allocate_ranks([flat, steep], budget=16, rank_min=2, rank_max=12, rule="care")
    assert sum(ranks) == 16 and all(2 <= r <= 12 for r in ranks)
    assert ranks[0] > ranks[1]  # the flat spectrum needs the ranks, the steep one is done after one
    energy = allocate_ranks([flat * 0.01, steep], budget=6, rank_min=1, rank_max=16, rule="energy")
    assert sum(energy) == 6
    with pytest.raises(KvtoolError, match="below the floor"):
        allocate_ranks([flat, steep], budget=3, rank_min=2, rank_max=12, rule="care")
    with pytest.raises(KvtoolError, match="exceeds what"):
        allocate_ranks([flat, steep], budget=30, rank_min=2, rank_max=12, rule="care")


def test_care_allocation_keeps_total_budget_and_reports_ranks():
    model = tiny_model("llama", num_hidden_layers=4)
    _, report, _ = convert(model, CareOptions(rank_alloc="care", kv_ratio=0.5))
    rk = [r["r_k"] for r in report["layers"]]
    rv = [r["r_v"] for r in report["layers"]]
    assert sum(rk) == 4 * 16 and sum(rv) == 4 * 16
    assert min(rk + rv) >= 8 and max(rk + rv) <= 32
    assert report["kv_ratio"] == pytest.approx(0.5)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_kvtool_format_loads_with_auto_class_and_validates(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama", head_dim=32, hidden_size=128)
    res = run("calibrate", model_dir, "-o", tmp_path / "st", "--samples", 4, "--seq-len", 64, "--statistics", "attn_in",
              "--no-progress", "--device", "cpu")
    assert res.exit_code == 0, res.output
    for rope in ("keep", "decoupled"):
        out = tmp_path / f"mla-{rope}"
        res = run("convert-mla", model_dir, "--stats-dir", tmp_path / "st", "-o", out, "--kv-ratio", "0.5",
                  "--rope", rope,
                  "--rank-alloc", "care", "--device", "cpu")
        assert res.exit_code == 0, res.output
        manifest = json.loads((out / "kvtool.json").read_text())
        assert manifest["command"] == "convert-mla" and len(manifest["report"]["layers"]) == 3
        assert manifest["report"]["kv_bytes_per_token_after"] < manifest["report"]["kv_bytes_per_token_before"]
        code = ("import kvtool, torch; from transformers import AutoModelForCausalLM as A; "
                f"m = A.from_pretrained(r'{out}'); print(type(m).__name__, m(torch.tensor([[1, 2, 3]])).logits.shape)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "KvtoolMlaLlamaForCausalLM" in proc.stdout, proc.stderr[-2000:]
        res = run("validate", out, "--device", "cpu", "--json")
        assert res.exit_code == 0, res.output
        report = json.loads(res.output[res.output.index("{"):])
        assert report["passed"] and report["layers_through_kernel"] == 3 and report["rel_logit_diff"] < 1e-3


def test_deepseek_v3_export_loads_in_stock_transformers(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama", num_key_value_heads=1)
    out = tmp_path / "ds"
    res = run("convert-mla", model_dir, "-o", out, "--kv-ratio", "1.0", "--rope", "decoupled", "--rope-dim", 16,
              "--rope-select", "uniform", "--format", "deepseek-v3", "--samples", 4, "--seq-len", 64, "--device", "cpu")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["first_k_dense_replace"] == 3 and cfg["q_lora_rank"] is None
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert 'kvtool' not in sys.modules
ds = AutoModelForCausalLM.from_pretrained(r'{out}').eval()
src = AutoModelForCausalLM.from_pretrained(r'{model_dir}').eval()
x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    approx = (ds(x).logits - src(x).logits).abs().max().item()
    for layer in ds.model.layers:
        layer.self_attn.kv_a_layernorm.forward = lambda h: h
    exact = (ds(x).logits - src(x).logits).abs().max().item()
print(type(ds).__name__, exact, approx)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, exact, approx = proc.stdout.split()
    assert name == "DeepseekV3ForCausalLM"
    assert float(exact) < 1e-4  # the layout is exact; only kv_a_layernorm approximates
    assert float(approx) > float(exact)
    # validate: cached decode in stock transformers, then kvtool's latent runtime, kernel vs PyTorch path
    res = run("validate", out, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["passed"] and report["stock_transformers_decode_passed"], report
    assert report["layers_through_kernel"] == 3 and report["rel_logit_diff"] < 1e-3
    assert report["generate_kernel_vs_pytorch_same_tokens"]


@pytest.mark.parametrize("args,fragment", [
    (["--kv-rank", "999"], "exceeds the GQA cache width"),
    (["--rank-alloc", "care", "--rank-max", "8"], "exceeds the ceiling 8"),
    (["--rank-alloc", "care", "--rank-min", "20", "--kv-ratio", "0.25"], "below the floor"),
    (["--rope-select", "norm", "--format", "deepseek-v3"], "--rope-select strided or uniform"),
    (["--rope-fold", "0"], "--rope-fold"),
    (["--rope", "keep", "--format", "deepseek-v3"], "needs --rope decoupled"),
    (["--rank-alloc", "sensitivity", "--format", "deepseek-v3"], "one kv_lora_rank for all layers"),
    (["--method", "pca"], "--method 'pca' is not one of: care, svd"),
    (["--kv-ratio", "nan"], "--kv-ratio must be a finite number"),
])
def test_bad_options_fail_cleanly(tiny_checkpoint, tmp_path, args, fragment):
    res = run("convert-mla", tiny_checkpoint("llama"), "-o", tmp_path / "out", "--samples", 2, "--seq-len", 32,
              "--device", "cpu", *args)
    assert res.exit_code == 2, res.output
    assert fragment in res.output and res.output.strip().startswith("error:")
    assert not (tmp_path / "out").exists()


def test_architecture_limits_fail_cleanly(tiny_checkpoint, tmp_path):
    res = run("convert-mla", tiny_checkpoint("qwen3"), "-o", tmp_path / "o", "--rope", "decoupled", "--device", "cpu")
    assert res.exit_code == 2 and "q_norm/k_norm" in res.output
    res = run("convert-mla", tiny_checkpoint("qwen2"), "-o", tmp_path / "o", "--rope", "decoupled",
              "--rope-select", "uniform", "--format", "deepseek-v3", "--device", "cpu")
    assert res.exit_code == 2 and "biases" in res.output
    assert not (tmp_path / "o").exists()


def test_missing_and_mismatched_statistics(tiny_checkpoint, tmp_path):
    a, b = tiny_checkpoint("llama"), tiny_checkpoint("mistral")
    res = run("calibrate", a, "-o", tmp_path / "st", "--samples", 2, "--seq-len", 32, "--statistics", "k",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = run("convert-mla", a, "--stats-dir", tmp_path / "st", "-o", tmp_path / "o", "--device", "cpu")
    assert res.exit_code == 2 and "'attn_in' missing" in res.output
    res = run("calibrate", b, "-o", tmp_path / "st2", "--samples", 2, "--seq-len", 32, "--statistics", "attn_in",
              "--device", "cpu")
    res = run("convert-mla", a, "--stats-dir", tmp_path / "st2", "-o", tmp_path / "o", "--device", "cpu")
    assert res.exit_code == 2 and "different model" in res.output
    assert not (tmp_path / "o").exists()


def test_default_rope_width_follows_the_budget():
    from types import SimpleNamespace

    from kvtool.convert.care import default_rope_dim

    smol = SimpleNamespace(head_dim=64)
    # SmolLM2: 3 KV heads x 64, GQA cache 384 per layer
    assert [default_rope_dim(smol, round(r * 384)) for r in (0.75, 0.5, 0.375, 0.25)] == [64, 64, 48, 32]
    # uniform pairs need rope/2 to divide head_dim/2 = 32: 48 -> 32
    assert default_rope_dim(smol, 144, "uniform") == 32
    llama8b = SimpleNamespace(head_dim=128)
    assert default_rope_dim(llama8b, 1024) == 64  # the FlashMLA layout at ratio 0.5
    assert default_rope_dim(SimpleNamespace(head_dim=16), 20) == 6  # below 8: even


def test_lean_decoupled_layout_equals_the_shared_one_and_older_checkpoints_still_load():
    """The per-head query path (kvtool >= 0.3) computes what the shared-nope layout computed, with a q_proj of
    n_h*(head_dim + rope) rows instead of n_h*g*head_dim; a shared-layout config (no mla_nope_head_dim) still loads."""
    import copy

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    loaded = wrap_model(model)
    opts = CareOptions(kv_ratio=0.5, rope="decoupled")
    store = collect_statistics(loaded, ids(6, 40, 1), "attn_in")
    layers, report = convert_layers(model.state_dict(), store, loaded.spec, opts)
    cfg = mla_config(model.config, [(r["r_k"], r["r_v"]) for r in report["layers"]], "decoupled",
                     report["rope_dim"], [r.get("rope_pairs", []) for r in report["layers"]])
    assert cfg.mla_nope_head_dim == 16
    lean = MLA_MODELS["llama"](cfg).eval()
    lean.load_state_dict(mla_state_dict(model.state_dict(), layers, loaded.spec, torch.float32), strict=True)
    shared_cfg = copy.deepcopy(cfg)
    del shared_cfg.mla_nope_head_dim
    shared = MLA_MODELS["llama"](shared_cfg).eval()
    state = mla_state_dict(model.state_dict(), layers, loaded.spec, torch.float32)
    for i, la in enumerate(layers):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = la.q_weight
        state[f"model.layers.{i}.self_attn.k_b.weight"] = la.k_up
    shared.load_state_dict(state, strict=True)
    q_lean = lean.model.layers[0].self_attn.q_proj.weight.shape[0]
    q_shared = shared.model.layers[0].self_attn.q_proj.weight.shape[0]
    assert q_lean == 4 * (16 + report["rope_dim"]) < q_shared == 4 * 2 * 16
    x = ids(2, 24, 7)
    with torch.no_grad():
        torch.testing.assert_close(lean(x).logits, shared(x).logits, rtol=1e-4, atol=1e-4)


def test_conversion_reports_parameters_and_memory(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    res = runner.invoke(app, ["convert-mla", str(src), "-o", str(tmp_path / "m"), "--rope", "decoupled",
                              "--samples", "2", "--seq-len", "32", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "weights + KV cache at batch 16" in res.output
    rep = json.loads((tmp_path / "m" / "kvtool.json").read_text())["report"]
    n_params = sum(p.numel() for p in tiny_model("llama").parameters())
    assert rep["parameters_before"] == n_params
    assert rep["weight_bytes_after"] == 4 * rep["parameters_after"]  # float32 source
    m = rep["memory_at"]
    tokens = m["batch"] * m["context"]
    assert m["before_bytes"] == rep["weight_bytes_before"] + rep["kv_bytes_per_token_before"] * tokens
    assert m["after_bytes"] - rep["weight_bytes_after"] == rep["kv_bytes_per_token_after"] * tokens
