"""``kvtool validate OUT``: dispatch to the validator of whatever transform wrote OUT.

Each transform registers a validator under the ``command`` name it writes into ``kvtool.json``. A validator runs
the converted model's hot path through the transform's Triton kernel, compares with the PyTorch path, and returns
a report dict with at least ``passed`` (bool) and the measured errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError

Validator = Callable[[Path, dict[str, Any], dict[str, Any]], dict[str, Any]]
VALIDATORS: dict[str, Validator] = {}


def register_validator(command: str) -> Callable[[Validator], Validator]:
    """Decorator: ``@register_validator("convert-mla")`` on ``fn(out_dir, manifest, options) -> report``."""
    def deco(fn: Validator) -> Validator:
        VALIDATORS[command] = fn
        return fn
    return deco


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The ``kvtool.json`` of an output folder (clear error if absent or unreadable)."""
    path = Path(out).expanduser() / "kvtool.json"
    if not path.is_file():
        raise KvtoolError(f"{out} has no kvtool.json: give a folder written by a kvtool transform")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise KvtoolError(f"{path} is not valid JSON: rewrite the output with the transform") from exc


def validate(out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the validator registered for the transform that wrote ``out``."""
    import kvtool.commands

    kvtool.commands.load_all()  # command modules register their validators
    manifest = read_manifest(out)
    command = manifest.get("command")
    if command not in VALIDATORS:
        raise KvtoolError(f"no validator for outputs of {command!r} (known: {', '.join(sorted(VALIDATORS)) or 'none'})")
    return VALIDATORS[command](Path(out), manifest, options or {})
