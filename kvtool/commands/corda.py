"""``kvtool corda``: CorDA adapter initialization (KPA / IPA) written as a stock PEFT LoRA adapter + residual base.

Output folder::

    OUT/kvtool.json                     provenance + per-module report (energy kept, damping, inverse error)
    OUT/adapter/adapter_config.json     PEFT LoRA config (lora_alpha = r, so the adapter's scale is 1)
    OUT/adapter/adapter_model.safetensors
    OUT/base/config.json, model.safetensors, tokenizer files    the residual model (W − B·A on targets)

``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT/adapter)`` equals the original
model at initialization. ``kvtool validate OUT`` runs every adapted linear through the fused Triton LoRA kernel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from kvtool.calib import StatsStore
from kvtool.cli import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    app,
    console,
    fails_cleanly,
    out_console,
    resolve_device,
)
from kvtool.convert.corda import (
    ALL_TARGETS,
    DEFAULT_DAMP,
    DEFAULT_INVERSE_TOL,
    DEFAULT_MAX_DAMP,
    MODES,
    adapter_config,
    corda_transform,
    module_key,
    parse_targets,
    required_stats,
)
from kvtool.errors import KvtoolError
from kvtool.models import LoadedModel
from kvtool.validate import register_validator

COMMAND = "corda"
# statistics for the default targets (all projections); a run with fewer targets needs fewer (see required_stats)
REQUIRED_STATS: tuple[str, ...] = required_stats(ALL_TARGETS)


def parse_layers(spec: str | None, num_layers: int | None = None) -> list[int] | None:
    """``--layers`` as ``0,1,5`` or ``0-7`` ranges (None = all layers)."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise KvtoolError(f"--layers {spec!r} is not a list of layer indices: use e.g. 0,1,2 or 0-7") from None
    if not out:
        raise KvtoolError("--layers is empty: give layer indices such as 0-7")
    if num_layers is not None and (min(out) < 0 or max(out) >= num_layers):
        raise KvtoolError(f"--layers {spec} is outside the model's {num_layers} layers: use 0-{num_layers - 1}")
    return sorted(out)


def check_options(mode: str, rank: int, damp: float, max_damp: float) -> None:
    """Validate options that need no model (before anything is loaded)."""
    if mode not in MODES:
        raise KvtoolError(f"unknown --mode {mode!r}: use kpa, ipa (CorDA) or the baselines pissa, lora")
    if rank < 1:
        raise KvtoolError(f"--rank {rank} must be at least 1")
    if not 0 < damp <= max_damp:
        raise KvtoolError(f"--damp {damp:g} must be positive and at most --max-damp {max_damp:g}")


def preflight(loaded: LoadedModel, targets: tuple[str, ...], rank: int, layers: list[int] | None) -> None:
    """Check targets exist and the rank fits every target before statistics are collected."""
    mods = dict(loaded.model.named_modules())
    for i in layers or range(loaded.spec.num_layers):
        for t in targets:
            key = module_key(i, t)
            if key not in mods or not isinstance(mods[key], torch.nn.Linear):
                raise KvtoolError(f"target module {t} is not present in this model ({key}): drop it from --targets")
            out_f, in_f = mods[key].weight.shape
            if rank >= min(out_f, in_f):
                raise KvtoolError(f"--rank {rank} is not below min(in, out) = {min(out_f, in_f)} of {t} "
                                  f"({out_f}×{in_f}): choose --rank below {min(out_f, in_f)}")


def _check_stats(store: StatsStore | None, names: tuple[str, ...], layers: list[int]) -> None:
    if not names:
        return
    if store is None:
        raise KvtoolError(f"statistics {','.join(names)} are needed: pass --stats DIR or let kvtool collect them")
    for name in names:
        missing = [i for i in layers if not store.has(i, name)]
        if missing:
            raise KvtoolError(f"statistic {name!r} missing for layer {missing[0]} ({len(missing)} layers): "
                              f"recalibrate with --stats including {name}")


