"""``kvtool run``: a YAML recipe (one calibration pass, then methods, validation and evaluation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def run_(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).")],
    output: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "-o", "--output", help="Output folder (default: the recipe's `output`, else out/<recipe name>).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--set", help="Override a recipe key, e.g. --set data.samples=4 --set steps.0.convert-mla.kv_ratio=0.25."
    )] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the recipe and print the plan (steps, "
                                                           "statistics, memory) without running it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report (or plan) as JSON on stdout.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Run a recipe: one calibration pass for all steps' statistics, then methods, validation and eval.

    Examples:
      kvtool run recipes/care-smoke.yaml
      kvtool run recipes/care-smoke.yaml --set data.samples=8 --dry-run
    Statistics saved in OUT/stats are reused when rerun with the same model and data.
    """
    from kvtool.checkpoint import check_output_location, local_input
    from kvtool.commands.console import console, print_json, print_table
    from kvtool.errors import KvtoolError
    from kvtool.recipe import load_recipe, plan, preflight, report_markdown, run_recipe

    rec = load_recipe(recipe, set_)
    out = output or Path(rec.output or Path("out") / recipe.stem)
    check_output_location(out, (local_input(rec.model), local_input(rec.data.dataset), recipe))
    if dry_run:
        from kvtool.models import arch_spec_from_config, resolve_model_path

        spec = None
        try:
            directory, _, _ = resolve_model_path(rec.model)
        except KvtoolError as exc:
            directory = None
            console.print(f"note: {exc} (no shape checks or memory estimate; the run itself will fail until it "
                          "exists)", highlight=False, markup=False)
        if directory is not None:
            from transformers import AutoConfig

            spec = arch_spec_from_config(AutoConfig.from_pretrained(str(directory)))
            preflight(rec, spec)
        p = plan(rec, spec)
        if as_json:
            print_json(p)
            return
        rows = [["0", "calibrate", f"{','.join(p['statistics']) or '(none)'} on {p['data']['dataset']}"]]
        rows += [[str(i), f"{st['kind']}: {st['name']}", json.dumps(st["options"])] for i, st in
                 enumerate(p["steps"], 1)]
        notes = [f"estimated {k}: {v / 2**20:.0f} MiB" for k, v in p["estimated_peak_bytes"].items()]
        print_table(f"plan for {recipe} -> {out}", ["#", "step", "options"], rows, notes)
        return
    report = run_recipe(rec, out, progress=progress)
    if as_json:
        print_json(report)
        return
    sys.stdout.write(report_markdown(report))
    sys.stdout.write(f"wrote {out}/report.json and {out}/report.md\n")
