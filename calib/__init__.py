"""kvtool.calib: activation statistics (second moments) per decoder layer."""

from kvtool.calib.collect import collect_statistics, collect_statistics_full_forward
from kvtool.calib.stats import ALL_STATS, DEFAULT_STATS, StatsStore, parse_stats

__all__ = ["ALL_STATS", "DEFAULT_STATS", "StatsStore", "collect_statistics", "collect_statistics_full_forward",
           "parse_stats"]