def write_corda(loaded: LoadedModel, store: StatsStore | None, out: Path, *, mode: str = "kpa", rank: int = 16,
                targets: tuple[str, ...] | str | None = None, layers: list[int] | str | None = None,
                damp: float = DEFAULT_DAMP, max_damp: float = DEFAULT_MAX_DAMP,
                inverse_tol: float = DEFAULT_INVERSE_TOL, seed: int = 0, overwrite: bool = False,
                progress: bool = False, options: dict[str, Any] | None = None, release_stats: bool = False,
                device: str = "cpu") -> dict:
    """Run CorDA (or a baseline) on a loaded model and write ``out`` (adapter/, base/, kvtool.json) atomically.

    ``release_stats=True`` drops each layer's statistics from ``store`` once that layer is factored (lower peak
    memory when the store is not needed afterwards, as in the CLI). ``device`` runs the float64 factorizations
    there (e.g. ``cuda``); the model and outputs stay on the CPU.
    """
    from kvtool.checkpoint import atomic_dir, check_output_dir, provenance, save_tensors, untie_for_saving, write_json

    targets = parse_targets(targets)
    check_options(mode, rank, damp, max_damp)
    spec = loaded.spec
    if isinstance(layers, str):
        layers = parse_layers(layers, spec.num_layers)
    chosen = layers if layers is not None else list(range(spec.num_layers))
    check_output_dir(out, overwrite)
    preflight(loaded, targets, rank, chosen)
    needed = required_stats(targets, mode)
    _check_stats(store, needed, chosen)
    state = loaded.model.state_dict()
    base_dtype = next(loaded.model.parameters()).dtype

    from kvtool.progress import progress_bar

    def done(i: int) -> None:
        bar.advance(task)
        if release_stats and store is not None:
            for name in needed:
                store.sums.pop((i, name), None)

    with progress_bar(progress) as bar:
        task = bar.add_task(f"corda {mode} r={rank}", total=len(chosen))
        adapter, residual, report = corda_transform(
            state, (lambda i, s: store.second_moment(i, s)) if needed else None, spec.num_layers, targets, rank,
            mode, damp=damp, max_damp=max_damp, inverse_tol=inverse_tol, seed=seed, base_dtype=base_dtype,
            layers=layers, on_layer=done, device=device)
    new_state = {**state, **residual}
    stats_meta = None
    if store is not None and needed:
        stats_meta = {k: store.meta.get(k) for k in ("dataset", "tokens", "model") if k in store.meta}
    opts = {"mode": mode, "rank": rank, "targets": list(targets), "layers": layers, "damp": damp,
            "max_damp": max_damp, "inverse_tol": inverse_tol, "seed": seed, **(options or {})}
    manifest = provenance(COMMAND, opts, loaded.identity(), stats_meta, report)
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "adapter").mkdir()
        (tmp / "base").mkdir()
        cfg = adapter_config(targets, rank, str(loaded.path or loaded.source), layers, spec.num_layers)
        write_json(tmp / "adapter" / "adapter_config.json", cfg)
        save_tensors(tmp / "adapter", adapter, prefix="adapter_model")
        config = loaded.model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp / "base")
        save_tensors(tmp / "base", untie_for_saving(new_state, bool(getattr(config, "tie_word_embeddings", False))))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp / "base")
        write_json(tmp / "kvtool.json", manifest)
    return report


