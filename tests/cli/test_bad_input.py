"""Bad input, table-driven: one ``error:`` line, exit code 2, nothing written, inputs never modified or deleted.

Every case runs the real console script in a scratch working directory that holds a tiny model, a statistics
folder and a text file; the test hashes every file under it before and after.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

KVTOOL = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"
ENV = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def kvtool(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([KVTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A working directory with ``model/`` (tiny llama), ``stats/`` (its statistics) and ``notes.txt``."""
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("work")
    work = root / "work"
    (work / "model").mkdir(parents=True)
    tiny_model("llama").save_pretrained(work / "model")
    tiny_tokenizer.save_pretrained(work / "model")
    (work / "notes.txt").write_text("the user's own file\n" * 50)
    res = kvtool(work, "calibrate", "model", "-o", "stats", "--samples", 2, "--seq-len", 32, "--device", "cpu",
                 "--no-progress")
    assert res.returncode == 0, res.stderr
    return work


def _recipe(work: Path, name: str, step_name: str) -> Path:
    p = work.parent / f"{name}.yaml"
    p.write_text(f"model: {work / 'model'}\ndata: {{samples: 2, seq_len: 32}}\ndevice: cpu\n"
                 f"steps:\n  - convert-mla: {{name: '{step_name}'}}\n")
    return p


CASES = [
    # data loss: outputs that are the working directory, an ancestor of it, or an input
    ("o-is-cwd", ["convert-mla", "model", "--stats-dir", "stats", "-o", ".", "--overwrite"], "working directory"),
    ("o-is-parent", ["convert-mla", "model", "--stats-dir", "stats", "-o", "..", "--overwrite"], "working directory"),
    ("o-is-model", ["convert-mla", "model", "--stats-dir", "stats", "-o", "model", "--overwrite"], "the input model"),
    ("o-is-stats", ["convert-mla", "model", "--stats-dir", "stats", "-o", "stats", "--overwrite"], "the input stats"),
    ("calib-o-is-model", ["calibrate", "model", "-o", "model", "--overwrite"], "the input model"),
    ("overwrite-foreign", ["convert-mla", "model", "--stats-dir", "stats", "-o", "mine", "--overwrite"],
     "not written by kvtool"),
    ("exists", ["convert-mla", "model", "--stats-dir", "stats", "-o", "mine"], "already exists"),
    # outputs that cannot be written: refused before loading anything
    ("o-under-file", ["convert-mla", "model", "--stats-dir", "stats", "-o", "notes.txt/out"], "is a file"),
    ("o-read-only", ["convert-mla", "model", "--stats-dir", "stats", "-o", "/proc/kvtool-out"], "choose a writable"),
    ("o-too-long", ["convert-mla", "model", "--stats-dir", "stats", "-o", "x" * 250], "too long"),
    # options
    ("batch-size-0", ["calibrate", "model", "-o", "s2", "--batch-size", "0"], "--batch-size must be > 0"),
    ("batch-size-neg", ["calibrate", "model", "-o", "s2", "--batch-size", "-1"], "--batch-size must be > 0"),
    ("seq-len-1", ["calibrate", "model", "-o", "s2", "--seq-len", "1"], "--seq-len must be >= 2"),
    ("damping-nan", ["convert-mla", "model", "--stats-dir", "stats", "-o", "m2", "--damping", "nan"], "finite"),
    ("corda-damping-nan", ["corda", "model", "--stats-dir", "stats", "-o", "c2", "--damping", "nan"], "finite"),
    ("eval-batch-0", ["eval", "model", "--batch-size", "0"], "--batch-size must be > 0"),
    ("eval-seq-len-1", ["eval", "model", "--seq-len", "1"], "--seq-len must be >= 2"),
    ("eval-max-tokens-neg", ["eval", "model", "--max-tokens", "-5"], "--max-tokens -5 must be >= 0"),
    ("unknown-option", ["convert-mla", "model", "-o", "m3", "--bogus"], "No such option: --bogus"),
    ("bad-layers", ["corda", "model", "--stats-dir", "stats", "-o", "c3", "--layers", "0-99"], "outside the model"),
]


@pytest.mark.parametrize("case,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workdir, case, argv, fragment):
    (workdir / "mine").mkdir(exist_ok=True)
    (workdir / "mine" / "keep.txt").write_text("not kvtool's")
    before = tree_digest(workdir.parent)
    res = kvtool(workdir, *argv)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], res.stderr
    assert tree_digest(workdir.parent) == before
    assert not [p for p in workdir.parent.rglob(".*tmp-*")]


@pytest.mark.parametrize("step_name,fragment", [("../victim", "not a plain name"), (".", "not a plain name"),
                                                 ("/tmp/abs", "not a plain name"), ("stats", "not a plain name")])
def test_recipe_step_names_cannot_reach_outside_the_run_folder(workdir, step_name, fragment):
    (workdir.parent / "victim").mkdir(exist_ok=True)
    (workdir.parent / "victim" / "data.txt").write_text("precious")
    recipe = _recipe(workdir, "bad", step_name)
    before = tree_digest(workdir.parent)
    for extra in ([], ["--dry-run"]):
        res = kvtool(workdir, "run", recipe, "-o", "run", *extra)
        assert res.returncode == 2 and fragment in res.stderr, res.stderr
    assert tree_digest(workdir.parent) == before and not (workdir / "run").exists()


def test_failures_leave_no_empty_parent_folders(workdir):
    for argv in (["convert-mla", "model", "--stats-dir", "stats", "-o", "deep/a/b", "--damping", "nan"],
                 ["convert-mla", "model", "--stats-dir", "model", "-o", "deep/a/b"]):
        res = kvtool(workdir, *argv)
        assert res.returncode == 2 and res.stderr.startswith("error:"), res.stderr
        assert not (workdir / "deep").exists()


