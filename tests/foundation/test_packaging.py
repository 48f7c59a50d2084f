"""The card's top-level folders (calib/, convert/, kernels/) never shadow another distribution's top-level package
(Hugging Face's ``kernels``, which transformers imports), run from the repository root, from an editable install and
from a built wheel."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMPORTS = ("import kvtool, transformers, kernels, kvtool.kernels.mla_decode, kvtool.calib.collect, "
           "kvtool.convert.care; import transformers.integrations.hub_kernels")


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _run(code: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(extra_path) if extra_path else ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_python_c_in_the_root_imports_the_other_kernels_package(tmp_path):
    """``python -c`` puts the root first on sys.path: ``kernels`` must still be the installed one."""
    extra = None
    if not _hf_kernels_installed():  # stand in for Hugging Face's kernels with a module of that name
        extra = tmp_path / "site"
        extra.mkdir()
        (extra / "kernels.py").write_text("MARK = 'another distribution'\n")
    code = (f"{IMPORTS}; import os; f = os.path.realpath(kernels.__file__); "
            f"assert not f.startswith({str(ROOT / 'kernels')!r}), f; "
            "assert os.path.realpath(kvtool.kernels.mla_decode.__file__).endswith('mla_decode.py'); print('ok')")
    res = _run(code, ROOT, extra)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.parametrize("folder", ["calib", "convert", "kernels"])
def test_card_folders_are_not_regular_top_level_packages(folder):
    assert not (ROOT / folder / "__init__.py").exists()
    assert (ROOT / folder).is_dir()


def test_cli_entry_runs_from_the_root():
    res = subprocess.run([sys.executable, "-m", "kvtool.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "convert-mla" in res.stdout, res.stderr[-3000:]


def test_a_built_wheel_installs_the_folders_as_kvtool_subpackages(tmp_path):
    """Non-editable install: the wheel holds kvtool/calib, kvtool/convert, kvtool/kernels and nothing top-level
    besides kvtool; imported from elsewhere, kvtool comes from the install, not the checkout."""
    import zipfile

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", str(ROOT), "-w", str(tmp_path / "wheel")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if res.returncode and "No module named" in res.stderr:
        pytest.skip(f"no build backend in this environment: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("kvtool-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"kvtool"}, tops
    for sub in ("calib/collect.py", "convert/care.py", "kernels/mla_decode.py"):
        assert f"kvtool/{sub}" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (f"{IMPORTS}; import os; assert os.path.realpath(kvtool.kernels.mla_decode.__file__).startswith("
            f"{str(site)!r}); assert os.path.realpath(kvtool.__file__).startswith({str(site)!r}); print('ok')")
    res = _run(code, tmp_path, site)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
