"""``kvtool calibrate``: per-layer activation second moments (float64 sums + token counts), layer by layer."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from kvtool.commands.options import common_params, make_command, options_params, split_values
from kvtool.options import DataOptions

CALIBRATE_DATA = {"dataset": "suite", "samples": 64}  # the evaluation suite's calibration parts, equal weights
HELP = """Collect per-layer activation second moments (float64 sums + token counts), layer by layer.

Examples:
  kvtool calibrate smollm2-135m -o stats/ --samples 32 --seq-len 256
  kvtool calibrate smollm2-135m -o stats/ --statistics attn_in,q,k,v,o_in,mlp_in,down_in
  torchrun --nproc-per-node 2 -m kvtool.cli calibrate MODEL -o stats/   (each rank takes its share of windows)
"""


def register(app: typer.Typer) -> None:
    """Add ``kvtool calibrate``."""
    import inspect

    from kvtool.commands.console import fails_cleanly

    params = common_params(output_help="Folder to write statistics into.")
    params += options_params(DataOptions, CALIBRATE_DATA)
    kw = inspect.Parameter.KEYWORD_ONLY
    params += [
        inspect.Parameter("statistics", kw, default="attn_in,q,k,v,o_in,mlp_in", annotation=Annotated[str, typer.Option(
            "--statistics", help="Comma-separated statistic names: attn_in,q,k,v,o_in,mlp_in,down_in (down_in is "
                                 "I×I per layer: only for CorDA on down_proj).")]),
        inspect.Parameter("exact", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--exact", help="Float64 Gram products for every batch (default: a bf16/fp16 model's products run in "
                            "float32 on tensor cores, summed across batches in float64).")]),
        inspect.Parameter("offload", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--offload", help="Keep hidden states of all windows on the CPU between layers.")]),
        inspect.Parameter("stream", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--stream", help="Read decoder layers from disk one at a time (local safetensors models larger than "
                             "memory).")]),
    ]
    app.command("calibrate")(fails_cleanly(make_command(calibrate, params, "calibrate", HELP)))


def calibrate(**values: Any) -> None:
    from kvtool.calib.collect import calibrate as collect
    from kvtool.calib.stats import parse_stats
    from kvtool.checkpoint import atomic_dir, check_output_dir, local_input
    from kvtool.commands.console import print_json, print_table
    from kvtool.device import init_distributed, resolve_device
    from kvtool.models import load_model

    data = DataOptions(**split_values(values, DataOptions))
    data.check_fields("cli")
    names = parse_stats(values["statistics"])
    output = values["output"]
    inputs = (local_input(values["model"]), local_input(data.dataset))
    check_output_dir(output, values["overwrite"], inputs)
    device = resolve_device(values["device"])
    rank, world = init_distributed(device)
    stream = values["stream"]
    loaded = load_model(values["model"], dtype=values["dtype"],
                        device=device if stream else ("cpu" if world == 1 else device), lazy=stream)
    def run(write_to: Any = None) -> tuple[Any, float]:
        t0 = time.perf_counter()
        store = collect(loaded, data.source(), names, samples=data.samples, seq_len=data.seq_len, seed=data.seed,
                        device=device, batch_size=data.batch_size, offload=values["offload"], exact=values["exact"],
                        progress=values["progress"] and rank == 0, write_to=write_to)
        return store, time.perf_counter() - t0

    if world == 1:  # each layer's sums go to the output (atomic folder) as the layer completes
        with atomic_dir(output, values["overwrite"], inputs) as tmp:
            store, seconds = run(write_to=tmp)
            store.save(tmp)
    else:  # under torchrun the sums are all-reduced at the end; rank 0 writes them
        store, seconds = run()
        if rank == 0:
            with atomic_dir(output, values["overwrite"], inputs) as tmp:
                store.save(tmp)
    if rank == 0:
        tokens = store.meta["tokens"]
        result = {"output": str(output), "layers": len(store.layers()), "statistics": store.names(), "tokens": tokens,
                  "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
        if values["as_json"]:
            print_json(result)
        else:
            print_table(f"statistics -> {output}", ["layers", "statistics", "tokens", "seconds", "tokens/s"],
                        [[str(result["layers"]), ",".join(store.names()), str(tokens), f"{seconds:.1f}",
                          f"{result['tokens_per_second']:.0f}"]])
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