def test_recipe_output_may_not_be_the_working_directory(workdir):
    recipe = _recipe(workdir, "ok", "mla")
    before = tree_digest(workdir.parent)
    for out in (".", "model"):
        res = kvtool(workdir, "run", recipe, "-o", out, "--dry-run")
        assert res.returncode == 2 and res.stderr.startswith("error:"), res.stderr
    assert tree_digest(workdir.parent) == before


def test_overwrite_replaces_a_kvtool_output_atomically(workdir):
    args = ["convert-mla", "model", "--stats-dir", "stats", "-o", "mla", "--device", "cpu", "--no-progress"]
    assert kvtool(workdir, *args).returncode == 0
    first = tree_digest(workdir / "mla")
    assert (workdir / "mla" / "generation_config.json").is_file() or "generation_config.json" not in first
    assert oct((workdir / "mla").stat().st_mode & 0o777) != oct(0o700)
    res = kvtool(workdir, *args, "--overwrite", "--kv-ratio", "0.25")
    assert res.returncode == 0, res.stderr
    assert tree_digest(workdir / "mla") != first and not [p for p in workdir.glob(".mla.*")]


def test_killed_write_leaves_a_temporary_that_the_next_run_removes(workdir):
    """SIGKILL part-way through a write leaves a ``.NAME.tmp-PID-*`` folder; the next run removes it, and no input
    changed."""
    before = tree_digest(workdir / "model") | {"stats/" + k: v for k, v in tree_digest(workdir / "stats").items()}
    args = [KVTOOL, "corda", "model", "--stats-dir", "stats", "-o", "killed", "--device", "cpu", "--no-progress",
            "--rank", "4"]
    proc = subprocess.Popen(args, cwd=workdir, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(workdir.glob(".killed.tmp-*")):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not list(workdir.glob(".killed.tmp-*")):  # the write finished before the kill landed: simulate the leftover
        shutil.rmtree(workdir / "killed", ignore_errors=True)
        (workdir / ".killed.tmp-999999-abcd").mkdir()
    shutil.rmtree(workdir / "killed", ignore_errors=True)
    res = kvtool(workdir, *args[1:])
    assert res.returncode == 0, res.stderr
    assert not list(workdir.glob(".killed.tmp-*")) and (workdir / "killed" / "kvtool.json").is_file()
    after = tree_digest(workdir / "model") | {"stats/" + k: v for k, v in tree_digest(workdir / "stats").items()}
    assert after == before


def test_sigterm_removes_the_temporary(workdir):
    proc = subprocess.Popen([KVTOOL, "calibrate", "model", "-o", "termed", "--samples", "1000", "--seq-len", "64",
                             "--device", "cpu", "--no-progress"], cwd=workdir, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (workdir / "termed").exists()
    assert not list(workdir.glob(".termed.tmp-*"))


def test_validate_refuses_in_one_line_what_its_kernels_cannot_run(workdir, tiny_tokenizer):
    """No TRITON_INTERPRET on a CPU, and a rope=keep MLA with head_dim < 32 (the kernel's limit)."""
    assert kvtool(workdir, "convert-mla", "model", "--stats-dir", "stats", "-o", "mla16", "--device", "cpu",
                  "--no-progress").returncode == 0  # the tiny model has head_dim 16
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([KVTOOL, "validate", "mla16", "--device", "cpu"], cwd=workdir, capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "TRITON_INTERPRET=1" in res.stderr, res.stderr
    res = kvtool(workdir, "validate", "mla16", "--device", "cpu")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "head_dim >= 32" in res.stderr, res.stderr


def test_damaged_model_files_are_one_error_line(tmp_path, workdir):
    """A truncated safetensors, weights that do not match config.json, garbage and truncated .gguf files."""
    import json

    bad = {}
    for name in ("trunc", "mismatch"):
        shutil.copytree(workdir / "model", tmp_path / name)
        bad[name] = tmp_path / name
    w = tmp_path / "trunc" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cfg = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "garbage.gguf").write_bytes(os.urandom(4096))
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    for model, fragment in ((bad["trunc"], "damaged"), (bad["mismatch"], "does not match its config.json"),
                            (tmp_path / "garbage.gguf", "not a GGUF file"), (tmp_path / "short.gguf", "truncated")):
        res = kvtool(tmp_path, "eval", model, "--max-tokens", "64", "--seq-len", "32", "--device", "cpu")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and fragment in res.stderr, res.stderr


def test_gguf_of_another_architecture_is_refused_before_dequantizing(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    env = {**ENV, "KVTOOL_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([KVTOOL, "eval", str(path), "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unsupported architecture 'gemma3'" in res.stderr
    assert not list((tmp_path / "cache").glob("models/*"))


def test_cache_lists_and_clears(tmp_path):
    import json

    env = {**ENV, "KVTOOL_CACHE": str(tmp_path / "cache")}
    (tmp_path / "cache" / "models" / "m").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "m" / "w.safetensors").write_bytes(b"x" * 2048)
    listing = json.loads(subprocess.run([KVTOOL, "cache", "--json"], capture_output=True, text=True, env=env).stdout)
    assert listing["total_bytes"] == 2048 and listing["entries"][0]["path"].endswith("models/m")
    subprocess.run([KVTOOL, "cache", "--clear"], capture_output=True, text=True, env=env, check=True)
    assert not (tmp_path / "cache").exists()
