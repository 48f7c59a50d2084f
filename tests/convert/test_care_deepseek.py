"""CARE -> DeepSeek-V3 export: engine shapes (per-head nope = head_dim), the config vLLM's DeepSeek-V2/V3 loader
reads, exactness with kv_a_layernorm bypassed, the rope pairs DeepSeek's rotary can express, the latent norm fit,
and RoPE scaling refused before any calibration."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.calib.collect import apply_rope, collect_statistics
from kvtool.cli import app
from kvtool.convert.care import (
    MlaLayer,
    _group_rotation,
    decouple_rope,
    factor_nope,
    rope_grams,
    select_rope_pairs,
)
from kvtool.convert.deepseek_export import add_ballast, latent_norm_weights
from kvtool.models import wrap_model

runner = CliRunner()

# an 8-KV-head, head_dim-128 model (Llama-3-8B attention shapes, few layers, small hidden)
ENGINE = dict(num_key_value_heads=8, num_attention_heads=16, head_dim=128, hidden_size=1024, intermediate_size=64,
              num_hidden_layers=1)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def vllm_shapes_ok(cfg: dict, state: dict[str, tuple[int, ...]]) -> list[str]:
    """What vLLM's DeepseekV2Attention / DecoderLayer read from the config and the weight shapes they build."""
    bad = []
    for key in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "rope_parameters", "rms_norm_eps", "hidden_size", "num_attention_heads", "first_k_dense_replace",
                "max_position_embeddings", "hidden_act"):
        if key not in cfg:
            bad.append(f"missing {key}")
    n_h, h = cfg["num_attention_heads"], cfg["hidden_size"]
    nope, rope, v, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    if cfg["hidden_act"] != "silu":
        bad.append("vLLM's MLP takes silu only")
    if cfg["rope_parameters"]["rope_type"] != "default":
        bad.append("vLLM rewrites non-default rope types to deepseek_yarn")
    if nope + rope > 256:
        bad.append("prefill head dim nope+rope above FlashAttention's 256")
    if v > nope + rope:
        bad.append("vLLM pads v to nope+rope")
    for i in range(cfg["num_hidden_layers"]):  # vLLM: MoE iff n_routed_experts is not None and i >= first_k_dense
        if cfg.get("n_routed_experts", 256) is not None and i >= cfg["first_k_dense_replace"]:
            bad.append(f"layer {i} would be MoE")
        p = f"model.layers.{i}.self_attn."
        want = {"q_proj.weight": (n_h * (nope + rope), h), "kv_a_proj_with_mqa.weight": (r + rope, h),
                "kv_a_layernorm.weight": (r,), "kv_b_proj.weight": (n_h * (nope + v), r), "o_proj.weight": (h, n_h * v)}
        for k, shape in want.items():
            if tuple(state.get(p + k, ())) != shape:
                bad.append(f"{p + k} {state.get(p + k)} != {shape}")
    if any(k.endswith(".bias") for k in state):
        bad.append("vLLM builds every attention projection without bias")
    if cfg["q_lora_rank"] is not None:
        bad.append("q_lora_rank must be null (q_proj)")
    return bad


def test_engine_shaped_export_matches_kvtool_format_and_vllm_loader(tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model_dir = tiny_checkpoint("llama", **ENGINE)
    res = run("calibrate", model_dir, "-o", tmp_path / "st", "--samples", 4, "--seq-len", 64, "--statistics",
              "attn_in", "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    common = ["--stats-dir", tmp_path / "st", "--kv-ratio", 0.5, "--device", "cpu", "--samples", 2, "--seq-len", 64]
    res = run("convert-mla", model_dir, "-o", tmp_path / "ds", "--format", "deepseek-v3", *common)
    assert res.exit_code == 0, res.output
    res = run("convert-mla", model_dir, "-o", tmp_path / "kv", "--rope", "decoupled", "--rope-select", "strided",
              "--rank-alloc", "sensitivity-split", *common)  # the export's default allocation
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "ds" / "config.json").read_text())
    with safe_open(str(tmp_path / "ds" / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert vllm_shapes_ok(cfg, shapes) == []
    assert (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]) == (128, 64, 128)
    assert cfg["kv_lora_rank"] == 2 * 8 * 128 // 2 - 64  # ratio 0.5 of the GQA cache, minus the rope key
    report = json.loads((tmp_path / "ds" / "kvtool.json").read_text())["report"]["deepseek_v3"]
    assert report["nope_factor_residual"] < 1e-10  # the per-head nope factorization is exact
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float64).eval()
    kv = AutoModelForCausalLM.from_pretrained(tmp_path / "kv", dtype=torch.float64).eval()
    assert type(ds).__name__ == "DeepseekV3ForCausalLM"
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = kv(x).logits
        normed = ds(x).logits
        for layer in ds.model.layers:
            layer.self_attn.kv_a_layernorm.forward = lambda h: h
        exact = ds(x).logits
    torch.testing.assert_close(exact, ref, rtol=1e-6, atol=1e-6)
    assert (normed - ref).abs().max() > 1e-6  # the norm is the one approximation


