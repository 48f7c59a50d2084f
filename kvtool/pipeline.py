"""Glue shared by the transform commands: get the statistics a transform needs, from a folder or on the fly."""

from __future__ import annotations

from pathlib import Path

from kvtool.calib import StatsStore, collect_statistics
from kvtool.data import TextSource, calibration_windows
from kvtool.models import LoadedModel


def statistics_for(loaded: LoadedModel, names: tuple[str, ...], stats_dir: str | Path | None = None, *,
                   dataset: str = "embedded", samples: int = 32, seq_len: int = 512, seed: int = 0,
                   device: str = "cpu", batch_size: int = 8, progress: bool = True) -> StatsStore:
    """Load statistics from ``stats_dir`` (checked against the model and the needed names) or collect them now."""
    if stats_dir is not None:
        store = StatsStore.load(stats_dir)
        store.require(names, loaded.spec.num_layers, loaded.model_hash)
        return store
    windows = calibration_windows(loaded.tokenizer, TextSource(dataset), samples, seq_len, seed,
                                  loaded.spec.max_positions)
    store = collect_statistics(loaded, windows, names, device=device, batch_size=batch_size, progress=progress)
    store.meta = {"model": loaded.identity(), "dataset": {"dataset": dataset, "split": "calib", "samples": samples,
                                                          "seq_len": seq_len, "seed": seed},
                  "tokens": int(windows.numel())}
    return store
