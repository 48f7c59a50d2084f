"""``kvtool convert-mla``: CARE GQA->MLA conversion (thin layer over :mod:`kvtool.convert.care`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from kvtool.calib.stats import StatsStore
from kvtool.cli import DeviceOpt, ModelArg, app, fails_cleanly, out_console, resolve_device
from kvtool.convert.care import REQUIRED_STATS, CareOptions, check_options, convert_layers, mla_state_dict
from kvtool.errors import KvtoolError
from kvtool.models import LoadedModel
from kvtool.validate import register_validator

FORMATS = ("kvtool", "deepseek-v3")


def preflight(spec: Any, opts: CareOptions, format: str) -> None:
    """Every check that needs no statistics: run before calibrating so bad options fail fast."""
    from kvtool.convert.deepseek_export import check_exportable

    if format not in FORMATS:
        raise KvtoolError(f"unknown --format {format!r}: use kvtool or deepseek-v3")
    check_options(spec, opts)
    if format == "deepseek-v3":
        check_exportable(spec, opts.rope, opts.rope_select)


def write_care(loaded: LoadedModel, store: StatsStore, out: Path, *, format: str = "kvtool",
               overwrite: bool = False, device: str = "cpu", dtype: str = "float32",
               statistics: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Convert ``loaded`` with CARE and write the checkpoint to ``out`` (atomically); returns the report."""
    from kvtool.checkpoint import atomic_dir, check_output_dir, provenance, save_model_checkpoint
    from kvtool.convert.deepseek_export import deepseek_v3_checkpoint, latent_rms
    from kvtool.modeling.mla import mla_config

    opts = CareOptions(**options)
    spec = loaded.spec
    preflight(spec, opts, format)
    check_output_dir(out, overwrite)
    store.require(REQUIRED_STATS, spec.num_layers, loaded.model_hash)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    weights = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    layers, report = convert_layers(weights, store, spec, opts, device=device)
    if format == "kvtool":
        state = mla_state_dict(weights, layers, spec, torch_dtype)
        config: Any = mla_config(loaded.model.config, [(r["r_k"], r["r_v"]) for r in report["layers"]], opts.rope,
                                 report["rope_dim"], [r.get("rope_pairs", []) for r in report["layers"]])
        config.dtype = dtype
    else:
        rms = latent_rms(layers, [store.second_moment(i, "attn_in") for i in range(spec.num_layers)])
        state, config, export = deepseek_v3_checkpoint(weights, layers, spec, loaded.model.config, rms, torch_dtype)
        config["dtype"] = dtype
        report["deepseek_v3"] = export
        report["kv_bytes_per_token_after"] = export["kv_bytes_per_token"]
    report["format"] = format
    manifest = provenance("convert-mla", {"format": format, "dtype": dtype, **opts.to_dict()}, loaded.identity(),
                          statistics or {"model": store.meta.get("model"), "dataset": store.meta.get("dataset"),
                                         "tokens": store.meta.get("tokens")}, report)
    with atomic_dir(out, overwrite) as tmp:
        save_model_checkpoint(tmp, state, config, manifest, loaded.tokenizer)
    return report