def test_factor_nope_is_exact_at_rank_head_dim():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 40, dtype=torch.float64, generator=g)  # a head's 8 query channels
    q_nope = torch.randn(30, 8, dtype=torch.float64, generator=g) @ base  # 30 rotated channels, rank 8
    k_up = torch.randn(30, 12, dtype=torch.float64, generator=g)
    q, w, resid = factor_nope(q_nope, k_up, 8)
    assert q.shape == (8, 40) and w.shape == (8, 12) and resid < 1e-12
    torch.testing.assert_close(q.T @ w, q_nope.T @ k_up, rtol=1e-10, atol=1e-10)
    _, _, resid = factor_nope(torch.randn(30, 40, dtype=torch.float64, generator=g), k_up, 8)
    assert resid > 0.1  # a rank above head_dim is reported, not hidden


def test_rope_pair_selection_rules():
    scores = torch.tensor([5.0, 0.1, 4.0, 0.1, 3.0, 0.1, 2.0, 0.2])
    assert select_rope_pairs(scores, 4, "norm") == ([0, 2, 4, 6], 0)
    assert select_rope_pairs(scores, 4, "uniform") == ([0, 2, 4, 6], 2)
    assert select_rope_pairs(scores, 2, "uniform") == ([0, 4], 4)
    assert select_rope_pairs(scores, 2, "strided")[0] == [0, 2]  # 5+4 beats 5+3 (s=4) and 5+0.1 (s=1, 3, 5)
    assert select_rope_pairs(torch.tensor([1.0, 9, 9, 9, 0, 0, 0, 0]), 4, "strided") == ([0, 1, 2, 3], 1)


