"""kvtool command line: one command per verb; each parses options, calls a library function, prints a summary.

Bad input raises :class:`kvtool.errors.KvtoolError`, printed as one ``error:`` line with exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kvtool.errors import KvtoolError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kvtool: offline model conversion for cheaper LLM serving "
                       "(calibration statistics, GQA->MLA, CorDA, 2-bit KV, Ladder residual).")
console = Console(stderr=True)
out_console = Console()

ModelArg = Annotated[str | None, typer.Argument(
    help="Model: 'smollm2-135m' (embedded, default), a checkpoint folder, a .gguf file, or a hub id.")]
DatasetOpt = Annotated[str, typer.Option(
    "--dataset", help="Text: 'embedded' (Python reference docs), a .txt/.jsonl/.json/.parquet file or folder, "
                      "or a hub dataset NAME[:CONFIG].")]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Record field holding the text (json/parquet).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (cuda when available).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model dtype: float32, bfloat16 or float16.")]


def fails_cleanly(fn: Callable) -> Callable:
    """Turn KvtoolError into one 'error:' line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KvtoolError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available; under torchrun, cuda -> this rank's GPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KvtoolError(f"--device {device} asked for, but no CUDA GPU is visible: use --device cpu")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def init_distributed(device: str) -> tuple[int, int]:
    """Join a torchrun/accelerate process group when one is set up (gloo on CPU, NCCL on GPUs)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(torch.device(device))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@app.command()
@fails_cleanly
def calibrate(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write statistics into.")] = ...,
    dataset: DatasetOpt = "embedded",
    split: Annotated[str, typer.Option(help="Split: 'calib' (embedded calibration part) or a hub split.")] = "calib",
    text_field: TextFieldOpt = "text",
    samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for choosing windows.")] = 0,
    stats: Annotated[str, typer.Option(
        help="Comma-separated statistics: attn_in,q,k,v,o_in,mlp_in,down_in.")] = "attn_in,q,k,v,o_in,mlp_in",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward call.")] = 8,
    offload: Annotated[bool, typer.Option(help="Keep hidden states of all windows on the CPU between layers.")] = False,
    stream: Annotated[bool, typer.Option(
        help="Read decoder layers from disk one at a time (local safetensors models larger than memory).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Collect per-layer activation second moments (float64 sums + token counts), layer by layer.

    Example: kvtool calibrate smollm2-135m -o stats/ --samples 32 --seq-len 256
    Under torchrun/accelerate each rank takes its share of windows and the sums are all-reduced.
    """
    import time

    from kvtool import __version__
    from kvtool.calib import StatsStore, collect_statistics, parse_stats
    from kvtool.checkpoint import atomic_dir, check_output_dir
    from kvtool.data import TextSource, calibration_windows
    from kvtool.models import load_model

    names = parse_stats(stats)
    check_output_dir(output, overwrite)
    device = resolve_device(device)
    rank, world = init_distributed(device)
    loaded = load_model(model, dtype=dtype, device=device if stream else ("cpu" if world == 1 else device),
                        lazy=stream)
    source = TextSource(dataset, split, text_field)
    windows = calibration_windows(loaded.tokenizer, source, samples, seq_len, seed, loaded.spec.max_positions)
    t0 = time.perf_counter()
    store: StatsStore = collect_statistics(loaded, windows, names, device=device, batch_size=batch_size,
                                           offload=offload, progress=progress and rank == 0)
    seconds = time.perf_counter() - t0
    tokens = int(windows.numel())
    store.meta = {
        "kvtool_version": __version__,
        "model": loaded.identity(),
        "spec": loaded.spec.to_dict(),
        "dataset": {**source.describe(), "samples": samples, "seq_len": seq_len, "seed": seed},
        "tokens": tokens,
        "world_size": world,
        "seconds": round(seconds, 3),
    }
    if rank == 0:
        with atomic_dir(output, overwrite) as tmp:
            store.save(tmp)
        table = Table(title=f"statistics -> {output}")
        for col in ("layers", "statistics", "tokens", "seconds", "tokens/s"):
            table.add_column(col)
        table.add_row(str(len(store.layers())), ",".join(store.names()), str(tokens), f"{seconds:.1f}",
                      f"{tokens / max(seconds, 1e-9):.0f}")
        out_console.print(table)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