@app.command("convert-mla")
@fails_cleanly
def convert_mla(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the converted checkpoint.")] = ...,
    stats: Annotated[Path | None, typer.Option(
        help="Statistics folder from `kvtool calibrate` (needs attn_in); default: calibrate now.")] = None,
    method: Annotated[str, typer.Option(help="care (activation-aware) or svd (weight-only baseline).")] = "care",
    rank_alloc: Annotated[str, typer.Option(
        "--rank-alloc", help="uniform, care (water-filling on σ²/tail) or energy (min. total residual).")] = "uniform",
    kv_rank: Annotated[int | None, typer.Option(
        "--kv-rank", help="Cache width per layer (r_K + r_V [+ rope dims]); overrides --kv-ratio.")] = None,
    kv_ratio: Annotated[float, typer.Option(
        "--kv-ratio", help="Cache width as a fraction of the GQA cache 2*g*d (e.g. 0.5).")] = 0.5,
    rank_min: Annotated[int | None, typer.Option("--rank-min", help="Floor per K or V rank (care/energy).")] = None,
    rank_max: Annotated[int | None, typer.Option("--rank-max", help="Ceiling per K or V rank.")] = None,
    damping: Annotated[float, typer.Option(help="λ: C + λ·mean(diag C)·I before the square root.")] = 0.01,
    rope: Annotated[str, typer.Option(
        help="keep (reconstruct keys, then RoPE; exact at full rank) or decoupled (DeepSeek-style, absorbable).")
    ] = "keep",
    rope_dim: Annotated[int | None, typer.Option(
        "--rope-dim", help="Decoupled: shared rope key width (default 64, or head_dim/2 when head_dim <= 64).")] = None,
    rope_select: Annotated[str, typer.Option(
        "--rope-select", help="Decoupled: norm (largest ‖q‖‖k‖ pairs) or uniform (native DeepSeek rotary).")
    ] = "norm",
    format: Annotated[str, typer.Option(help="kvtool (per-layer ranks) or deepseek-v3 (stock transformers).")
                      ] = "kvtool",
    dataset: Annotated[str, typer.Option(help="Calibration text when --stats is not given.")] = "embedded",
    samples: Annotated[int, typer.Option(help="Calibration windows when --stats is not given.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length when --stats is not given.")] = 512,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="Output dtype: float32, bfloat16 or float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Convert GQA attention to MLA with CARE (activation-aware factorization, rank allocation, KV-parity).

    Example: kvtool convert-mla smollm2-135m --stats stats/ --kv-ratio 0.5 --rank-alloc care -o out/mla
    """
    from kvtool.models import load_model
    from kvtool.pipeline import statistics_for

    if dtype not in ("float32", "bfloat16", "float16"):
        raise KvtoolError(f"unknown --dtype {dtype!r}: use float32, bfloat16 or float16")
    options = dict(method=method, rank_alloc=rank_alloc, kv_rank=kv_rank, kv_ratio=kv_ratio, rank_min=rank_min,
                   rank_max=rank_max, damping=damping, rope=rope, rope_dim=rope_dim, rope_select=rope_select)
    from kvtool.checkpoint import check_output_dir

    check_output_dir(output, overwrite)
    device = resolve_device(device)
    loaded = load_model(model, device="cpu")
    preflight(loaded.spec, CareOptions(**options), format)
    store = statistics_for(loaded, REQUIRED_STATS, stats, dataset=dataset, samples=samples, seq_len=seq_len,
                           device=device)
    report = write_care(loaded, store, output, format=format, overwrite=overwrite, device=device, dtype=dtype,
                        **options)
    table = Table(title=f"CARE {method}/{rank_alloc}, rope={rope} -> {output} ({format})")
    for col in ("layers", "ranks K (min/mean/max)", "ranks V", "mean err K", "mean err V", "KV bytes/token"):
        table.add_column(col)
    rk = [r["r_k"] for r in report["layers"]]
    rv = [r["r_v"] for r in report["layers"]]
    table.add_row(str(len(rk)), f"{min(rk)}/{sum(rk) / len(rk):.1f}/{max(rk)}",
                  f"{min(rv)}/{sum(rv) / len(rv):.1f}/{max(rv)}", f"{report['mean_err_k']:.4f}",
                  f"{report['mean_err_v']:.4f}",
                  f"{report['kv_bytes_per_token_before']} -> {report['kv_bytes_per_token_after']}")
    out_console.print(table)


@register_validator("convert-mla")
def validate_mla(out: Path, manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Decode held-out tokens with the MLA model twice, PyTorch path vs Triton kernels; compare logits per step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtool.data import TextSource, heldout_tokens
    from kvtool.modeling.mla import set_decode_kernel

    if manifest.get("options", {}).get("format") != "kvtool":
        raise KvtoolError("validate runs the kvtool-format MLA model: convert with --format kvtool "
                          "(a deepseek-v3 export is checked by loading it in transformers and `kvtool eval`)")
    device = options.get("device", "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
    tokens = heldout_tokens(AutoTokenizer.from_pretrained(str(out)), TextSource(split="heldout"), 2 * 36)
    ids = tokens.view(2, 36).to(device)
    prefill, steps = 32, 4  # the Triton interpreter on a CPU runs each layer's kernel per step: keep it short
    runs = {}
    with torch.no_grad():
        for use in (False, True):
            n = set_decode_kernel(model, use)
            out_ = model(input_ids=ids[:, :prefill], use_cache=True)
            cache, logits = out_.past_key_values, []
            for t in range(prefill, prefill + steps):
                step = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = step.past_key_values
                logits.append(step.logits[:, -1].float())
            runs[use] = torch.stack(logits)
    set_decode_kernel(model, False)
    diff = (runs[True] - runs[False]).abs().max().item()
    rel = ((runs[True] - runs[False]).norm() / runs[False].norm()).item()
    agree = (runs[True].argmax(-1) == runs[False].argmax(-1)).float().mean().item()
    return {"passed": bool(rel < 1e-3 and agree == 1.0), "layers_through_kernel": n, "decode_steps": steps,
            "batch": 2, "prefill": prefill, "max_abs_logit_diff": diff, "rel_logit_diff": rel,
            "argmax_agreement": agree, "rope": manifest["options"]["rope"]}
