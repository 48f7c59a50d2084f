"""kvtool heal: layer-wise healing lowers each converted layer's output error; outputs load; bad input is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvtool.cli import app

runner = CliRunner()
KVTOOL = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"
SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--no-progress"]


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer):
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("heal")
    tiny_model("llama", head_dim=16).save_pretrained(root / "src")
    tiny_tokenizer.save_pretrained(root / "src")
    run("calibrate", root / "src", "-o", root / "stats", *SMALL)
    run("convert-mla", root / "src", "--stats-dir", root / "stats", "-o", root / "keep", "--kv-ratio", "0.5", *SMALL)
    run("convert-mla", root / "src", "--stats-dir", root / "stats", "-o", root / "ds", "--format", "deepseek-v3",
        "--kv-ratio", "0.5", *SMALL)
    run("ladder", root / "src", "-o", root / "ladder", "--layers", "1-2", "--no-drift", *SMALL)
    return root


@pytest.mark.parametrize("name", ["keep", "ds"])
def test_heal_lowers_every_layers_error_and_writes_a_loadable_checkpoint(converted, name):
    out = converted / f"{name}-healed"
    run("heal", converted / name, "--teacher", converted / "src", "-o", out, "--steps", "30", "--lr", "2e-4", *SMALL)
    manifest = json.loads((out / "kvtool.json").read_text())
    rows = manifest["healing"]["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["loss_after"] < 0.7 * r["loss_before"], r
        assert len(r["curve"]) == 30
    assert manifest["healing"]["data"]["split"] == "calib" and (out / "healing.png").stat().st_size > 1000
    assert manifest["command"] == "convert-mla"  # same format as the input: validate/eval treat it the same way
    res = runner.invoke(app, ["eval", str(out), "--max-tokens", "128", "--seq-len", "32", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert torch.isfinite(torch.tensor(json.loads(res.output)["perplexity"]))


def test_heal_fits_only_the_ladder_layers_and_keeps_the_wiring(converted):
    out = converted / "ladder-healed"
    run("heal", converted / "ladder", "--teacher", converted / "src", "-o", out, "--steps", "30", "--lr", "1e-3",
        *SMALL)
    manifest = json.loads((out / "kvtool.json").read_text())
    rows = manifest["healing"]["layers"]
    assert [r["layer"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss_after"] < 0.7 * r["loss_before"], r
    from safetensors.torch import load_file

    before, after = load_file(converted / "ladder" / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k.split(".")[2] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1", "2"}, changed  # layer 0, embeddings and head untouched
    assert json.loads((out / "config.json").read_text())["ladder_layers"] == [1, 2]
    res = runner.invoke(app, ["eval", str(out), "--max-tokens", "128", "--seq-len", "32", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output


def test_heal_reads_only_calibration_text(converted, tiny_tokenizer):
    """Every window heal fitted on (the default text: the evaluation suite's mixture) is a slice of one domain's
    calibration part, never of any domain's held-out part that `kvtool eval --dataset suite` scores. (Whole windows:
    the embedded docs repeat some sentences across their disjoint documents.)"""
    from kvtool.data import DOMAINS, TextSource, calibration_windows, load_text, tokenize

    out = converted / "keep-healed"
    if not out.exists():
        run("heal", converted / "keep", "--teacher", converted / "src", "-o", out, "--steps", "5", *SMALL)
    data = json.loads((out / "kvtool.json").read_text())["healing"]["data"]
    assert data["split"] == "calib" and data["dataset"] == "suite" and list(data["parts"]) == list(DOMAINS)
    source = TextSource(data["dataset"], data["split"], data["text_field"])
    windows = calibration_windows(tiny_tokenizer, source, data["samples"], data["seq_len"], data["seed"])

    def as_bytes(t: torch.Tensor) -> bytes:
        return t.to(torch.int32).numpy().tobytes()

    held = [as_bytes(tokenize(load_text(TextSource(d, "heldout")), tiny_tokenizer)) for d in DOMAINS]
    calib = {d: as_bytes(tokenize(load_text(TextSource(d, "calib")), tiny_tokenizer)) for d in ("embedded", "code")}
    prose_calib, prose_held = load_text(TextSource("prose", "calib")), load_text(TextSource("prose", "heldout"))
    for w in windows:
        assert not any(as_bytes(w) in h for h in held)
        if not any(as_bytes(w) in c for c in calib.values()):  # prose: as text (3.8 M characters of calibration)
            inner = tiny_tokenizer.decode(w)[4:-4]
            assert inner in prose_calib and inner not in prose_held


@pytest.mark.parametrize("verb", ["convert-mla", "ladder"])
def test_heal_steps_option_heals_the_output_in_one_go(converted, verb):
    out = converted / f"{verb}-heal-steps"
    extra = ["--stats-dir", converted / "stats", "--kv-ratio", "0.5"] if verb == "convert-mla" else [
        "--layers", "1-2", "--no-drift"]
    res = run(verb, converted / "src", "-o", out, *extra, "--heal-steps", "4", *SMALL)
    assert "healed" in res.output and "steps on" in res.output
    manifest = json.loads((out / "kvtool.json").read_text())
    assert manifest["command"] == verb and manifest["options"]["heal_steps"] == 4
    assert [len(r["curve"]) for r in manifest["healing"]["layers"]] == ([4, 4, 4] if verb == "convert-mla" else [4, 4])
    assert (out / "healing.png").exists() and sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    from safetensors.torch import load_file

    plain = load_file(converted / ("keep" if verb == "convert-mla" else "ladder") / "model.safetensors")
    healed = load_file(out / "model.safetensors")
    assert plain.keys() == healed.keys() and any(not torch.equal(plain[k], healed[k]) for k in plain)
    res = runner.invoke(app, ["eval", str(out), "--max-tokens", "128", "--seq-len", "32", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output


def test_fit_attention_lowers_every_layers_attention_error(converted):
    out = converted / "keep-healed-attention"
    run("heal", converted / "keep", "--teacher", converted / "src", "-o", out, "--steps", "30", "--lr", "2e-4",
        "--fit", "attention", *SMALL)
    healing = json.loads((out / "kvtool.json").read_text())["healing"]
    assert healing["fit"] == "relative error of the attention output" and len(healing["layers"]) == 3
    for r in healing["layers"]:
        assert r["loss_after"] < 0.7 * r["loss_before"], r


def test_healed_deepseek_export_loads_in_stock_transformers(converted):
    out = converted / "ds-healed"
    if not out.exists():
        run("heal", converted / "ds", "--teacher", converted / "src", "-o", out, "--steps", "5", *SMALL)
    code = (f"from transformers import AutoModelForCausalLM; import sys; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            f"assert 'kvtool' not in sys.modules; print(type(m).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "DeepseekV3ForCausalLM", res.stderr[-2000:]


def test_heal_is_deterministic(converted):
    for i in (1, 2):
        run("heal", converted / "keep", "--teacher", converted / "src", "-o", converted / f"det{i}", "--steps", "5",
            *SMALL)
    a = json.loads((converted / "det1" / "kvtool.json").read_text())
    b = json.loads((converted / "det2" / "kvtool.json").read_text())
    assert a["checksums"]["model.safetensors"] == b["checksums"]["model.safetensors"]


@pytest.mark.parametrize("args,fragment", [
    (["{src}", "--teacher", "{src}"], "was not written by kvtool"),
    (["{keep}", "--teacher", "{other}"], "is not the model"),
    (["{keep}"], "needs the source model"),
    (["{keep}", "--teacher", "{src}", "--steps", "0"], "--steps must be > 0"),
    (["{keep}", "--teacher", "{src}", "--lr", "0"], "--lr must be > 0"),
    (["{keep}", "--teacher", "{src}", "--lr", "-1"], "--lr must be > 0"),
    (["{ladder}", "--teacher", "{src}", "--fit", "attention"], "--fit attention is for convert-mla"),
    (["{keep}", "--teacher", "{src}", "--fit", "mlp"], "--fit"),
])
def test_bad_heal_input_is_one_error_line(converted, tiny_tokenizer, tmp_path, args, fragment):
    from conftest import tiny_model

    other = converted / "other"
    if not other.exists():
        tiny_model("llama", seed=5, head_dim=16).save_pretrained(other)
        tiny_tokenizer.save_pretrained(other)
    argv = [a.format(src=converted / "src", keep=converted / "keep", other=other, ladder=converted / "ladder")
            for a in args]
    res = subprocess.run([KVTOOL, "heal", *argv, "-o", str(tmp_path / "o"), *SMALL], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and fragment in res.stderr, res.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_heal_refuses_held_out_text(converted, tmp_path):
    res = subprocess.run([KVTOOL, "heal", str(converted / "keep"), "--teacher", str(converted / "src"), "-o",
                          str(tmp_path / "o"), "--split", "heldout", *SMALL], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "calibration text only" in res.stderr and not (tmp_path / "o").exists()
