"""``kvtool ladder``: rewire chosen decoder layers to Ladder residual (weights unchanged) and write the checkpoint.

Output folder: ``config.json`` (a ``kvtool_ladder_<arch>`` config: the source fields + ``ladder_layers``), the
source weights as safetensors, the tokenizer, and ``kvtool.json`` (options, chosen layers, per-layer drift,
optional held-out perplexity before/after). ``AutoModelForCausalLM.from_pretrained(OUT)`` after ``import kvtool``
runs it; ``kvtool validate OUT`` runs it through the tensor-parallel path (world 1) with the fused Triton
add+RMSNorm kernel and compares with the HF model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from kvtool.calib import StatsStore
from kvtool.cli import DatasetOpt, DeviceOpt, DtypeOpt, ModelArg, app, fails_cleanly, out_console, resolve_device
from kvtool.convert.ladder import (
    LayerChoice,
    check_ladder_supported,
    ladder_convert,
    layer_drift,
    parse_layers,
)
from kvtool.errors import KvtoolError
from kvtool.models import LoadedModel
from kvtool.validate import register_validator

COMMAND = "ladder"
REQUIRED_STATS: tuple[str, ...] = ()  # no second-moment statistics: the drift pass runs on calibration windows


def _heldout_ppl(model: torch.nn.Module, tokenizer: Any, tokens: int, seq_len: int, batch_size: int,
                 progress: bool) -> dict[str, Any]:
    from kvtool.data import TextSource, heldout_tokens
    from kvtool.evaluate import perplexity

    ids = heldout_tokens(tokenizer, TextSource(split="heldout"), tokens)
    return perplexity(model, ids, seq_len, None, batch_size, progress=progress)


def write_ladder(loaded: LoadedModel, store: StatsStore | None, out: Path, *, layers: str | LayerChoice = "auto",
                 count: int | None = None, dataset: str = "embedded", samples: int = 16, seq_len: int = 256,
                 seed: int = 0, device: str = "cpu", batch_size: int = 4, drift: bool = True,
                 eval_tokens: int = 0, eval_seq_len: int = 512, overwrite: bool = False,
                 progress: bool = False) -> dict:
    """Choose ladder layers, measure per-layer drift, write the ladder checkpoint to ``out`` atomically.

    ``store`` is unused (ladder needs no statistics; accepted for recipes). Returns the report.
    """
    from kvtool.checkpoint import atomic_dir, check_output_dir, provenance, save_model_checkpoint
    from kvtool.data import TextSource, calibration_windows
    from kvtool.modeling.ladder import install_ladder, remove_ladder

    choice = layers if isinstance(layers, LayerChoice) else parse_layers(layers, count)
    check_output_dir(out, overwrite)
    check_ladder_supported(loaded.model)
    spec = loaded.spec
    if choice.mode != "auto":
        choice.resolve(spec.num_layers)  # range errors before the drift pass
    drift_rows = None
    calib = None
    if drift or choice.mode == "auto":
        windows = calibration_windows(loaded.tokenizer, TextSource(dataset), samples, seq_len, seed,
                                      spec.max_positions)
        drift_rows = layer_drift(loaded, windows, device=device, batch_size=batch_size, progress=progress)
        calib = {"dataset": dataset, "split": "calib", "samples": samples, "seq_len": seq_len, "seed": seed,
                 "tokens": int(windows.numel())}
    chosen = choice.resolve(spec.num_layers, drift_rows)
    lazy = getattr(loaded.model, "_kvtool_weights", None)  # layers streamed from disk: read the tensors there
    state = {k: lazy.get(k) for k in lazy._where} if lazy is not None else loaded.model.state_dict()
    if lazy is not None and eval_tokens:
        raise KvtoolError("--eval-tokens needs the whole model in memory: load it without layer streaming")
    state, config, report = ladder_convert(state, loaded.model.config, chosen, drift_rows, choice)
    if eval_tokens:
        model = loaded.model
        before = _heldout_ppl(model, loaded.tokenizer, eval_tokens, eval_seq_len, batch_size, progress)
        install_ladder(model, chosen)
        try:
            after = _heldout_ppl(model, loaded.tokenizer, eval_tokens, eval_seq_len, batch_size, progress)
        finally:
            remove_ladder(model)
        report["perplexity"] = {"source": before["perplexity"], "ladder": after["perplexity"],
                                "tokens_scored": after["tokens_scored"], "seq_len": after["seq_len"],
                                "mode": after["mode"]}
    options = {"layers": choice.text, "count": count, "dataset": dataset, "samples": samples, "seq_len": seq_len,
               "seed": seed, "drift": drift, "eval_tokens": eval_tokens, "eval_seq_len": eval_seq_len}
    manifest = provenance(COMMAND, options, loaded.identity(), calib, report)
    with atomic_dir(out, overwrite) as tmp:
        save_model_checkpoint(tmp, state, config, manifest, loaded.tokenizer)
    return report


def _summary(report: dict, out: Path) -> Table:
    table = Table(title=f"ladder -> {out}")
    for col in ("layer", "ladder", "drift", "attn part", "mlp part", "layer update"):
        table.add_column(col, justify="right")
    chosen = set(report["ladder_layers"])
    for row in report.get("drift") or [{"layer": i} for i in range(report["num_layers"])]:
        i = row["layer"]
        cells = [f"{row[k]:.4f}" if k in row else "-" for k in ("drift", "attn_drift", "mlp_drift", "update")]
        table.add_row(str(i), "yes" if i in chosen else "", *cells)
    return table


@app.command(COMMAND)
@fails_cleanly
def ladder(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output checkpoint folder.")] = ...,
    layers: Annotated[str, typer.Option(
        "--layers", help="Layers to rewire: a range START:END (Python slice: '16:' = layer 16 to the top, '-8:' = "
                         "the top 8), a count K from the top ('8'), a percentage from the top ('50%'), a list "
                         "('3,5,7'), or 'auto' with --count K (the K layers whose rewiring moves the layer output "
                         "least on calibration text). '0' rewires nothing (reproduces the source exactly).")] = ...,
    count: Annotated[int | None, typer.Option(
        "--count", help="With --layers auto: how many layers to rewire, e.g. --layers auto --count 8.")] = None,
    dataset: DatasetOpt = "embedded",
    samples: Annotated[int, typer.Option(help="Calibration windows for the drift pass.")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration windows.")] = 0,
    drift: Annotated[bool, typer.Option(
        help="Measure per-layer drift even when the layers are given explicitly (always on for auto).")] = True,
    eval_tokens: Annotated[int, typer.Option(
        "--eval-tokens", help="Also report held-out perplexity (embedded held-out text) of the source and the "
                              "ladder model on this many tokens, e.g. 4096 (0 = skip).")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward call.")] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Rewire decoder layers to Ladder residual (each attention/MLP reads the stream one module earlier).

    Weights are unchanged; the config lists the ladder layers. Under tensor parallelism a ladder module's
    all-reduce overlaps the next module (see bench/ladder_tp_speed.py).

    Examples:
      kvtool ladder smollm2-135m -o out/ladder --layers 15:
      kvtool ladder smollm2-135m -o out/ladder --layers auto --count 8 --eval-tokens 4096
    """
    from kvtool.models import load_model

    choice = parse_layers(layers, count)  # syntax errors before loading anything
    from kvtool.checkpoint import check_output_dir

    check_output_dir(output, overwrite)
    device = resolve_device(device)
    loaded = load_model(model, dtype=dtype, device=device)
    report = write_ladder(loaded, None, output, layers=choice, count=count, dataset=dataset, samples=samples,
                          seq_len=seq_len, seed=seed, device=device, batch_size=batch_size, drift=drift,
                          eval_tokens=eval_tokens, overwrite=overwrite, progress=progress)
    out_console.print(_summary(report, output))
    out_console.print(f"ladder layers ({len(report['ladder_layers'])}/{report['num_layers']}): "
                      f"{report['ladder_layers']}; all-reduces overlappable under TP: "
                      f"{report['overlappable_allreduces']}/{report['allreduces']}")
    if "perplexity" in report:
        p = report["perplexity"]
        out_console.print(f"held-out perplexity ({p['tokens_scored']} tokens, seq-len {p['seq_len']}): "
                          f"source {p['source']:.3f} -> ladder {p['ladder']:.3f}")


