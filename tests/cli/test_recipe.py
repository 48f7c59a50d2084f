"""Recipes: validation errors, one calibration pass for all steps, reports, and resume from saved statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kvtool.cli import app
from kvtool.errors import KvtoolError
from kvtool.recipe import load_recipe, required_stats

runner = CliRunner()
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_recipes_are_valid():
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {"care-smoke.yaml", "corda-smoke.yaml", "oscar-smoke.yaml", "ladder-smoke.yaml"} <= set(names)
    for p in RECIPES.glob("*.yaml"):
        load_recipe(p)


def test_statistics_union_over_steps(tmp_path):
    r = load_recipe(write(tmp_path, {"steps": [{"care": {"kv_ratio": 0.5}}, {"oscar": {"bits": 2}}]}))
    assert required_stats(r) == ("attn_in", "q", "k", "v")


@pytest.mark.parametrize("data,fragment", [
    ({"steps": [{"care": {"kv_ratio": 0.5}}], "modle": "x"}, "unknown key 'modle'"),
    ({"steps": [{"care": {"kv_ratio": "half"}}]}, "kv_ratio must be float"),
    ({"steps": [{"care": {"bogus": 1}}]}, "unknown key 'bogus'"),
    ({"steps": [{"quantize": {}}]}, "unknown kind 'quantize'"),
    ({"steps": [{"validate": {"target": "mla"}}]}, "not an earlier method step"),
    ({"data": {"samples": "many"}, "steps": [{"care": {}}]}, "samples must be int"),
    ({"data": {"samples": None}, "steps": [{"care": {}}]}, "samples must be int, got nothing"),
    ({"steps": [{"care": {"kv_ratio": None}}]}, "kv_ratio must be float, got nothing"),
    ({"steps": [{"care": {"rope": 3}}]}, "rope must be str or null, got int"),
    ({"steps": [{"care": {"kv_ratio": 7}}]}, "kv_ratio must be <= 1.0"),
    ({"steps": [{"care": {"name": "../victim"}}]}, "not a plain name"),
    ({"steps": [{"care": {"name": "."}}]}, "not a plain name"),
    ({"steps": [{"care": {"name": "/tmp/x"}}]}, "not a plain name"),
    ({"steps": [{"care": {"name": "a/b"}}]}, "not a plain name"),
    ({"steps": [{"care": {"name": "stats"}}]}, "not a plain name"),
    ({"steps": [{"care": {"name": "m"}}, {"corda": {"name": "m"}}]}, "already used"),
    ({"steps": [{"oscar": {"name": "q"}}, {"eval": {"targets": ["q"]}}]}, "wrote no model"),
    ({"steps": [{"care": {"format": "deepseek-v3", "rope": "keep"}}]}, "needs --rope decoupled"),
    ({"dataset": {"samples": 4}, "steps": [{"care": {}}]}, "unknown key 'dataset'"),
    ({"steps": []}, "no steps"),
    ({"steps": [{"generate": {"target": "mla"}}]}, "not 'original' or an earlier step that wrote a model"),
    ({"steps": [{"oscar": {"name": "q"}}, {"generate": {"target": "q"}}]}, "an earlier step that wrote a model"),
    ({"steps": [{"generate": {"max_new_tokens": 0}}]}, "max_new_tokens 0 must be in 1..4096"),
    ({"steps": [{"generate": {"prompt": 3}}]}, "prompt must be str"),
    ({"steps": [{"care": {"q_lora": "identity"}}]}, "--q-lora identity shapes the DeepSeek-V3 export"),
])
def test_bad_recipes_fail_cleanly(tmp_path, data, fragment):
    with pytest.raises(KvtoolError, match=fragment):
        load_recipe(write(tmp_path, data))


def test_missing_recipe_file_and_bad_override(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    p = write(tmp_path, {"steps": [{"care": {}}]})
    res = runner.invoke(app, ["run", str(p), "--set", "steps.3.care.kv_ratio=1"])
    assert res.exit_code == 2 and "not a step index" in res.output
    res = runner.invoke(app, ["run", str(p), "--set", "steps.0.care.kv_ratio=[1"])
    assert res.exit_code == 2 and "not a valid YAML value" in res.output
    res = runner.invoke(app, ["run", str(p), "--set", "steps.0.care.name=../victim", "--dry-run"])
    assert res.exit_code == 2 and "not a plain name" in res.output


def test_run_care_recipe_then_resume_reuses_statistics(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", head_dim=32, hidden_size=128)
    recipe = write(tmp_path, {
        "model": str(model), "data": {"samples": 4, "seq_len": 64}, "device": "cpu",
        "steps": [{"care": {"name": "mla", "kv_ratio": 0.5}}, {"validate": {"target": "mla"}},
                  {"eval": {"targets": ["original", "mla"], "max_tokens": 512, "seq_len": 128}},
                  {"generate": {"target": "mla", "prompt": "def f(x):", "max_new_tokens": 6}}]})
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(recipe), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    (gen,) = report["generations"]
    assert gen["target"] == "mla" and gen["prompt"] == "def f(x):" and isinstance(gen["text"], str)
    assert "Greedy generation, mla: 'def f(x):'" in (out / "report.md").read_text()
    assert report["steps"][0]["kind"] == "calibrate" and report["steps"][0]["reused"] is False
    assert report["steps"][0]["statistics"] == ["attn_in"]
    assert set(report["perplexity"]) == {"original", "mla"}
    assert report["steps"][2]["report"]["passed"] is True
    assert "| mla | convert-mla |" in (out / "report.md").read_text()
    assert (out / "mla" / "kvtool.json").is_file() and (out / "stats" / "manifest.json").is_file()
    res = runner.invoke(app, ["run", str(recipe), "-o", str(out), "--no-progress",
                              "--set", "steps.0.care.kv_ratio=0.25"])
    assert res.exit_code == 0, res.output
    report2 = json.loads((out / "report.json").read_text())
    assert report2["steps"][0]["reused"] is True
    assert report2["perplexity"]["original"] == pytest.approx(report["perplexity"]["original"])
    res = runner.invoke(app, ["run", str(recipe), "-o", str(out), "--no-progress", "--set", "data.seed=3"])
    assert json.loads((out / "report.json").read_text())["steps"][0]["reused"] is False


def test_ladder_drift_rides_the_one_calibration_pass(tiny_checkpoint, tmp_path):
    """A recipe with a statistics step and a ladder step runs one pass over the source model; the ladder's drift from
    that pass equals a standalone drift pass on the same windows (the recipe's default text, the suite)."""
    from kvtool.calib.drift import layer_drift
    from kvtool.data import TextSource, calibration_windows
    from kvtool.models import load_model

    model = tiny_checkpoint("llama")
    recipe = write(tmp_path, {
        "model": str(model), "data": {"samples": 3, "seq_len": 32, "batch_size": 2}, "device": "cpu",
        "steps": [{"convert-mla": {"name": "mla", "kv_ratio": 0.5}},
                  {"ladder": {"name": "lad", "layers": "auto", "count": 1}}]})
    res = runner.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["kind"] for s in report["steps"]].count("calibrate") == 1
    drift = json.loads((tmp_path / "out" / "lad" / "kvtool.json").read_text())["report"]["drift"]
    loaded = load_model(str(model))
    windows = calibration_windows(loaded.tokenizer, TextSource("suite"), 3, 32, 0, loaded.spec.max_positions)
    alone = layer_drift(loaded, windows, batch_size=2)
    assert [r["layer"] for r in drift] == [0, 1, 2]
    for a, b in zip(drift, alone, strict=True):
        assert a["drift"] == pytest.approx(b["drift"], rel=1e-9)
