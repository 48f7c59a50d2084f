"""Typer parameters built from :class:`kvtool.options.Options` dataclasses, and the options every verb shares."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvtool.options import Options, _base_types, flag_name

MODEL_HELP = "Model: 'smollm2-135m' (embedded, default), a checkpoint folder, a .gguf file, or a hub id."
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (cuda when available)."
DTYPE_HELP = "auto (the source's dtype), float32, bfloat16 or float16."


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def options_params(cls: type[Options], defaults: dict[str, Any] | None = None,
                   skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per field of ``cls`` (``--kv-ratio``; booleans as ``--x/--no-x``)."""
    hints = cls.hints()
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        members, nullable = _base_types(hints[f.name])
        tp = members[0]
        default = (defaults or {}).get(f.name, f.default)
        decl = f"{flag_name(f.name)}/--no-{f.name.replace('_', '-')}" if tp is bool else flag_name(f.name)
        help_ = f.metadata.get("help", "")
        if f.metadata.get("choices") and tp is not bool:
            help_ += f" [{'|'.join(map(str, f.metadata['choices']))}]"
        ann = Annotated[Optional[tp] if nullable else tp, typer.Option(decl, help=help_)]  # noqa: UP045
        params.append(_param(f.name, ann, default))
    return params


def common_params(*, output_help: str | None = None, stats_dir: bool = False, json_help: str = "Print the result "
                  "as JSON on stdout.") -> list[inspect.Parameter]:
    """MODEL, -o, --stats-dir, --device, --dtype, --overwrite, --json, --progress (as the verb needs them)."""
    params = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                annotation=Annotated[Optional[str], typer.Argument(help=MODEL_HELP)])]  # noqa: UP045
    if output_help:
        params.append(_param("output", Annotated[Path, typer.Option("-o", "--output", help=output_help)], ...))
    if stats_dir:
        params.append(_param("stats_dir", Annotated[Optional[Path], typer.Option(  # noqa: UP045
            "--stats-dir", help="Statistics folder from `kvtool calibrate` (default: calibrate now on "
            "--dataset). Text options left at their defaults then follow the windows the statistics recorded.")],
            None))
    params += [
        _param("device", Annotated[str, typer.Option("--device", help=DEVICE_HELP)], "auto"),
        _param("dtype", Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)], "auto"),
    ]
    if output_help:
        params.append(_param("overwrite", Annotated[bool, typer.Option(
            "--overwrite", help="Replace an existing output folder that kvtool wrote.")], False))
    params += [
        _param("as_json", Annotated[bool, typer.Option("--json", help=json_help)], False),
        _param("progress", Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")],
               True),
    ]
    return params


def make_command(fn: Any, params: list[inspect.Parameter], name: str, doc: str) -> Any:
    """Give ``fn(**kwargs)`` the signature typer reads."""
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    fn.__name__ = name.replace("-", "_")
    fn.__doc__ = keep_layout(doc)
    return fn


def keep_layout(doc: str) -> str:
    """A --help text whose paragraphs after the first keep their line breaks (click's ``\\b`` marker)."""
    first, *rest = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join([first, *("\b\n" + p for p in rest)])


def split_values(values: dict[str, Any], cls: type[Options]) -> dict[str, Any]:
    """The entries of ``values`` that are fields of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}
