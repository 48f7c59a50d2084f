"""Identity: model hashes that cannot be fooled, statistics reused only for the same text, same bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from kvtool.cli import app

runner = CliRunner()
KVTOOL = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"


def test_model_hash_sees_a_rewrite_with_the_same_size_and_mtime(tmp_path, monkeypatch):
    from kvtool.models import files_digest

    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 4096)
    first = files_digest([f])
    st = f.stat()
    f.write_bytes(b"b" * 4096)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert files_digest([f]) != first


def test_recipe_recalibrates_when_the_text_file_changes(tiny_checkpoint, tmp_path):
    from kvtool.data import embedded_text

    text = tmp_path / "corpus.txt"
    text.write_text(embedded_text("calib")[:60_000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_checkpoint("llama")), "device": "cpu",
        "data": {"dataset": str(text), "samples": 2, "seq_len": 32},
        "steps": [{"convert-mla": {"name": "mla"}}]}))
    out = tmp_path / "run"

    def reused() -> bool:
        res = runner.invoke(app, ["run", str(recipe), "-o", str(out), "--no-progress"])
        assert res.exit_code == 0, res.output
        return json.loads((out / "report.json").read_text())["steps"][0]["reused"]

    assert reused() is False
    assert reused() is True
    st = text.stat()
    text.write_text(embedded_text("calib")[60_000:120_000])  # new content, same path
    os.utime(text, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reused() is False


def test_same_command_same_bytes(tiny_checkpoint, tmp_path):
    """Statistics and an OSCAR export written twice by the same command are byte-identical."""
    model = tiny_checkpoint("llama")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for i in (1, 2):
        for argv in (["calibrate", model, "-o", tmp_path / f"s{i}", "--samples", 2, "--seq-len", 32],
                     ["export", model, "--stats-dir", tmp_path / "s1", "-o", tmp_path / f"o{i}", "--kv-samples", 1,
                      "--seq-len", 32, "--group-size", 8, "--sink", 4, "--residual-window", 8]):
            res = subprocess.run([KVTOOL, *map(str, argv), "--device", "cpu", "--no-progress"], capture_output=True,
                                 text=True, env=env, timeout=300)
            assert res.returncode == 0, res.stderr
    for a, b in (("s1", "s2"), ("o1", "o2")):
        files = sorted(p.name for p in (tmp_path / a).iterdir())
        assert files == sorted(p.name for p in (tmp_path / b).iterdir())
        for name in files:
            assert (tmp_path / a / name).read_bytes() == (tmp_path / b / name).read_bytes(), name
