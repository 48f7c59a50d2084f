"""kvtool.calib: every pass over the *source* model on calibration text (layer-by-layer runner and its visitors:
second moments, OSCAR K/V samples, Ladder drift)."""

from kvtool.calib.collect import calibrate, collect_statistics, collect_statistics_full_forward
from kvtool.calib.runner import LayerVisitor, run_layers
from kvtool.calib.stats import ALL_STATS, DEFAULT_STATS, StatsStore, parse_stats

__all__ = ["ALL_STATS", "DEFAULT_STATS", "LayerVisitor", "StatsStore", "calibrate", "collect_statistics",
           "collect_statistics_full_forward", "parse_stats", "run_layers"]
