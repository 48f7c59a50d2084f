"""The CLI's shape: one vocabulary across verbs, lazy start-up, one-line usage errors, recipes that preflight."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from kvtool.cli import app
from kvtool.methods import METHODS

KVTOOL = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DATA_FLAGS = {"--dataset", "--text-field", "--split", "--samples", "--seq-len", "--seed", "--batch-size"}


def flags_of(verb: str) -> set[str]:
    cmd = typer.main.get_command(app).commands[verb]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("verb", ["calibrate", *METHODS])
def test_every_text_reading_verb_has_the_same_data_flags_and_json(verb):
    flags = flags_of(verb)
    assert DATA_FLAGS <= flags and {"--json", "--device", "--dtype", "--progress"} <= flags, flags
    if verb != "calibrate":
        assert "--stats-dir" in flags and "--statistics" not in flags and "--stats" not in flags
    assert "--damp" not in flags and "--calib-seed" not in flags


def test_calibrate_names_statistics_with_statistics():
    assert "--statistics" in flags_of("calibrate") and "--stats-dir" not in flags_of("calibrate")


def test_help_is_fast_and_imports_no_torch():
    t0 = time.perf_counter()
    res = subprocess.run([KVTOOL, "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0 and "convert-mla" in res.stdout
    assert seconds < 5.0, seconds  # loose guard; ~0.2 s on the CI machine
    code = ("import sys; sys.argv[0] = 'kvtool'; import kvtool.cli; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["False", "False"], res.stdout + res.stderr


def test_version():
    from kvtool import __version__

    res = subprocess.run([KVTOOL, "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"kvtool {__version__}"


@pytest.mark.parametrize("argv,fragment", [
    (["convert-mla", "-o", "x", "--bogus"], "No such option: --bogus"),
    (["convert-mla", "-o", "x", "--kv-ratio", "half"], "Invalid value for '--kv-ratio'"),
    (["calibrate"], "Missing option '-o'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_error_line(tmp_path, argv, fragment):
    res = subprocess.run([KVTOOL, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], res.stderr
    assert not list(tmp_path.iterdir())


def _tiny_llama31(tmp_path: Path, tiny_tokenizer) -> Path:
    """A 2-layer model with Llama-3.1-8B's attention shapes and rope type (llama3 scaling)."""
    from conftest import tiny_model

    model = tiny_model("llama", num_hidden_layers=2, hidden_size=256, intermediate_size=128, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    out = tmp_path / "llama31"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*-8b.yaml")))
def test_8b_recipes_preflight_on_a_tiny_model_of_their_shape(recipe, tmp_path, tiny_tokenizer):
    """What `--dry-run` checks for an 8B recipe also passes on a same-architecture, same-rope tiny model, so the run
    cannot fail after calibrating on something checkable before."""
    from transformers import AutoConfig

    from kvtool.models import arch_spec_from_config
    from kvtool.recipe import load_recipe, preflight

    model = _tiny_llama31(tmp_path, tiny_tokenizer)
    spec = arch_spec_from_config(AutoConfig.from_pretrained(str(model)))
    assert spec.rope_type == "llama3" and spec.head_dim == 128 and spec.num_kv_heads == 8
    preflight(load_recipe(RECIPES / recipe, [f"model={model}"]), spec)
