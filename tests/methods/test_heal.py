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
])
def test_bad_heal_input_is_one_error_line(converted, tiny_tokenizer, tmp_path, args, fragment):
    from conftest import tiny_model

    other = converted / "other"
    if not other.exists():
        tiny_model("llama", seed=5, head_dim=16).save_pretrained(other)
        tiny_tokenizer.save_pretrained(other)
    argv = [a.format(src=converted / "src", keep=converted / "keep", other=other) for a in args]
    res = subprocess.run([KVTOOL, "heal", *argv, "-o", str(tmp_path / "o"), *SMALL], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and fragment in res.stderr, res.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