@app.command("eval")
@fails_cleanly
def eval_(
    model: ModelArg = None,
    dataset: DatasetOpt = "embedded",
    split: Annotated[str, typer.Option(help="Split: 'heldout' for the embedded text, or a hub split.")] = "heldout",
    text_field: TextFieldOpt = "text",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length.")] = 512,
    stride: Annotated[int | None, typer.Option(
        help="Sliding windows advancing by STRIDE (default: non-overlapping windows).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Score at most this many tokens (0 = all).")] = 16384,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    kv_quant: Annotated[str | None, typer.Option(
        "--kv-quant", help="Score with a quantized KV cache as decode reads it: int2, int4, hadamard-int2, "
                           "kivi-int2, or a folder from `kvtool export` (OSCAR).")] = None,
    kv_group_size: Annotated[int | None, typer.Option(
        "--group-size", help="--kv-quant: elements per scale/zero along head_dim (default: head_dim).")] = None,
    residual_window: Annotated[int | None, typer.Option(
        "--residual-window", help="--kv-quant: most recent tokens kept in full precision (default 0, or the "
                                  "export's value).")] = None,
    sink: Annotated[int | None, typer.Option(
        help="--kv-quant: first tokens kept in full precision (default 0, or the export's value).")] = None,
) -> None:
    """Perplexity on held-out text (the embedded held-out part by default) of any model kvtool can load.

    Example: kvtool eval smollm2-135m --max-tokens 8192
    Example: kvtool eval smollm2-135m --kv-quant out/oscar --sink 4 --residual-window 64
    """
    from kvtool.data import TextSource, heldout_tokens
    from kvtool.evaluate import perplexity
    from kvtool.models import load_model

    device = resolve_device(device)
    loaded = load_model(model, dtype=dtype, device=device, strict=False)
    context = getattr(loaded.model.config, "max_position_embeddings", 0) or 0
    if context and seq_len > context:
        raise KvtoolError(f"seq-len {seq_len} exceeds the model's context of {context} tokens: "
                          f"use --seq-len {context} or less")
    tokens = heldout_tokens(loaded.tokenizer, TextSource(dataset, split, text_field), max_tokens or None)
    if kv_quant is not None:
        from kvtool.kvquant import eval_kv_quant

        result = eval_kv_quant(loaded, tokens, kv_quant, kv_group_size, residual_window, sink, seq_len=seq_len,
                               stride=stride, batch_size=batch_size, progress=progress and not as_json)
    else:
        result = perplexity(loaded.model, tokens, seq_len, stride, batch_size, progress=progress and not as_json)
    result = {"model": loaded.source, "dataset": dataset, "split": split, **result}
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"held-out perplexity of {loaded.source}")
    for col in ("text", "windows", "tokens scored", "perplexity"):
        table.add_column(col)
    how = f"{result['mode']}, seq-len {result['seq_len']}" + (f", stride {stride}" if stride else "")
    if kv_quant is not None:
        how += f", KV {result['kv_quant']['label']}"
    table.add_row(f"{dataset}:{split}", how, str(result["tokens_scored"]), f"{result['perplexity']:.3f}")
    out_console.print(table)


