"""``kvtool stats``: summarize a statistics folder and check it belongs to a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def stats_(
    directory: Annotated[Path, typer.Argument(help="A statistics folder written by `kvtool calibrate`.")],
    model: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--model", help="Check that the statistics were collected on this model (same weights hash).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Summarize a statistics folder and optionally check it matches a model.

    Example: kvtool stats stats/ --model smollm2-135m
    """
    from kvtool.calib.stats import StatsStore
    from kvtool.commands.console import print_json, print_table

    store = StatsStore.load(directory)
    if model is not None:
        from kvtool.models import load_model

        loaded = load_model(model)
        store.require(store.names(), loaded.spec.num_layers, loaded.model_hash)
    rows = []
    for name in store.names():
        layers = [i for i in store.layers() if store.has(i, name)]
        rows.append([name, "x".join(map(str, store.sum(layers[0], name).shape)), str(len(layers)),
                     str(store.count(layers[0], name))])
    meta = store.meta
    if as_json:
        print_json({"statistics": {r[0]: {"shape": r[1], "layers": int(r[2]), "tokens": int(r[3])} for r in rows},
                    "model": meta.get("model"), "dataset": meta.get("dataset"), "matches": model})
        return
    notes = [f"model: {meta.get('model', {}).get('source')}  hash: {meta.get('model', {}).get('hash')}",
             f"dataset: {meta.get('dataset')}"] + ([f"matches {model}"] if model else [])
    print_table(f"statistics in {directory}", ["statistic", "shape", "layers", "tokens"], rows, notes)