@register_validator(COMMAND)
def validate_ladder(out: Path, manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Run the ladder checkpoint through the TP path (world 1) with the fused Triton add+RMSNorm and compare.

    Checks: (1) TP path with the Triton kernel vs the HF model's logits, (2) the same with the PyTorch add+norm
    (isolates the kernel), on 16 held-out tokens. Passes when both max errors are below 1e-4 of the logit
    scale (float32).
    """
    from kvtool.data import TextSource, heldout_tokens
    from kvtool.models import load_model
    from kvtool.tp import TPDecoder

    device = options.get("device", "cpu")
    if not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise KvtoolError("validating on the CPU runs the Triton kernel in the interpreter: set TRITON_INTERPRET=1 "
                          "(or use --device cuda)")
    loaded = load_model(str(out), device=device)
    ids = heldout_tokens(loaded.tokenizer, TextSource(split="heldout"), 16)[None].to(device)
    with torch.no_grad():
        ref = loaded.model(ids).logits.float()
    n = ids.shape[1]
    errs = {}
    for fused in (True, False):
        tp = TPDecoder.from_hf(loaded.model, fused_norm=fused, max_len=n)
        tp.setup_cache(1, n)
        got = tp(ids, torch.arange(n, device=device)).float()
        errs[fused] = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = 1e-4 * max(scale, 1.0)
    return {"passed": errs[True] <= tol and errs[False] <= tol, "ladder_layers": str(loaded.model.config.ladder_layers),
            "tokens": n, "max_err_tp_triton_vs_hf": errs[True], "max_err_tp_torch_vs_hf": errs[False],
            "logit_scale": scale, "tolerance": tol}