@app.command("stats")
@fails_cleanly
def stats_(
    directory: Annotated[Path, typer.Argument(help="A statistics folder written by `kvtool calibrate`.")],
    model: Annotated[str | None, typer.Option(
        "--model", help="Check that the statistics were collected on this model (same weights hash).")] = None,
) -> None:
    """Summarize a statistics folder and optionally check it matches a model.

    Example: kvtool stats stats/ --model smollm2-135m
    """
    from kvtool.calib import StatsStore

    store = StatsStore.load(directory)
    if model is not None:
        from kvtool.models import load_model

        loaded = load_model(model)
        store.require(store.names(), loaded.spec.num_layers, loaded.model_hash)
    meta = store.meta
    table = Table(title=f"statistics in {directory}")
    for col in ("statistic", "shape", "layers", "tokens"):
        table.add_column(col)
    for name in store.names():
        layers = [i for i in store.layers() if store.has(i, name)]
        table.add_row(name, "x".join(map(str, store.sum(layers[0], name).shape)), str(len(layers)),
                      str(store.count(layers[0], name)))
    out_console.print(table)
    out_console.print(f"model: {meta.get('model', {}).get('source')}  hash: {meta.get('model', {}).get('hash')}")
    out_console.print(f"dataset: {meta.get('dataset')}")
    if model is not None:
        out_console.print(f"[green]matches {model}[/]")


@app.command("validate")
@fails_cleanly
def validate_(
    output: Annotated[Path, typer.Argument(help="An output folder written by a kvtool transform.")],
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Run a converted model's hot path through its Triton kernel and compare with the PyTorch path.

    Example: kvtool validate out/mla   (set TRITON_INTERPRET=1 to run the kernels on the CPU)
    """
    from kvtool.validate import validate

    report = validate(output, {"device": resolve_device(device)})
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        table = Table(title=f"validate {output}")
        table.add_column("check")
        table.add_column("value")
        for k, v in report.items():
            table.add_row(k, f"{v:.3e}" if isinstance(v, float) else str(v))
        out_console.print(table)
    if not report.get("passed", False):
        console.print("[bold red]error:[/] validation failed: kernel and PyTorch outputs differ beyond tolerance")
        raise typer.Exit(1)


@app.command("run")
@fails_cleanly
def run_(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Output folder (default: the recipe's `output`, else out/<recipe name>).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe key, e.g. --set dataset.samples=4 --set steps.0.care.kv_ratio=0.25.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (steps, statistics, memory).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run a recipe: one calibration pass for all steps' statistics, then transforms, validation and eval.

    Example: kvtool run recipes/care-smoke.yaml --set dataset.samples=8
    Statistics saved in OUT/stats are reused when rerun with the same model and dataset.
    """
    from kvtool.recipe import load_recipe, plan, report_markdown, run_recipe

    rec = load_recipe(recipe, set_)
    out = output or Path(rec.output or Path("out") / recipe.stem)
    if dry_run:
        from kvtool.models import arch_spec_from_config, resolve_model_path

        spec = None
        try:
            directory, _, _ = resolve_model_path(rec.model)
        except KvtoolError as exc:
            directory = None
            console.print(f"[yellow]note:[/] {exc} (no memory estimate; the run itself will fail until it exists)")
        if directory is not None:
            from transformers import AutoConfig

            spec = arch_spec_from_config(AutoConfig.from_pretrained(str(directory)))
        p = plan(rec, spec)
        table = Table(title=f"plan for {recipe} -> {out}")
        table.add_column("#")
        table.add_column("step")
        table.add_column("options")
        table.add_row("0", "calibrate", f"{','.join(p['statistics']) or '(none)'} on {p['dataset']}")
        for i, st in enumerate(p["steps"], 1):
            table.add_row(str(i), f"{st['kind']}: {st['name']}", json.dumps(st["options"]))
        out_console.print(table)
        for k, v in p["estimated_peak_bytes"].items():
            out_console.print(f"estimated {k}: {v / 2**20:.0f} MiB")
        return
    report = run_recipe(rec, out, progress=progress)
    out_console.print(report_markdown(report))
    out_console.print(f"[green]wrote {out}/report.json and {out}/report.md[/]")


def main() -> None:
    """Console-script entry point."""
    app()


def _register_transform_commands() -> None:
    import kvtool.commands

    kvtool.commands.load_all()


_register_transform_commands()


if __name__ == "__main__":
    main()
