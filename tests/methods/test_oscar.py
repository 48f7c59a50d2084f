"""OSCAR transform: rotations, clip search, folding, the export command and its errors, and the embedded model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.calib.kv_samples import collect_kv_samples
from kvtool.cli import app
from kvtool.convert.oscar import (
    OscarOptions,
    bit_reversal_permutation,
    eigenbasis,
    fold_value_rotation,
    oscar_transform,
    released_moments,
    released_rotation,
    search_clip,
    spread_matrix,
    weighted_error,
)
from kvtool.errors import KvtoolError
from kvtool.models import wrap_model
from kvtool.runtime.kvquant import KVQuantSpec, hadamard, kv_quantization, load_oscar_spec, quantile_clip

runner = CliRunner()


def test_spread_matrix_and_eigenbasis():
    for d in (16, 64, 24):
        s = spread_matrix(d)
        assert torch.allclose(s @ s.T, torch.eye(d, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(s[:, 0].abs(), torch.full((d,), d ** -0.5, dtype=torch.float64))
    a = torch.randn(30, 8, dtype=torch.float64)
    u = eigenbasis(a.T @ a)
    lam = torch.diagonal(u.T @ (a.T @ a) @ u)
    assert torch.allclose(u.T @ u, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert torch.all(lam[:-1] >= lam[1:])


def test_clip_search_is_the_grid_minimum():
    torch.manual_seed(0)
    x = torch.randn(400, 16, dtype=torch.float64) ** 3  # heavy tails: clipping pays
    w = torch.eye(16, dtype=torch.float64)
    rot = torch.eye(16, dtype=torch.float64)
    grid = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    a, err = search_clip(x, rot, w, 2, 16, grid)
    brute = {g: weighted_error(x, rot, w, 2, 16, g) for g in grid}
    assert a == min(brute, key=brute.get) and a < 1.0
    assert err == pytest.approx(brute[a], rel=1e-9)


def test_cov_hadamard_absorbs_a_dominant_direction():
    """Keys with a large shared component: mapping it onto the constant vector (zero point) beats plain Hadamard."""
    torch.manual_seed(1)
    d, n = 32, 2000
    mu = torch.randn(d, dtype=torch.float64) * 6
    k = mu + torch.randn(n, d, dtype=torch.float64) @ torch.diag(torch.linspace(0.2, 1.5, d, dtype=torch.float64))
    q = torch.randn(n, d, dtype=torch.float64)

    class Stats:
        def second_moment(self, i, name):
            x = {"q": q, "k": k, "v": k}[name]
            return (x.T @ x / n)[None]

    class Spec:
        head_dim, num_kv_heads, num_heads = d, 1, 1

    w_o = {0: torch.eye(d, dtype=torch.float64)}
    samples = {0: (k[:, None].float(), k[:, None].float())}
    errs = {}
    for rot in ("none", "hadamard", "cov", "cov-hadamard", "released"):
        tensors, report = oscar_transform(w_o, Stats(), samples, Spec(), OscarOptions(rotation=rot))
        r = tensors["layers.0.k_rotation"][0].double()
        assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-5)
        errs[rot] = report["mean_k_rel_error"]
    assert errs["cov-hadamard"] < 0.5 * errs["hadamard"], errs
    assert errs["hadamard"] < errs["none"], errs
    assert errs["released"] < errs["none"] and errs["cov-hadamard"] < errs["released"], errs


def test_bit_reversal_permutation_interleaves_eigen_sorted_directions():
    """Column br(i) of P_br holds the i-th largest direction (worked by hand for d = 8: br = 0 4 2 6 1 5 3 7)."""
    p = bit_reversal_permutation(torch.arange(1.0, 9.0))  # ascending: the i-th largest is index 7 - i
    assert p.argmax(0).tolist() == [7, 3, 5, 1, 6, 2, 4, 0]
    # with group size 4 each half of the rotated row gets two of the four largest directions
    halves = [set(p.argmax(0)[:4].tolist()), set(p.argmax(0)[4:].tolist())]
    assert all(len(h & {7, 6, 5, 4}) == 2 for h in halves)


def test_released_rotation_is_u_h_p_in_row_convention():
    torch.manual_seed(3)
    a = torch.randn(200, 16, dtype=torch.float64) @ torch.diag(torch.linspace(0.1, 3.0, 16, dtype=torch.float64))
    c = a.T @ a / 200
    r = released_rotation(c)
    assert torch.allclose(r @ r.T, torch.eye(16, dtype=torch.float64), atol=1e-10)
    vals, vecs = torch.linalg.eigh(c)
    assert torch.allclose(r.T, vecs @ hadamard(16, signs=False) @ bit_reversal_permutation(vals), atol=1e-12)
    # a rotated row x' = R x equals the released x @ (U H P)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.allclose(x @ r.T, x @ (vecs @ hadamard(16, signs=False) @ bit_reversal_permutation(vals)))


def test_released_moments_weights_values_by_attention():
    torch.manual_seed(5)
    n, d, rep = 300, 8, 3
    q = torch.randn(n * rep, d, dtype=torch.float64)
    c_q = (q.T @ q / n)[None]  # the q statistic: sum over the group's 3 query heads of E[q qᵀ]
    k = torch.randn(n, 1, d, dtype=torch.float64)
    v = torch.randn(n, 1, d, dtype=torch.float64)
    sigma_k, sigma_v = released_moments(c_q, k, v, rep)
    assert torch.allclose(sigma_k, q.T @ q / (n * rep))
    w = ((k[:, 0] @ sigma_k) * k[:, 0]).sum(-1)
    w = w / w.mean()
    assert torch.allclose(sigma_v, sum(w[t] * torch.outer(v[t, 0], v[t, 0]) for t in range(n)) / n)
    # equal-norm keys under an isotropic query moment weigh every token the same: Σ_V = VᵀV / n
    k_eq = k / k.norm(dim=-1, keepdim=True)
    _, flat = released_moments(torch.eye(d, dtype=torch.float64)[None] * rep, k_eq, v, rep)
    assert torch.allclose(flat, v[:, 0].T @ v[:, 0] / n)


def test_quantile_clip_clamps_each_row_at_its_order_statistic():
    x = torch.tensor([[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -8.0]])
    y = quantile_clip(x, 0.75)  # index int(0.75 * 8) = 6 of sorted |x| = 0.7
    assert torch.allclose(y, torch.tensor([[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.7]]))
    assert torch.equal(quantile_clip(x, None), x) and torch.equal(quantile_clip(x, 1.0), x)
    assert torch.allclose(quantile_clip(x, 0.96), x.clamp(-8.0, 8.0))  # index 7: the row's own maximum


def test_released_transform_on_tiny_model_shares_one_rotation_per_layer():
    loaded, store, samples, w_o = _tiny_setup()
    spec = loaded.spec
    opts = OscarOptions(group_size=8, rotation="released", clip="quantile")
    tensors, report = oscar_transform(w_o, store, samples, spec, opts)
    for i in range(spec.num_layers):
        r = tensors[f"layers.{i}.k_rotation"].double()
        assert torch.allclose(r[0], r[1]) and torch.allclose(r[0] @ r[0].T, torch.eye(16, dtype=torch.float64),
                                                             atol=1e-5)
        assert torch.all(tensors[f"layers.{i}.k_clip"] == 1.0)
    assert all(h["k"]["rotation"] == "released" for r in report["layers"] for h in r["heads"])
    with pytest.raises(KvtoolError, match="power-of-two head_dim"):
        OscarOptions(rotation="released").check(24)
    with pytest.raises(KvtoolError, match="--clip"):
        OscarOptions(clip="yes").check(16)


def _tiny_setup(head_dim: int = 16):
    model = tiny_model("llama", seed=4, head_dim=head_dim)
    loaded = wrap_model(model)
    from kvtool.calib.collect import collect_statistics

    windows = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    store = collect_statistics(loaded, windows, ("q", "k", "v"), progress=False)
    samples = collect_kv_samples(model, windows, sink=1)
    w_o = {i: layer.self_attn.o_proj.weight.detach() for i, layer in enumerate(model.model.layers)}
    return loaded, store, samples, w_o


def test_transform_on_tiny_model_and_fold_is_exact():
    loaded, store, samples, w_o = _tiny_setup()
    spec = loaded.spec
    tensors, report = oscar_transform(w_o, store, samples, spec, OscarOptions(group_size=8, rotation="cov-hadamard"))
    assert tensors["layers.2.k_rotation"].shape == (2, 16, 16) and tensors["layers.0.v_clip"].shape == (2,)
    for layer in report["layers"]:
        assert layer["k_rel_error"] <= layer["k_rel_error_plain"] + 1e-12
        assert layer["v_rel_error"] <= layer["v_rel_error_plain"] + 1e-12
    # the covariance rotation beats clipping alone and a plain Hadamard rotation, and its clip search helps
    for rotation, clip in (("none", "search"), ("hadamard", "search"), ("cov-hadamard", "none")):
        _, other = oscar_transform(w_o, store, samples, spec, OscarOptions(group_size=8, rotation=rotation, clip=clip))
        for kv in ("k", "v"):
            assert report[f"mean_{kv}_rel_error"] < 0.95 * other[f"mean_{kv}_rel_error"], (rotation, clip, kv)

    qspec = KVQuantSpec(method="oscar", bits=2, group_size=8, sink=1, residual_window=2)
    for i in range(spec.num_layers):
        for name in ("k_rotation", "v_rotation", "k_clip", "v_clip"):
            getattr(qspec, name)[i] = tensors[f"layers.{i}.{name}"]
    model = loaded.model
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(9))
    folded = tiny_model("llama", seed=4, head_dim=16)
    v_rot = {i: tensors[f"layers.{i}.v_rotation"] for i in range(spec.num_layers)}
    folded.load_state_dict(fold_value_rotation(model.state_dict(), spec, v_rot))
    folded_spec = KVQuantSpec(**{**qspec.__dict__, "v_rotation": {}, "v_folded": True})
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        with kv_quantization(model, qspec):
            a = model(input_ids=ids).logits
        with kv_quantization(folded, folded_spec):
            b = folded(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_options_are_checked():
    with pytest.raises(KvtoolError, match="use 2 or 4"):
        OscarOptions(bits=3).check(16)
    with pytest.raises(KvtoolError, match="does not divide head_dim"):
        OscarOptions(group_size=6).check(16)
    with pytest.raises(KvtoolError, match="unknown"):
        OscarOptions(rotation="random").check(16)


def _assert_clean_error(res, fragment, out):
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("error:") and fragment in text and len(text.splitlines()) == 1, text
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_export_cli_outputs_fold_and_errors(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    out = tmp_path / "osc"
    common = ["--seq-len", "32", "--kv-samples", "2", "--device", "cpu", "--no-progress"]
    _assert_clean_error(runner.invoke(app, ["export", str(model), "-o", str(out), "--bits", "3"] + common),
                        "--bits 3", out)
    _assert_clean_error(runner.invoke(app, ["export", str(model), "-o", str(out), "--group-size", "5", "--sink", "1"]
                                      + common),
                        "does not divide head_dim", out)
    res = runner.invoke(app, ["calibrate", str(model), "-o", str(tmp_path / "st"), "--samples", "2", "--seq-len",
                              "32", "--statistics", "attn_in", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    _assert_clean_error(runner.invoke(app, ["export", str(model), "-o", str(out), "--stats-dir", str(tmp_path / "st"),
                                       "--sink", "1"]
                                      + common), "statistic 'q' missing", out)

    res = runner.invoke(app, ["export", str(model), "-o", str(out), "--group-size", "8", "--sink", "2",
                              "--residual-window", "4", "--fold"] + common)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "quantization_config.json").read_text())
    scheme = cfg["kv_cache_scheme"]
    assert scheme["num_bits"] == 2 and scheme["group_size"] == 8 and not scheme["symmetric"]
    assert cfg["rotations"]["value_folded"] and cfg["full_precision"]["sink"] == 2
    manifest = json.loads((out / "kvtool.json").read_text())
    assert manifest["command"] == "export" and len(manifest["report"]["layers"]) == 3
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    spec = load_oscar_spec(out, head_dim=16, num_layers=3, num_kv_heads=2)
    assert spec.v_folded and not spec.v_rotation and spec.residual_window == 4
    # the folded checkpoint evaluates with its own export: same perplexity as the source with the unfolded export
    base = ["--max-tokens", "200", "--seq-len", "64", "--device", "cpu", "--json"]
    res = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "osc2"), "--group-size", "8", "--sink",
                              "2", "--residual-window", "4"] + common)
    assert res.exit_code == 0, res.output
    _assert_clean_error(runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "rel")] + common),
                        "--sink 64 leaves no calibration keys", tmp_path / "rel")
    res = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "rel"), "--group-size", "8",
                              "--rotation", "released", "--clip", "quantile", "--sink", "4", "--residual-window",
                              "8"] + common)
    assert res.exit_code == 0, res.output
    rel = json.loads((tmp_path / "rel" / "quantization_config.json").read_text())
    assert rel["clipping"] == {**rel["clipping"], "mode": "quantile", "key_quantile": 0.96, "value_quantile": 0.92}
    assert rel["full_precision"] == {**rel["full_precision"], "sink": 4, "residual_window": 8}
    rel_spec = load_oscar_spec(tmp_path / "rel", head_dim=16, num_layers=3, num_kv_heads=2)
    assert (rel_spec.k_quantile, rel_spec.v_quantile, rel_spec.sink) == (0.96, 0.92, 4)
    a = json.loads(runner.invoke(app, ["eval", str(out), "--kv-quant", str(out)] + base).output)
    b = json.loads(runner.invoke(app, ["eval", str(model), "--kv-quant", str(tmp_path / "osc2")] + base).output)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=2e-3)


@pytest.mark.slow
def test_oscar_beats_hadamard_on_embedded_model(embedded):
    """On SmolLM2's real keys, cov-hadamard + clipping cuts the attention-aware key error well below Hadamard."""
    from kvtool.data import TextSource, calibration_windows
    spec = embedded.spec
    layers = [0, 15, 29]
    windows = calibration_windows(embedded.tokenizer, TextSource("embedded"), 1, 256, 1, spec.max_positions)
    from kvtool.calib.collect import collect_statistics

    store = collect_statistics(embedded, windows, ("q", "k", "v"), layers=layers, progress=False)
    samples = collect_kv_samples(embedded.model, windows, sink=4)
    samples = {i: samples[i] for i in layers}
    w_o = {i: spec.layers(embedded.model)[i].self_attn.o_proj.weight.detach() for i in layers}
    res = {}
    for rot in ("hadamard", "cov-hadamard"):
        _, rep = oscar_transform(w_o, store, samples, spec, OscarOptions(rotation=rot))
        res[rot] = rep
    assert res["cov-hadamard"]["mean_k_rel_error"] < 0.7 * res["hadamard"]["mean_k_rel_error"], res
    assert res["cov-hadamard"]["mean_v_rel_error"] < res["hadamard"]["mean_v_rel_error"]
    assert res["cov-hadamard"]["mean_k_rel_error"] < 0.3 * res["cov-hadamard"]["mean_k_rel_error_plain"]
