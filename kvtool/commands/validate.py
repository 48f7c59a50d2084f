"""``kvtool validate``: run a converted model's hot path through its Triton kernel and compare with PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtool.commands.options import DEVICE_HELP


def validate_(
    output: Annotated[Path, typer.Argument(help="An output folder written by a kvtool method.")],
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Run a converted model's hot path through its Triton kernel and compare with the PyTorch path.

    Example: TRITON_INTERPRET=1 kvtool validate out/mla --device cpu   (kernels in Triton's interpreter on a CPU)
    """
    from kvtool.commands.console import error, print_json, print_table
    from kvtool.device import resolve_device
    from kvtool.methods import validate

    report = validate(output, {"device": resolve_device(device)})
    if as_json:
        print_json(report)
    else:
        print_table(f"validate {output}", ["check", "value"],
                    [[k, f"{v:.3e}" if isinstance(v, float) else str(v)] for k, v in report.items()])
    if not report.get("passed", False):
        error("validation failed: kernel and PyTorch outputs differ beyond tolerance")
        raise typer.Exit(1)
