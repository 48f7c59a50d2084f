"""The method registry: CLI verbs, ``kvtool run`` recipe steps, ``kvtool validate`` and benches dispatch here.

One module per method (its Options, statistics, run, output format, validation). Importing this package is cheap
(no torch): heavy imports happen inside the methods' functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError
from kvtool.methods.base import Method, RunContext, statistics_for
from kvtool.methods.care import ConvertMla
from kvtool.methods.corda import Corda
from kvtool.methods.heal import Heal
from kvtool.methods.ladder import Ladder
from kvtool.methods.oscar import Export

METHODS: dict[str, Method] = {m.name: m for m in (ConvertMla(), Corda(), Export(), Ladder(), Heal())}
ALIASES: dict[str, str] = {a: m.name for m in METHODS.values() for a in m.aliases}


def get_method(name: str) -> Method:
    """The method registered under ``name`` (or a documented alias)."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise KvtoolError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[key]


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The ``kvtool.json`` of an output folder (clear error if absent or unreadable)."""
    path = Path(out).expanduser() / "kvtool.json"
    if not path.is_file():
        raise KvtoolError(f"{out} has no kvtool.json: give a folder written by a kvtool method")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise KvtoolError(f"{path} is not valid JSON: rewrite the output with its method") from exc


def validate(out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the kernel validation of the method that wrote ``out``."""
    import os

    from kvtool.checkpoint import verify_checksums

    options = options or {}
    manifest = read_manifest(out)
    command = manifest.get("command")
    if command not in METHODS:
        raise KvtoolError(f"no validator for outputs of {command!r} (known: {', '.join(METHODS)})")
    if not str(options.get("device", "cpu")).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise KvtoolError("validating on the CPU runs the Triton kernels in Triton's interpreter: rerun as "
                          "`TRITON_INTERPRET=1 kvtool validate OUT --device cpu` (or use --device cuda)")
    verify_checksums(Path(out))
    return METHODS[command].validate(Path(out), manifest, options)


__all__ = ["ALIASES", "METHODS", "Method", "RunContext", "get_method", "read_manifest", "run_method", "statistics_for",
           "validate"]


def run_method(name: str, loaded: Any, store: Any, out: str | Path, *, device: str = "cpu", dtype: str = "auto",
               data: Any = None, overwrite: bool = False, progress: bool = False, **options: Any) -> dict[str, Any]:
    """Run a method from Python (tests, benches): options by keyword, as in a recipe step; returns the report."""
    from kvtool.options import DataOptions

    method = get_method(name)
    opts = method.Options.from_dict(options, name)
    ctx = RunContext(device=device, dtype=dtype, data=data or DataOptions(**method.data_defaults),
                     overwrite=overwrite, progress=progress)
    return method.run(loaded, store, Path(out), opts, ctx)
