"""Typed options: one dataclass per method is the single source of its CLI flags, recipe keys and validation.

A field is declared with :func:`option` (default, help, allowed choices, bounds). The CLI turns every field into
a ``--flag`` (``kv_ratio`` -> ``--kv-ratio``; booleans -> ``--flag/--no-flag``), recipes accept the field names as
keys, and :meth:`Options.from_dict` / :meth:`Options.check` give the same one-line errors for both.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from kvtool.errors import KvtoolError


def option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, low: float | None = None,
           high: float | None = None, positive: bool = False) -> Any:
    """A dataclass field with CLI/recipe metadata (``low``/``high`` inclusive bounds; ``positive``: > 0)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "positive": positive}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The CLI flag of a field: ``kv_ratio`` -> ``--kv-ratio``."""
    return "--" + name.replace("_", "-")


def _base_types(tp: Any) -> tuple[list[Any], bool]:
    """(non-None member types, whether None is allowed) of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    members, nullable = _base_types(tp)
    if value is None:
        if nullable:
            return None
        raise KvtoolError(f"{where} must be {members[0].__name__}, got nothing (null)")
    for t in members:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join(t.__name__ for t in members) + (" or null" if nullable else "")
    raise KvtoolError(f"{where} must be {names}, got {type(value).__name__} ({value!r})")


@dataclasses.dataclass
class Options:
    """Base class of every method's options."""

    @classmethod
    def hints(cls) -> dict[str, Any]:
        """Field name -> resolved type annotation."""
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "options") -> Options:
        """Build from recipe keys (or CLI values): unknown keys and wrong types raise a KvtoolError naming them."""
        hints = cls.hints()
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise KvtoolError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(names))})")
        values = {k: _coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()}
        opts = cls(**values)
        opts.check_fields(where)
        return opts

    def check_fields(self, where: str = "options") -> None:
        """Choices, bounds and finiteness of every field (what needs no model)."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            label = f"{where}: {f.name}" if where != "cli" else flag_name(f.name)
            if value is None or isinstance(value, bool):
                continue
            if meta.get("choices") and value not in meta["choices"]:
                raise KvtoolError(f"{label} {value!r} is not one of: {', '.join(map(str, meta['choices']))}")
            if isinstance(value, float) and not math.isfinite(value):
                raise KvtoolError(f"{label} must be a finite number, got {value}")
            if isinstance(value, int | float):
                if meta.get("positive") and value <= 0:
                    raise KvtoolError(f"{label} must be > 0, got {value}")
                if meta.get("low") is not None and value < meta["low"]:
                    raise KvtoolError(f"{label} must be >= {meta['low']}, got {value}")
                if meta.get("high") is not None and value > meta["high"]:
                    raise KvtoolError(f"{label} must be <= {meta['high']}, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what kvtool.json records)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DataOptions(Options):
    """Which calibration text and windows: the same flags on every verb that reads text."""

    dataset: str = option("embedded", "Text: 'suite' (the evaluation suite's domains, equal weights: embedded, prose, "
                                      "code), 'embedded' (Python reference docs), 'prose' (World English Bible), "
                                      "'code' (click's Python source), a .txt/.jsonl/.json/.parquet file or folder, a "
                                      "hub dataset NAME[:CONFIG], or a mixture SOURCE=WEIGHT,SOURCE=WEIGHT,... of "
                                      "these.")
    text_field: str = option("text", "Record field holding the text (jsonl/json/parquet).")
    split: str = option("calib", "Part of the text: calib (the calibration part), heldout, or all.",
                        choices=("calib", "heldout", "all"))
    samples: int = option(32, "Calibration windows.", positive=True)
    seq_len: int = option(512, "Tokens per window.", low=2)
    seed: int = option(0, "Seed for choosing windows.")
    batch_size: int = option(8, "Windows per forward call.", positive=True)

    def following(self, recorded: dict[str, Any] | None, defaults: dict[str, Any] | None = None) -> DataOptions:
        """These options with every field left at its default (``defaults``: the verb's own, e.g. a method's
        ``data_defaults``) replaced by the value a statistics folder recorded (its ``dataset`` block), so passes that
        need text (sensitivity, visitors) read the statistics' own windows."""
        if not recorded:
            return self
        values = self.to_dict()
        for f in dataclasses.fields(self):
            default = (defaults or {}).get(f.name, f.default)
            if f.name in recorded and values[f.name] == default and f.name != "batch_size":
                values[f.name] = type(f.default)(recorded[f.name])
        return DataOptions(**values)

    def source(self) -> Any:
        """The :class:`kvtool.data.TextSource` these options name."""
        from kvtool.data import TextSource

        return TextSource(self.dataset, self.split, self.text_field)


LAYERS_HELP = ("Decoder layers: 'all', or a comma-separated list of N, A-B (inclusive), A- (A to the top) "
               "and P% (the top P percent), e.g. 0-7,12 or 16- or 50%.")


def parse_layers(text: str | None, num_layers: int | None = None) -> list[int] | None:
    """The one ``--layers`` grammar (see :data:`LAYERS_HELP`); None or 'all' -> None (every layer).

    Syntax is checked without the model; ranges are checked against ``num_layers`` when it is given (open ranges
    and percentages need it to resolve and return None without it).
    """
    if text is None or str(text).strip() in ("", "all"):
        return None
    hint = "use e.g. 0-7,12 or 16- or 50% (see --help)"
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    if not items:
        raise KvtoolError(f"--layers {text!r} names no layer: {hint}")
    out: set[int] = set()
    unresolved = False
    for item in items:
        try:
            if item.endswith("%"):
                pct = float(item[:-1])
                if not 0 <= pct <= 100:
                    raise KvtoolError(f"--layers {text}: a percentage must be in 0..100")
                if num_layers is None:
                    unresolved = True
                    continue
                k = int(math.floor(num_layers * pct / 100 + 0.5))
                out.update(range(num_layers - k, num_layers))
            elif item.endswith("-"):
                lo = int(item[:-1])
                if num_layers is None:
                    unresolved = True
                    continue
                if lo >= num_layers:
                    raise KvtoolError(f"--layers {text} is outside the model's {num_layers} layers: "
                                      f"use 0-{num_layers - 1}")
                out.update(range(lo, num_layers))
            elif "-" in item[1:]:
                lo, hi = (int(v) for v in item.split("-", 1))
                if hi < lo:
                    raise KvtoolError(f"--layers {text}: range {item} is empty (A-B needs A <= B)")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(item))
        except ValueError:
            raise KvtoolError(f"--layers {text!r} is not understood: {hint}") from None
    if any(i < 0 for i in out):
        raise KvtoolError(f"--layers {text}: layer indices start at 0: {hint}")
    if num_layers is not None and out and max(out) >= num_layers:
        raise KvtoolError(f"--layers {text} is outside the model's {num_layers} layers: use 0-{num_layers - 1}")
    if unresolved:
        return None
    return sorted(out)