@app.command(COMMAND)
@fails_cleanly
def corda(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (adapter/, base/, kvtool.json).")] = ...,
    mode: Annotated[str, typer.Option(
        help="kpa: adapter takes the r smallest components of W·C (knowledge-preserved; use statistics of the "
             "knowledge to keep); ipa: the r largest (instruction-previewed; statistics of the task). Baselines: "
             "pissa (SVD of W alone), lora (random A, B = 0).")] = "kpa",
    rank: Annotated[int, typer.Option("--rank", "-r", help="Adapter rank r (lora_alpha = r, scale 1).")] = 16,
    targets: Annotated[str, typer.Option(
        help="Comma-separated projections to adapt, e.g. q_proj,v_proj.")] = ",".join(ALL_TARGETS),
    layers: Annotated[str | None, typer.Option(
        help="Only these decoder layers, e.g. 0-7 or 0,4,8 (default all); sets PEFT's layers_to_transform.")] = None,
    stats: Annotated[Path | None, typer.Option(
        "--stats", help="Statistics folder from `kvtool calibrate` (needs attn_in/o_in/mlp_in, and down_in when "
                        "down_proj is a target); omit to collect them now.")] = None,
    dataset: DatasetOpt = "embedded",
    samples: Annotated[int, typer.Option(help="Calibration windows when collecting statistics now.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")] = 512,
    calib_seed: Annotated[int, typer.Option("--calib-seed", help="Seed for choosing calibration windows.")] = 0,
    damp: Annotated[float, typer.Option(
        help="Initial damping λ: C + λ·mean(diag C)·I, doubled until ‖C_λ·C_λ⁻¹ − I‖_F < 0.05.")] = DEFAULT_DAMP,
    max_damp: Annotated[float, typer.Option(
        "--max-damp", help="Fail if the covariance still inverts badly above this damping.")] = DEFAULT_MAX_DAMP,
    seed: Annotated[int, typer.Option(help="Seed of the lora baseline's random A.")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward call when calibrating.")] = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """CorDA adapter init: split each target W into a frozen residual W − B·A and a PEFT LoRA adapter B·A.

    Example: kvtool corda smollm2-135m -o out/corda --mode kpa --rank 16 --samples 32 --seq-len 512

    Load for fine-tuning with stock PEFT:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/corda/base"), "out/corda/adapter")
    """
    from kvtool.checkpoint import check_output_dir
    from kvtool.models import load_model
    from kvtool.pipeline import statistics_for

    target_list = parse_targets(targets)
    check_options(mode, rank, damp, max_damp)
    check_output_dir(output, overwrite)
    if stats is not None and not Path(stats).is_dir():
        raise KvtoolError(f"--stats {stats} is not a folder: give the output of `kvtool calibrate`")
    device = resolve_device(device)
    loaded = load_model(model, dtype=dtype, device="cpu")
    layer_list = parse_layers(layers, loaded.spec.num_layers)
    preflight(loaded, target_list, rank, layer_list)
    needed = required_stats(target_list, mode)
    store = None
    if needed:
        store = statistics_for(loaded, needed, stats, dataset=dataset, samples=samples, seq_len=seq_len,
                               seed=calib_seed, device=device, batch_size=batch_size, progress=progress)
    calib = {} if stats is not None or not needed else {"dataset": dataset, "samples": samples, "seq_len": seq_len,
                                                         "calib_seed": calib_seed}
    report = write_corda(loaded, store, output, mode=mode, rank=rank, targets=target_list, layers=layer_list,
                         damp=damp, max_damp=max_damp, seed=seed, overwrite=overwrite, progress=progress,
                         release_stats=True, device=device,
                         options={"stats": str(stats) if stats else None, "dtype": dtype, **calib})
    table = Table(title=f"corda {mode} r={rank} -> {output}")
    for col in ("target", "modules", "energy kept (mean)", "min", "max", "max damping", "max inverse err"):
        table.add_column(col)
    for t in target_list:
        rows = [m for m in report["modules"].values() if m["target"] == t]
        e = [m["energy_kept"] for m in rows]
        damp_s = f"{max(m['damp'] for m in rows):.3g}" if "damp" in rows[0] else "-"
        inv_s = f"{max(m['inverse_error'] for m in rows):.2e}" if "inverse_error" in rows[0] else "-"
        table.add_row(t, str(len(rows)), f"{sum(e) / len(e):.2e}", f"{min(e):.2e}", f"{max(e):.2e}", damp_s, inv_s)
    out_console.print(table)
    out_console.print(f"adapter parameters: {report['adapter_parameters']:,}; load with "
                      f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{output}/base'), "
                      f"'{output}/adapter')")


# ------------------------------------------------------------------------------------------------ validate

def load_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``adapter_config.json`` and the adapter tensors of a kvtool (or PEFT) LoRA adapter folder."""
    from safetensors.torch import load_file

    cfg_path, st_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise KvtoolError(f"{adapter_dir} lacks adapter_config.json/adapter_model.safetensors: rerun kvtool corda")
    return json.loads(cfg_path.read_text()), load_file(str(st_path))


def adapted_modules(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}`` from PEFT-named adapter tensors."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    prefix = "base_model.model."
    for k in tensors:
        if k.endswith(".lora_A.weight"):
            mod = k[len(prefix):-len(".lora_A.weight")] if k.startswith(prefix) else k[:-len(".lora_A.weight")]
            out[mod] = (tensors[k], tensors[k.replace(".lora_A.", ".lora_B.")])
    return out


@register_validator(COMMAND)
def validate_corda(out: Path, manifest: dict, options: dict) -> dict:
    """Logits of the base + adapter through the fused Triton LoRA kernel vs the PyTorch merged model (W_res + B·A),
    and the merged model vs the original model (the at-initialization identity)."""
    import copy

    from transformers import AutoModelForCausalLM

    import kvtool.modeling  # noqa: F401
    from kvtool.data import embedded_text
    from kvtool.kernels.lora import FusedLoraLinear
    from kvtool.models import load_model

    device = options.get("device", "cpu")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KvtoolError("validating on the CPU runs the Triton kernel in its interpreter: set TRITON_INTERPRET=1 "
                          "(or use --device cuda)")
    cfg, tensors = load_adapter(out / "adapter")
    scale = cfg["lora_alpha"] / cfg["r"]
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32).to(device).eval()
    n_tokens = int(options.get("tokens", 32))
    ids = None
    if (out / "base" / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(out / "base"))
            ids = tok(embedded_text("heldout")[:4000], return_tensors="pt").input_ids[:, :n_tokens]
        except (OSError, ValueError):
            ids = None
    if ids is None or ids.numel() < 2:  # no usable tokenizer: seeded random tokens
        ids = torch.randint(0, base.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    mods = adapted_modules(tensors)
    fused = copy.deepcopy(base)
    named = dict(fused.named_modules())
    for path, (a, b) in mods.items():
        parent, _, child = path.rpartition(".")
        lin = named[path]
        setattr(named[parent], child, FusedLoraLinear(lin.weight.data, a.to(device), b.to(device),
                                                      lin.bias.data if lin.bias is not None else None, scale))
    merged_named = dict(base.named_modules())
    with torch.no_grad():
        logits_kernel = fused(input_ids=ids).logits.float()
        del fused
        for path, (a, b) in mods.items():
            w = merged_named[path].weight
            w.copy_((w.double() + scale * b.double().to(device) @ a.double().to(device)).to(w.dtype))
        logits_merged = base(input_ids=ids).logits.float()
    scale_ref = float(logits_merged.abs().max())
    kernel_err = float((logits_kernel - logits_merged).abs().max())
    report: dict[str, Any] = {"adapted_linears": len(mods), "tokens": int(ids.numel()),
                              "kernel_vs_merged_max_abs": kernel_err,
                              "kernel_vs_merged_rel": kernel_err / max(scale_ref, 1e-12)}
    tol = 1e-4 if device == "cpu" else 2e-3
    passed = report["kernel_vs_merged_rel"] < tol
    source = (manifest.get("model") or {}).get("source")
    original_ok = None
    if source and source != "in-memory":
        try:
            orig = load_model(source, device=device).model
        except KvtoolError as exc:
            report["original"] = f"not loadable ({exc})"
        else:
            with torch.no_grad():
                logits_orig = orig(input_ids=ids).logits.float()
            err = float((logits_orig - logits_merged).abs().max())
            report["merged_vs_original_max_abs"] = err
            report["merged_vs_original_rel"] = err / max(float(logits_orig.abs().max()), 1e-12)
            written_fp32 = (manifest.get("options") or {}).get("dtype", "float32") in ("float32", "fp32")
            original_ok = report["merged_vs_original_rel"] < (1e-4 if written_fp32 else 3e-2)
            passed = passed and original_ok
    report["passed"] = bool(passed)
    if not passed:
        console.print(f"[yellow]corda validate: {report}")
    return report
