"""One verb per registered method, built from its Options: ``kvtool convert-mla``, ``corda``, ``export``, ``ladder``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from kvtool.commands.options import common_params, make_command, options_params, split_values
from kvtool.methods.base import Method, RunContext
from kvtool.options import DataOptions


def register(app: typer.Typer, method: Method) -> None:
    """Add ``kvtool <method.name>`` to ``app``."""
    from kvtool.commands.console import fails_cleanly

    params = common_params(output_help="Output folder (written atomically).", stats_dir=True)
    params += options_params(DataOptions, method.data_defaults)
    params += options_params(method.Options)

    def command(**values: Any) -> None:
        run_verb(method, values)

    app.command(method.name)(fails_cleanly(make_command(command, params, method.name, method.help)))


def run_verb(method: Method, values: dict[str, Any]) -> None:
    """What every method verb does: check everything checkable, load, get statistics, run, summarize."""
    from kvtool.calib.stats import recorded_dataset
    from kvtool.checkpoint import check_output_dir, local_input
    from kvtool.commands.console import print_json, print_table
    from kvtool.device import resolve_device
    from kvtool.methods.base import statistics_for
    from kvtool.models import load_model

    opts = method.Options(**split_values(values, method.Options))
    opts.check_fields("cli")
    data = DataOptions(**split_values(values, DataOptions))
    data.check_fields("cli")
    method.preflight(None, opts)
    output: Path = values["output"]
    stats_dir = values.get("stats_dir")
    if stats_dir is not None:
        data = data.following(recorded_dataset(stats_dir), method.data_defaults)
    method.check_data(opts, data)
    inputs = (local_input(values["model"]), stats_dir, local_input(data.dataset))
    check_output_dir(output, values["overwrite"], inputs)
    device = resolve_device(values["device"])
    loaded = load_model(values["model"], dtype=values["dtype"], device="cpu", strict=not method.acts_on_output)
    if not method.acts_on_output:
        method.preflight(loaded.spec, opts)
    if hasattr(method, "check_model"):
        method.check_model(loaded, opts)
    needed = method.required_stats(opts)
    visitors = method.visitors(opts)
    store = statistics_for(loaded, needed, stats_dir, data, device=device, progress=values["progress"],
                           visitors=list(visitors.values()))
    ctx = RunContext(device=device, dtype=values["dtype"], data=data, overwrite=values["overwrite"],
                     progress=values["progress"], inputs=inputs, release_statistics=True, consume_model=True,
                     visitors=visitors)
    t0 = time.perf_counter()
    report = method.run(loaded, store, output, opts, ctx)
    if values["as_json"]:
        print_json({"output": str(output), "seconds": round(time.perf_counter() - t0, 3), "report": report})
        return
    print_table(*method.summary(report, output))
