"""The interface every method implements (PEFT-tuner style: one module per method, one registry), and the glue
they share: a run context and getting the statistics a method needs (from a folder, or calibrated now)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvtool.errors import KvtoolError
from kvtool.options import DataOptions, Options


@dataclass
class RunContext:
    """What a method run needs besides its options."""

    device: str = "cpu"
    dtype: str = "auto"  # output dtype: auto = the source's
    data: DataOptions = field(default_factory=DataOptions)
    overwrite: bool = False
    progress: bool = False
    inputs: tuple[Path | None, ...] = ()  # what the output must not replace (source model, statistics folder)
    release_statistics: bool = False  # a method may free each layer's statistics once used (the CLI's store)
    consume_model: bool = False  # a method may overwrite the loaded model's weights (the CLI loads it for one run)
    visitors: dict[str, Any] = field(default_factory=dict)  # this run's visitors that rode the calibration pass


class Method:
    """One conversion method. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]  # the CLI verb, the recipe step key and kvtool.json's "command"
    aliases: ClassVar[tuple[str, ...]] = ()  # other recipe step keys accepted (documented)
    Options: ClassVar[type[Options]]
    help: ClassVar[str]  # --help text (first line: summary; then examples)
    data_defaults: ClassVar[dict[str, Any]] = {}  # per-method defaults of the data flags
    writes_model: ClassVar[bool] = True  # the output folder is a loadable checkpoint (eval targets)
    acts_on_output: ClassVar[bool] = False  # its input is another method's output (heal), not the source model

    def required_stats(self, opts: Any) -> tuple[str, ...]:
        """Statistics (kvtool.calib names) this run needs."""
        return ()

    def visitors(self, opts: Any) -> dict[str, Any]:
        """Calibration-pass visitors (``kvtool.calib.runner.LayerVisitor``) this run needs on the calibration
        windows, by name; ``kvtool run`` and the CLI run them in the statistics pass and hand them back in
        ``ctx.visitors``."""
        return {}

    def preflight(self, spec: Any, opts: Any) -> None:
        """Every check that needs the model's shapes but no statistics (runs before any calibration)."""

    def check_data(self, opts: Any, data: Any) -> None:
        """Checks of the options against the text options (``DataOptions``), before anything is loaded."""

    def run(self, loaded: Any, store: Any, out: Path, opts: Any, ctx: RunContext) -> dict[str, Any]:
        """Convert ``loaded`` and write ``out`` atomically; returns the report (also in kvtool.json)."""
        raise NotImplementedError

    def validate(self, out: Path, manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """Run the output's hot path through its Triton kernel against PyTorch: ``{"passed": bool, ...}``."""
        raise KvtoolError(f"outputs of {self.name} have no kernel validation")

    def summary(self, report: dict[str, Any], out: Path) -> tuple[str, list[str], list[list[str]], list[str]]:
        """(title, columns, rows, notes) the CLI prints after a run."""
        return f"{self.name} -> {out}", [], [], []


def statistics_for(loaded: Any, names: tuple[str, ...], stats_dir: str | Path | None, data: DataOptions, *,
                   device: str = "cpu", progress: bool = False, visitors: list[Any] = ()) -> Any:
    """Load statistics from ``stats_dir`` (checked against the model and the needed names) or calibrate now, in one
    pass with ``visitors``; with nothing to collect, only the visitors' pass runs (None is returned)."""
    from kvtool.calib.collect import calibrate
    from kvtool.calib.runner import run_layers
    from kvtool.calib.stats import StatsStore
    from kvtool.data import calibration_windows

    if stats_dir is not None or not names:
        store = None
        if stats_dir is not None:
            store = StatsStore.load(stats_dir)
            store.require(names, loaded.spec.num_layers, loaded.model_hash)
        if visitors:
            windows = calibration_windows(loaded.tokenizer, data.source(), data.samples, data.seq_len, data.seed,
                                          loaded.spec.max_positions)
            run_layers(loaded, windows, list(visitors), device=device, batch_size=data.batch_size, progress=progress)
        return store
    return calibrate(loaded, data.source(), names, samples=data.samples, seq_len=data.seq_len, seed=data.seed,
                     device=device, batch_size=data.batch_size, progress=progress, visitors=visitors)


def statistics_provenance(store: Any) -> dict[str, Any] | None:
    """What kvtool.json records about the statistics a method used."""
    if store is None:
        return None
    return {k: store.meta.get(k) for k in ("model", "dataset", "tokens")}


def output_dtype(dtype: str, loaded: Any) -> Any:
    """The torch dtype outputs are written in: ``auto`` = the source model's parameter dtype."""
    import torch

    if dtype == "auto":
        return next(loaded.model.parameters()).dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise KvtoolError(f"unknown --dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def cached_decode_report(model: Any, tokenizer: Any, device: str, **kwargs: Any) -> dict[str, Any]:
    """The cached-decode check every model output must pass (``kvtool.runtime.decode_check``) on held-out text:
    2 sequences, an 8-token prompt, 15 cached steps against the full forward, then 16 greedy tokens."""
    from kvtool.data import TextSource, heldout_tokens
    from kvtool.runtime.decode_check import check_cached_decode

    ids = heldout_tokens(tokenizer, TextSource(split="heldout"), 2 * 24).view(2, 24).to(device)
    return {f"decode_{k}" if k in ("passed", "batch") else k: v
            for k, v in check_cached_decode(model, ids, prefill=8, **kwargs).items()}


def merge_decode_report(report: dict[str, Any], decode: dict[str, Any]) -> dict[str, Any]:
    """``report`` (a kernel check's) with the cached-decode check added; passes only when both do."""
    report = {**report, **decode}
    report["passed"] = bool(report.get("passed", True) and decode["decode_passed"])
    return report


SERVING_POINT = {"batch": 16, "context": 32768}  # where conversion reports total memory (weights + KV cache)


def size_report(before: dict[str, Any], after: dict[str, Any], tied: bool, elem_bytes: int,
                kv_bytes_per_token_before: int, kv_bytes_per_token_after: int) -> dict[str, Any]:
    """Parameters and weight bytes of the source and converted state dicts (a tied lm_head counted once, weights
    at ``elem_bytes`` each), and weights + KV cache at :data:`SERVING_POINT` before and after."""
    def count(state: dict[str, Any]) -> int:
        return sum(v.numel() for k, v in state.items()
                   if v.is_floating_point() and not (tied and k == "lm_head.weight"))

    p_before, p_after = count(before), count(after)
    tokens = SERVING_POINT["batch"] * SERVING_POINT["context"]
    return {"parameters_before": p_before, "parameters_after": p_after,
            "weight_bytes_before": p_before * elem_bytes, "weight_bytes_after": p_after * elem_bytes,
            "weight_growth": p_after / p_before - 1.0,
            "memory_at": {**SERVING_POINT,
                          "before_bytes": p_before * elem_bytes + kv_bytes_per_token_before * tokens,
                          "after_bytes": p_after * elem_bytes + kv_bytes_per_token_after * tokens}}


def size_note(report: dict[str, Any]) -> str:
    """One summary line of :func:`size_report`'s fields."""
    m = report["memory_at"]
    return (f"parameters {report['parameters_before'] / 1e6:.1f}M -> {report['parameters_after'] / 1e6:.1f}M "
            f"({report['weight_growth']:+.1%}); weights + KV cache at batch {m['batch']} x {m['context']} tokens: "
            f"{m['before_bytes'] / 2**30:.2f} -> {m['after_bytes'] / 2**30:.2f} GiB")
