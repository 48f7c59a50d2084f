"""``kvtool eval``: held-out perplexity of any model kvtool loads or writes (optionally with a quantized KV cache)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from kvtool.commands.options import DEVICE_HELP, DTYPE_HELP, MODEL_HELP
from kvtool.options import DataOptions


def eval_(
    model: Annotated[Optional[str], typer.Argument(help=MODEL_HELP)] = None,  # noqa: UP045
    dataset: Annotated[str, typer.Option("--dataset", help=DataOptions.__dataclass_fields__["dataset"].metadata[
        "help"] + " A mixture (suite) is scored part by part, with the geometric mean of the parts.")] = "embedded",
    text_field: Annotated[str, typer.Option("--text-field", help="Record field holding the text.")] = "text",
    split: Annotated[str, typer.Option("--split", help="Part of the text to score: heldout (never calibrated on), "
                                                        "calib, or all.")] = "heldout",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length.")] = 512,
    stride: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Sliding windows advancing by STRIDE (default: non-overlapping windows).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Score at most this many tokens (0 = all); a "
                                                                 "mixture: this many of every part.")] = 16384,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward call.")] = 4,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    kv_quant: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--kv-quant", help="Score with a quantized KV cache as decode reads it: int2, int4, hadamard-int2, "
                           "kivi-int2, or a folder from `kvtool export` (OSCAR).")] = None,
    group_size: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--group-size", help="--kv-quant: elements per scale/zero along head_dim (default: head_dim).")] = None,
    residual_window: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--residual-window", help="--kv-quant: most recent tokens kept in full precision (default 0, or the "
                                  "export's value).")] = None,
    sink: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="--kv-quant: first tokens kept in full precision (default 0, or the export's value).")] = None,
) -> None:
    """Perplexity on held-out text (the held-out part of --dataset) of any model kvtool can load.

    Examples:
      kvtool eval smollm2-135m --max-tokens 8192
      kvtool eval out/mla --dataset suite --max-tokens 8192     (embedded, prose, code; and their geometric mean)
      kvtool eval out/mla --dataset my.txt
      kvtool eval smollm2-135m --kv-quant out/oscar --sink 4 --residual-window 64
    """
    from kvtool.commands.console import print_json, print_table
    from kvtool.data import TextSource, describe_parts, heldout_streams
    from kvtool.device import resolve_device
    from kvtool.errors import KvtoolError
    from kvtool.evaluate import by_domain, perplexity
    from kvtool.models import load_model

    DataOptions(dataset=dataset, text_field=text_field, split=split, seq_len=seq_len,
                batch_size=batch_size).check_fields("cli")
    source = TextSource(dataset, split, text_field)
    parts = describe_parts(source)  # a malformed mixture fails here, before the model loads
    if max_tokens < 0:
        raise KvtoolError(f"--max-tokens {max_tokens} must be >= 0 (0 = all)")
    if stride is not None and not 0 < stride <= seq_len:
        raise KvtoolError(f"--stride {stride} must be in 1..--seq-len ({seq_len})")
    device = resolve_device(device)
    loaded = load_model(model, dtype=dtype, device=device, strict=False)
    context = getattr(loaded.model.config, "max_position_embeddings", 0) or 0
    if context and seq_len > context:
        raise KvtoolError(f"seq-len {seq_len} exceeds the model's context of {context} tokens: "
                          f"use --seq-len {context} or less")
    streams = heldout_streams(loaded.tokenizer, source, max_tokens or None)
    scored: dict[str, dict[str, Any]] = {}
    for name, tokens in streams.items():
        if kv_quant is not None:
            from kvtool.runtime.kvquant import eval_kv_quant

            scored[name] = eval_kv_quant(loaded, tokens, kv_quant, group_size, residual_window, sink, seq_len=seq_len,
                                         stride=stride, batch_size=batch_size, progress=progress and not as_json)
        else:
            scored[name] = perplexity(loaded.model, tokens, seq_len, stride, batch_size,
                                      progress=progress and not as_json)
    one = len(streams) == 1
    for name in scored:  # a suite domain's origin and text digest; a mixture part's weight
        scored[name].update({k: v for k, v in parts[name].items() if not (one and k == "weight")})
    result: dict[str, Any] = {"model": loaded.source, "dataset": dataset, "split": split,
                              **(next(iter(scored.values())) if one else by_domain(scored))}
    if as_json:
        print_json(result)
        return
    first = next(iter(scored.values()))
    how = f"{first['mode']}, seq-len {first['seq_len']}" + (f", stride {stride}" if stride else "")
    if kv_quant is not None:
        how += f", KV {first['kv_quant']['label']}"
    rows = [[f"{name}:{split}", how, str(r["tokens_scored"]), f"{r['perplexity']:.3f}"] for name, r in scored.items()]
    if not one:
        rows.append([f"{dataset}:{split}", "geometric mean", str(sum(
            r["tokens_scored"] for r in scored.values())), f"{result['geometric_mean']:.3f}"])
    print_table(f"held-out perplexity of {loaded.source}", ["text", "windows", "tokens scored", "perplexity"], rows)
