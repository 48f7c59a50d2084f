"""kvtool.convert: transforms, each a pure function (weights, statistics, options) -> (new weights, report)."""
