"""The CLI: a happy path on a tiny checkpoint and one-line errors with exit code 2 and no partial output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvtool.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, fragment: str, tmp_path, out_name: str | None = None):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error:") and fragment in text, text
    assert len(text.splitlines()) == 1, text
    if out_name:
        assert not (tmp_path / out_name).exists()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_calibrate_then_stats_on_tiny_checkpoint(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    res = run("calibrate", model, "-o", tmp_path / "st", "--samples", 3, "--seq-len", 32, "--statistics", "attn_in,k",
              "--no-progress", "--device", "cpu")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert manifest["tokens"] == 96 and manifest["stats"] == ["attn_in", "k"]
    assert manifest["dataset"]["samples"] == 3 and manifest["model"]["hash"].startswith("sha256:")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    res = run("stats", tmp_path / "st", "--model", model)
    assert res.exit_code == 0 and "matches" in res.output
    res = run("calibrate", model, "-o", tmp_path / "st", "--samples", 3, "--seq-len", 32)
    assert_clean_error(res, "already exists", tmp_path)


def test_nonexistent_model_path(tmp_path):
    assert_clean_error(run("calibrate", tmp_path / "missing", "-o", tmp_path / "st"), "does not exist", tmp_path, "st")


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("eval", "some-owner/some-model")
    assert_clean_error(res, "could not be loaded from the Hugging Face hub (offline or not found)", tmp_path)


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert_clean_error(run("eval", tmp_path / "m"), "no config.json", tmp_path)


def test_unsupported_architecture(tmp_path):
    from transformers import AutoConfig

    d = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2").save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"")
    res = run("calibrate", d, "-o", tmp_path / "st")
    assert_clean_error(res, "unsupported architecture 'gpt2'", tmp_path, "st")
    assert "llama, qwen2, qwen3, mistral" in res.output


def test_seq_len_beyond_context(tiny_checkpoint, tmp_path):
    res = run("calibrate", tiny_checkpoint("llama"), "-o", tmp_path / "st", "--seq-len", 1024, "--device", "cpu")
    assert_clean_error(res, "exceeds the model's context of 256", tmp_path, "st")


def test_fewer_tokens_than_requested(tiny_checkpoint, tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("only a few words of text")
    res = run("calibrate", tiny_checkpoint("llama"), "-o", tmp_path / "st", "--dataset", text, "--samples", 4,
              "--seq-len", 64, "--device", "cpu")
    assert_clean_error(res, "were requested", tmp_path, "st")


def test_unknown_statistic(tmp_path):
    assert_clean_error(run("calibrate", "-o", tmp_path / "st", "--statistics", "foo"), "unknown statistics foo",
                       tmp_path,
                       "st")


def test_mismatched_and_unreadable_statistics(tiny_checkpoint, tmp_path):
    a = tiny_checkpoint("llama")
    res = run("calibrate", a, "-o", tmp_path / "st", "--samples", 2, "--seq-len", 16, "--statistics", "attn_in",
              "--no-progress", "--device", "cpu")
    assert res.exit_code == 0, res.output
    other = tiny_checkpoint("qwen3")
    assert_clean_error(run("stats", tmp_path / "st", "--model", other), "different model", tmp_path)
    (tmp_path / "st" / "stats.safetensors").write_bytes(b"\x00" * 16)
    assert_clean_error(run("stats", tmp_path / "st"), "damaged", tmp_path)
    assert_clean_error(run("stats", tmp_path / "nothing"), "not a statistics folder", tmp_path)


@pytest.mark.parametrize("argv", [["--help"], ["calibrate", "--help"], ["eval", "--help"]])
def test_console_script_help(argv):
    res = subprocess.run([sys.executable, "-m", "kvtool.cli", *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Usage" in res.stdout