def test_rorope_with_freqfold_preserves_logits_when_every_channel_keeps_its_rotation():
    """The joint rotation of a group acts alike on the real and imaginary parts; with fold 1 each slot stays at its
    own frequency, so applying RoPE to every slot (rope and nope alike) reproduces the original logits."""
    model = tiny_model("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    loaded = wrap_model(model)
    spec = loaded.spec
    c = collect_statistics(loaded, torch.randint(0, 300, (4, 32)), "attn_in").second_moment(0, "attn_in")
    attn = model.model.layers[0].self_attn
    half = spec.head_dim // 2
    q_new, k_nope, k_pe, chosen, _ = decouple_rope(attn.q_proj.weight, attn.k_proj.weight, c, spec, 4, "norm", 1)
    keep = torch.ones(spec.num_kv_heads * half, dtype=torch.bool)
    slots = torch.arange(spec.num_kv_heads * half)
    pe_slots = [int(s) for s in slots if int(s) % half in chosen and int(s) // half == 0]
    # the top component of each kept pair's group sits in the group's first slot (head 0)
    keep[pe_slots] = False
    freqs_nope = (slots[keep] % half).tolist()
    freqs = freqs_nope + chosen  # per pair-slot: a-parts then b-parts, nope then rope
    k_all = torch.cat([k_nope[: len(freqs_nope)], k_pe[: len(chosen)], k_nope[len(freqs_nope):], k_pe[len(chosen):]])
    q_all = q_new.view(spec.num_heads, -1, q_new.shape[-1])
    n_nope = len(freqs_nope)
    q_all = torch.cat([q_all[:, :n_nope], q_all[:, 2 * n_nope:2 * n_nope + len(chosen)],
                       q_all[:, n_nope:2 * n_nope], q_all[:, 2 * n_nope + len(chosen):]], dim=1)
    x = torch.randn(1, 10, spec.hidden_size, dtype=torch.float64)
    cos, sin = (t.double() for t in model.model.rotary_emb(x, torch.arange(10)[None]))
    idx = torch.tensor(freqs + [f + half for f in freqs])
    q = apply_rope((x @ attn.q_proj.weight.double().T).view(1, 10, 6, 16), cos, sin)
    k = apply_rope((x @ attn.k_proj.weight.double().T).view(1, 10, 3, 16), cos, sin)
    ref = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, dim=2))
    rq = apply_rope(torch.einsum("hcD,bsD->bshc", q_all, x), cos[..., idx], sin[..., idx])
    rk = apply_rope(torch.einsum("cD,bsD->bsc", k_all, x)[:, :, None], cos[..., idx], sin[..., idx])[:, :, 0]
    got = torch.einsum("bihc,bjc->bhij", rq, rk)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_top_component_holds_at_least_its_share():
    model = tiny_model("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    loaded = wrap_model(model)
    c = collect_statistics(loaded, torch.randint(0, 300, (4, 32)), "attn_in").second_moment(0, "attn_in")
    attn = model.model.layers[0].self_attn
    grams = rope_grams(attn.q_proj.weight, attn.k_proj.weight, c, loaded.spec)
    for group in ([0], [3], [2, 3], [4, 5, 6, 7]):
        _, chan, score, share = _group_rotation(grams, loaded.spec, group)
        assert share >= 1 / len(chan) - 1e-12 and score > 0


def test_latent_norm_lsq_fits_best():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(500, 1, generator=g, dtype=torch.float64) * 3 + 0.1  # per-token scale the norm removes
    x = torch.randn(500, 16, generator=g, dtype=torch.float64) * scale
    layer = MlaLayer(k_down=torch.randn(3, 16, generator=g, dtype=torch.float64),
                     k_up=torch.zeros(1), v_down=torch.randn(2, 16, generator=g, dtype=torch.float64),
                     v_up=torch.zeros(1))
    cm = [x.T @ x / 500]
    down = torch.cat([layer.k_down, layer.v_down])
    c = x @ down.T
    rms = (c.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    def err(w):
        return float((w * c / rms - c).pow(2).sum())

    errs = {rule: err(latent_norm_weights([layer], [x], cm, 1e-6, rule)[0])
            for rule in ("lsq", "mean-rms", "inv-mean-inv-rms", "rms")}
    assert errs["lsq"] == min(errs.values())
    with pytest.raises(Exception, match="needs calibration samples"):
        latent_norm_weights([layer], None, cm, 1e-6, "lsq")


@pytest.mark.parametrize("scaling", [{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                     {"rope_type": "linear", "factor": 2.0}])
def test_rope_scaling_refused_before_calibration(tiny_checkpoint, tmp_path, scaling):
    model_dir = tiny_checkpoint("llama", rope_scaling=scaling)
    # no statistics given: a refusal after calibration would have calibrated first (and taken far longer)
    res = run("convert-mla", model_dir, "-o", tmp_path / "o", "--format", "deepseek-v3", "--device", "cpu")
    assert res.exit_code == 2 and res.output.startswith("error:") and "has no DeepSeek-V3 equivalent" in res.output
    assert "calibrat" not in res.output.lower()
    assert not (tmp_path / "o").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dir}\noutput: {tmp_path / 'ro'}\nsteps:\n  - convert-mla: "
                      "{format: deepseek-v3}\n")
    res = run("run", recipe, "--dry-run")
    assert res.exit_code == 2 and "has no DeepSeek-V3 equivalent" in res.output, res.output
    assert not (tmp_path / "ro").exists()


def test_ballast_channel_flattens_the_latent_rms_and_leaves_values_alone():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(16, generator=g, dtype=torch.float64) * 4
    x = mean + torch.randn(400, 16, generator=g, dtype=torch.float64) * torch.rand(400, 1, generator=g,
                                                                                    dtype=torch.float64) * 2
    layer = MlaLayer(k_down=torch.randn(3, 16, generator=g, dtype=torch.float64), k_up=torch.randn(8, 3),
                     v_down=torch.randn(4, 16, generator=g, dtype=torch.float64), v_up=torch.randn(8, 4))
    (out,), (spread,) = add_ballast([layer], [x], [x[:5]])
    assert out.v_down.shape == layer.v_down.shape and (out.v_up[:, -1] == 0).all()  # same width, unread channel
    torch.testing.assert_close(out.v_up[:, :-1], layer.v_up[:, :-1].double())
    torch.testing.assert_close(out.k_down, layer.k_down)

    def rms_spread(la):
        c = x @ torch.cat([la.k_down, la.v_down]).double().T
        rms = c.pow(2).mean(-1).sqrt()
        return float(rms.std() / rms.mean())

    assert rms_spread(out) < 0.9 * rms_spread(layer)
    assert spread < 10


def test_identity_q_lora_export_equals_the_plain_one_in_stock_transformers(tiny_checkpoint, tmp_path):
    """--q-lora identity (what llama.cpp loads for any layer count): q_lora_rank = hidden size, q_a_proj = I, the
    input norm folded into q_b_proj and kv_a_proj_with_mqa; the logits are the q_proj export's, up to the norm's eps
    against the hidden states' mean square (rms(x)² = m/(m + eps)): embeddings of std 0.2 keep eps/m near 2.5e-5
    (at the default 0.02 it is 2.5e-3 and the logits move 4e-4)."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_checkpoint("llama", **ENGINE, initializer_range=0.2)
    common = ["--kv-ratio", 0.5, "--device", "cpu", "--samples", 2, "--seq-len", 64, "--format", "deepseek-v3",
              "--no-progress"]
    for name, extra in (("plain", []), ("qlora", ["--q-lora", "identity"])):
        res = run("convert-mla", model_dir, "-o", tmp_path / name, *common, *extra)
        assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "qlora" / "config.json").read_text())
    assert cfg["q_lora_rank"] == ENGINE["hidden_size"]
    plain, qlora = (AutoModelForCausalLM.from_pretrained(str(tmp_path / n), dtype=torch.float32).eval()
                    for n in ("plain", "qlora"))
    attn = qlora.model.layers[0].self_attn
    assert torch.equal(attn.q_a_proj.weight, torch.eye(ENGINE["hidden_size"]))
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(x).logits, qlora(x).logits
    assert float((a - b).norm() / a.norm()) < 1e-4


def test_q_lora_needs_the_deepseek_format(tiny_checkpoint, tmp_path):
    res = run("convert-mla", tiny_checkpoint("llama"), "-o", tmp_path / "x", "--q-lora", "identity", "--device",
              "cpu")
    assert res.exit_code == 2 and "error: --q-lora identity" in res.output and "--format deepseek-v3" in res.output
    assert not (tmp_path / "x").exists()
