"""kvtool corda: the decomposition, the PEFT-loadable outputs (identity at init), the validator, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.calib.collect import collect_statistics
from kvtool.cli import app
from kvtool.convert.corda import ALL_TARGETS, corda_factor, damped_inverse, parse_targets, required_stats
from kvtool.errors import KvtoolError
from kvtool.methods import run_method
from kvtool.models import wrap_model


def _cov(n: int, seed: int = 0, decay: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.exp(-decay * torch.arange(n, dtype=torch.float64))) @ q.T


def test_factor_reconstructs_and_selects_components():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    c = _cov(16)
    inv = damped_inverse(c)
    assert inv.damp == 0.01 and inv.inverse_error < 0.05
    kpa = corda_factor(w, inv, 4, "kpa")
    ipa = corda_factor(w, inv, 4, "ipa")
    for f in (kpa, ipa):
        assert torch.allclose(f.residual + f.lora_b @ f.lora_a, w, atol=1e-10)
        assert f.lora_a.shape == (4, 16) and f.lora_b.shape == (24, 4)
    # the singular values of W·C_λ: ipa keeps the largest r, kpa the smallest r
    s = torch.linalg.svdvals(w @ inv.damped)
    assert ipa.report["energy_kept"] == pytest.approx(float(s[:4].square().sum() / s.square().sum()), rel=1e-9)
    assert kpa.report["energy_kept"] == pytest.approx(float(s[-4:].square().sum() / s.square().sum()), rel=1e-9)
    assert kpa.report["energy_kept"] < ipa.report["energy_kept"]
    # B·A·C_λ has singular values exactly the chosen ones (the adapter is the chosen part of W·C_λ)
    got = torch.linalg.svdvals(kpa.lora_b @ kpa.lora_a @ inv.damped)[:4]
    assert torch.allclose(got, s[-4:], rtol=1e-8)
    # KPA's adapter barely moves the outputs on the calibration distribution: ‖B·A·C^½‖ small vs ‖W·C^½‖
    root = torch.linalg.cholesky(c)
    assert torch.linalg.matrix_norm(kpa.lora_b @ kpa.lora_a @ root) < 0.2 * torch.linalg.matrix_norm(
        ipa.lora_b @ ipa.lora_a @ root)


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_gram_eigen_factor_equals_the_full_svd(shape):
    """The r chosen triplets from the smaller Gram side give the same adapter as a full float64 SVD."""
    from kvtool.convert.corda import top_or_bottom_svd

    out_f, in_f = shape
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    m = w @ damped_inverse(_cov(in_f, decay=0.4)).damped  # singular values spread over ~1e3
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    for idx in (slice(-4, None), slice(0, 4)):
        t = top_or_bottom_svd(m, idx)
        assert t.path == "gram"
        assert torch.allclose(t.s, s[idx], rtol=1e-9)
        assert t.sigma_max == pytest.approx(float(s[0]), rel=1e-9)
        assert t.energy == pytest.approx(float(s.square().sum()), rel=1e-12)
        want = u[:, idx] @ torch.diag(s[idx]) @ vh[idx]
        got = t.u @ torch.diag(t.s) @ t.vh
        assert float((got - want).norm() / want.norm()) < 1e-9
        assert torch.allclose(t.vh @ t.vh.T, torch.eye(4, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_wide_spread_takes_the_inverse_path_and_matches_the_full_svd(shape):
    """Smallest singular values ~1e-8 of the largest (beyond what the Gram keeps): KPA's triplets come from
    (mᵀm)⁻¹ with Rayleigh–Ritz and match the full SVD; the largest ones (IPA) and a rank-deficient m take the full
    SVD."""
    from kvtool.convert.corda import INVERSE_PATH_TOL, top_or_bottom_svd

    out_f, in_f = shape
    g = torch.Generator().manual_seed(5)
    u2, _, vh2 = torch.linalg.svd(torch.randn(out_f, in_f, generator=g, dtype=torch.float64), full_matrices=False)
    spread = torch.logspace(0, -8, min(shape), dtype=torch.float64)
    hard = u2 @ torch.diag(spread) @ vh2
    t = top_or_bottom_svd(hard, slice(-4, None))
    assert t.path == "inverse" and t.residual <= INVERSE_PATH_TOL
    want = u2[:, -4:] @ torch.diag(spread[-4:]) @ vh2[-4:]
    assert float((t.u @ torch.diag(t.s) @ t.vh - want).norm() / want.norm()) < 1e-6
    assert torch.allclose(t.s, spread[-4:], rtol=1e-6)
    assert t.sigma_max == pytest.approx(1.0, rel=1e-6)
    assert (t.u.shape, t.vh.shape) == ((out_f, 4), (4, in_f))
    assert top_or_bottom_svd(hard, slice(-4, None), try_gram=False).path == "inverse"
    assert top_or_bottom_svd(hard, slice(0, 4)).path == "gram"  # the largest: the Gram keeps them
    deficient = hard.clone()  # a zero column of the tall side: R has an exact zero pivot
    if out_f > in_f:
        deficient[:, 0] = 0
    else:
        deficient[0] = 0
    assert top_or_bottom_svd(deficient, slice(-4, None)).path == "full"


def test_pissa_and_lora_baselines():
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = corda_factor(w, None, 3, "pissa")
    u, s, vh = torch.linalg.svd(w)
    assert torch.allclose(p.lora_b @ p.lora_a, u[:, :3] * s[:3] @ vh[:3], atol=1e-10)
    lo = corda_factor(w, None, 3, "lora", seed=5)
    assert torch.equal(lo.residual, w) and torch.count_nonzero(lo.lora_b) == 0 and lo.lora_a.abs().max() > 0
    assert torch.equal(corda_factor(w, None, 3, "lora", seed=5).lora_a, lo.lora_a)  # seeded


def test_damping_rule_and_singular_covariance():
    c = torch.zeros(8, 8, dtype=torch.float64)
    c[0, 0] = 1.0  # rank one: damping 0.01·mean(diag) makes it invertible, achieved error reported
    inv = damped_inverse(c)
    assert inv.inverse_error < 0.05
    with pytest.raises(KvtoolError, match="is zero"):
        damped_inverse(torch.zeros(4, 4))
    with pytest.raises(KvtoolError, match="NaN"):
        damped_inverse(torch.full((4, 4), float("nan")))
    with pytest.raises(KvtoolError, match="damping limit"):
        damped_inverse(_cov(8), inverse_tol=0.0, max_damp=0.1)


def test_targets_and_required_stats():
    assert parse_targets(None) == ALL_TARGETS
    assert parse_targets("v_proj,q_proj") == ("q_proj", "v_proj")
    with pytest.raises(KvtoolError, match="lm_head"):
        parse_targets("lm_head")
    assert required_stats(("q_proj", "k_proj")) == ("attn_in",)
    assert required_stats(("o_proj", "up_proj")) == ("o_in", "mlp_in")
    assert "down_in" in required_stats(ALL_TARGETS, "kpa") and required_stats(ALL_TARGETS, "pissa") == ()


@pytest.fixture(scope="module")
def tiny_corda(tmp_path_factory):
    model = tiny_model("qwen2", seed=3)  # qwen2: q/k/v biases stay in the residual base
    loaded = wrap_model(model)
    windows = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    store = collect_statistics(loaded, windows, "attn_in,o_in,mlp_in,down_in")
    return loaded, store, windows, tmp_path_factory.mktemp("corda")


@pytest.mark.parametrize("mode", ["kpa", "ipa", "pissa", "lora"])
def test_peft_loads_and_equals_original_at_init(tiny_corda, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded, store, windows, root = tiny_corda
    out = root / mode
    report = run_method("corda", loaded, store, out, mode=mode, rank=4, targets=",".join(ALL_TARGETS))
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "base", "kvtool.json"]
    manifest = json.loads((out / "kvtool.json").read_text())
    assert manifest["command"] == "corda" and manifest["report"]["mode"] == mode
    assert len(report["modules"]) == 3 * len(ALL_TARGETS)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    # every adapted linear really carries a non-trivial split (W_res differs from W) except plain lora
    w0 = loaded.model.model.layers[1].mlp.down_proj.weight
    w_res = peft_model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    assert torch.equal(w_res, w0) == (mode == "lora")
    with torch.no_grad():
        ref = loaded.model(input_ids=windows).logits
        got = peft_model(input_ids=windows).logits
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()


def test_energy_kept_ipa_above_kpa(tiny_corda, tmp_path):
    loaded, store, _, _ = tiny_corda
    kpa = run_method("corda", loaded, store, tmp_path / "k", mode="kpa", rank=4, targets="q_proj,down_proj",
                     layers="0-1")
    ipa = run_method("corda", loaded, store, tmp_path / "i", mode="ipa", rank=4, targets="q_proj,down_proj",
                     layers="0-1")
    assert set(kpa["modules"]) == {f"model.layers.{i}.{p}" for i in (0, 1)
                                   for p in ("self_attn.q_proj", "mlp.down_proj")}
    for key in kpa["modules"]:
        assert kpa["modules"][key]["energy_kept"] < ipa["modules"][key]["energy_kept"]
        assert kpa["modules"][key]["inverse_error"] < 0.05
    cfg = json.loads((tmp_path / "k" / "adapter" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0, 1] and cfg["target_modules"] == ["q_proj", "down_proj"]


def test_validator_runs_the_kernel(tiny_corda, tmp_path):
    from kvtool.methods import validate

    loaded, store, _, _ = tiny_corda
    run_method("corda", loaded, store, tmp_path / "v", mode="kpa", rank=4, targets="q_proj,v_proj,down_proj")
    rep = validate(tmp_path / "v", {"device": "cpu", "tokens": 16})
    assert rep["passed"] and rep["adapted_linears"] == 9 and rep["kernel_vs_merged_rel"] < 1e-5


def test_bad_input_writes_nothing(tiny_corda, tmp_path):
    loaded, store, _, _ = tiny_corda
    out = tmp_path / "bad"
    with pytest.raises(KvtoolError, match="not below min"):
        run_method("corda", loaded, store, out, mode="kpa", rank=64)
    with pytest.raises(KvtoolError, match="missing"):
        run_method("corda", loaded, store.__class__(), out, mode="kpa", rank=4)
    with pytest.raises(KvtoolError, match="mode 'xpa' is not one of"):
        run_method("corda", loaded, store, out, mode="xpa", rank=4)
    with pytest.raises(KvtoolError, match="outside"):
        run_method("corda", loaded, store, out, mode="kpa", rank=4, layers="0-9")
    # a covariance that cannot be inverted even with damping (all-zero input to down_proj)
    broken = store.__class__()
    broken.merge(store)
    broken.sums[(2, "down_in")] = torch.zeros_like(broken.sums[(2, "down_in")])
    with pytest.raises(KvtoolError, match="down_in of layer 2 is zero"):
        run_method("corda", loaded, broken, out, mode="kpa", rank=4, targets=",".join(ALL_TARGETS))
    assert not out.exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_cli_errors_exit_2(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    runner = CliRunner()
    out = tmp_path / "o"
    cases = [
        (["--targets", "q_proj,lm_head"], "lm_head"),
        (["--rank", "64"], "not below min"),
        (["--mode", "foo"], "--mode 'foo' is not one of: kpa, ipa, pissa, lora"),
        (["--damping", "nan"], "--damping must be a finite number"),
        (["--rank", "0"], "--rank must be > 0"),
        (["--stats-dir", str(tmp_path / "nostats")], "is not a statistics folder"),
    ]
    for extra, msg in cases:
        res = runner.invoke(app, ["corda", str(ckpt), "-o", str(out), "--device", "cpu", *extra])
        assert res.exit_code == 2, res.output
        assert msg in res.output
        assert not out.exists()


def test_cli_stats_missing_down_in(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    runner = CliRunner()
    stats = tmp_path / "stats"
    res = runner.invoke(app, ["calibrate", str(ckpt), "-o", str(stats), "--samples", "2", "--seq-len", "32",
                              "--statistics", "attn_in,o_in,mlp_in", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["corda", str(ckpt), "-o", str(tmp_path / "o"), "--stats-dir", str(stats), "--rank", "4",
                              "--targets", "q_proj,down_proj", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2 and "down_in" in res.output and not (tmp_path / "o").exists()
    # the defaults chain: default targets need only what `kvtool calibrate` collects by default
    res = runner.invoke(app, ["corda", str(ckpt), "-o", str(tmp_path / "o"), "--stats-dir", str(stats), "--rank", "4",
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_embedded_kpa_identity_and_peft(embedded, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kvtool.data import TextSource, calibration_windows

    windows = calibration_windows(embedded.tokenizer, TextSource("embedded"), 4, 64, 0)
    store = collect_statistics(embedded, windows, "attn_in,o_in", layers=list(range(6)))
    rep = run_method("corda", embedded, store, tmp_path / "e", mode="kpa", rank=8, targets="q_proj,v_proj,o_proj",
                      layers="0-5")  # a slice keeps the test short; PEFT's layers_to_transform must match
    assert rep["inverse_error_max"] < 0.05 and rep["energy_kept_max"] < 0.05
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "e" / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "e" / "adapter"))
    with torch.no_grad():
        ref = embedded.model(input_ids=windows[:1]).logits
        got = model(input_ids=windows[:1]).logits
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()


def test_auto_peft_model_and_kvtool_eval_load_the_adapter_with_its_residual_base(tiny_checkpoint, tmp_path):
    """adapter_config.json names the residual base, so AutoPeftModelForCausalLM gives the original model's logits at
    init (it loaded the source + adapter before: 10% off); `kvtool eval OUT` scores base + adapter the same way."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "c"
    res = CliRunner().invoke(app, ["corda", str(ckpt), "-o", str(out), "--rank", "4", "--samples", "2", "--seq-len",
                                   "32", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == (out / "base").resolve()
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval()(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()(ids).logits
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    scores = []
    for model in (ckpt, out):
        res = CliRunner().invoke(app, ["eval", str(model), "--max-tokens", "256", "--seq-len", "64", "--device", "cpu",
                                       "--json"])
        assert res.exit_code == 0, res.output
        scores.append(json.loads(res.output)["perplexity"])
    assert scores[1] == pytest.approx(scores[0], rel=1e-4)


def test_probed_inverse_error_and_solves_match_the_explicit_inverse():
    c = _cov(96, decay=0.08)
    inv = damped_inverse(c)
    assert inv.probed and inv.factor is not None and inv.explicit is None  # no n x n inverse formed
    full = float(torch.linalg.matrix_norm(inv.damped @ torch.linalg.inv(inv.damped) - torch.eye(96,
                                                                                               dtype=torch.float64)))
    assert inv.inverse_error < 1e-9 and full < 1e-9  # both far below the tolerance, where the estimate is used
    rows = torch.randn(5, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(inv.solve_rows(rows), rows @ torch.linalg.inv(inv.damped), rtol=1e-10, atol=1e-12)
    # near the tolerance the full residual decides (PEFT's rule): a tolerance the estimate cannot clear
    tight = damped_inverse(c, inverse_tol=3 * full)
    assert not tight.probed and tight.damp == 0.01 and tight.inverse_error < 3 * full
