"""``corda``: CorDA adapter initialization (KPA / IPA) written as a stock PEFT LoRA adapter + residual base.

Output folder::

    OUT/kvtool.json                     provenance + per-module report (energy kept, damping, inverse error)
    OUT/adapter/adapter_config.json     PEFT LoRA config (lora_alpha = r, so the adapter's scale is 1)
    OUT/adapter/adapter_model.safetensors
    OUT/base/config.json, model.safetensors, tokenizer files    the residual model (W − B·A on targets)

``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT/adapter)`` equals the original
model at initialization. ``kvtool validate OUT`` runs every adapted linear through the fused Triton LoRA kernel.
Math: :mod:`kvtool.convert.corda`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError
from kvtool.methods.base import Method, RunContext, output_dtype, statistics_provenance
from kvtool.options import LAYERS_HELP, Options, option, parse_layers

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# down_proj needs the down_in statistic (I x I, large), which `kvtool calibrate` collects only when asked
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"


@dataclasses.dataclass
class CordaOptions(Options):
    """Options of ``kvtool corda`` (CLI flags and recipe keys)."""

    mode: str = option("kpa", "kpa: the adapter takes the r smallest components of W·C (knowledge-preserved; "
                              "statistics of the knowledge to keep); ipa: the r largest (instruction-previewed; "
                              "statistics of the task). Baselines: pissa (SVD of W alone), lora (random A, B = 0).",
                       choices=("kpa", "ipa", "pissa", "lora"))
    rank: int = option(16, "Adapter rank r (lora_alpha = r, scale 1).", positive=True)
    targets: str = option(DEFAULT_TARGETS, "Comma-separated projections to adapt (down_proj also needs the down_in "
                                           "statistic: calibrate with --statistics ...,down_in).")
    layers: str = option("all", LAYERS_HELP + " Sets PEFT's layers_to_transform.")
    damping: float = option(0.01, "Initial damping λ: C + λ·mean(diag C)·I, doubled until ‖C_λ·C_λ⁻¹ − I‖_F < "
                                  "--inverse-tol.", positive=True)
    max_damping: float = option(10.0, "Fail if the covariance still inverts badly above this damping.",
                                positive=True)
    inverse_tol: float = option(0.05, "Inverse-error tolerance of the damping search.", positive=True)
    init_seed: int = option(0, "Seed of the lora baseline's random A.")


class Corda(Method):
    name = "corda"
    Options = CordaOptions
    help = """CorDA adapter init: split each target W into a frozen residual W − B·A and a PEFT LoRA adapter B·A.

    Examples:
      kvtool corda smollm2-135m -o out/corda --mode kpa --rank 16 --samples 32 --seq-len 512
      kvtool corda smollm2-135m -o out/corda --stats-dir stats/ --layers 0-7

    Load for fine-tuning with stock PEFT:
      PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/corda/base"), "out/corda/adapter")
    """
    writes_model = True

    def targets(self, opts: CordaOptions) -> tuple[str, ...]:
        from kvtool.convert.corda import parse_targets

        return parse_targets(opts.targets)

    def required_stats(self, opts: CordaOptions) -> tuple[str, ...]:
        from kvtool.convert.corda import required_stats

        return required_stats(self.targets(opts), opts.mode)

    def preflight(self, spec: Any, opts: CordaOptions) -> None:
        if opts.damping > opts.max_damping:
            raise KvtoolError(f"--damping {opts.damping:g} must be at most --max-damping {opts.max_damping:g}")
        self.targets(opts)
        parse_layers(opts.layers, spec.num_layers if spec is not None else None)

    def check_model(self, loaded: Any, opts: CordaOptions) -> None:
        """Targets exist and the rank fits every target (before statistics are collected)."""
        import torch

        from kvtool.convert.corda import module_key

        layers = parse_layers(opts.layers, loaded.spec.num_layers)
        mods = dict(loaded.model.named_modules())
        for i in layers or range(loaded.spec.num_layers):
            for t in self.targets(opts):
                key = module_key(i, t)
                if key not in mods or not isinstance(mods[key], torch.nn.Linear):
                    raise KvtoolError(f"target module {t} is not present in this model ({key}): drop it from --targets")
                out_f, in_f = mods[key].weight.shape
                if opts.rank >= min(out_f, in_f):
                    raise KvtoolError(f"--rank {opts.rank} is not below min(in, out) = {min(out_f, in_f)} of {t} "
                                      f"({out_f}×{in_f}): choose --rank below {min(out_f, in_f)}")

    def run(self, loaded: Any, store: Any, out: Path, opts: CordaOptions, ctx: RunContext) -> dict[str, Any]:
        from kvtool.checkpoint import atomic_dir, provenance, save_tensors, untie_for_saving, write_json
        from kvtool.convert.corda import adapter_config, corda_transform
        from kvtool.progress import progress_bar

        self.preflight(loaded.spec, opts)
        self.check_model(loaded, opts)
        spec = loaded.spec
        targets = self.targets(opts)
        layers = parse_layers(opts.layers, spec.num_layers)
        chosen = layers if layers is not None else list(range(spec.num_layers))
        needed = self.required_stats(opts)
        for name in needed:
            if store is None:
                raise KvtoolError(f"statistics {','.join(needed)} are needed: pass --stats-dir DIR or let kvtool "
                                  "collect them")
            missing = [i for i in chosen if not store.has(i, name)]
            if missing:
                raise KvtoolError(f"statistic {name!r} missing for layer {missing[0]} ({len(missing)} layers): "
                                  f"recalibrate with --statistics including {name}")
        state = loaded.model.state_dict()
        base_dtype = output_dtype(ctx.dtype, loaded)

        def done(i: int) -> None:
            bar.advance(task)
            if store is not None and ctx.release_statistics:  # free each layer's statistics once factored
                for name in needed:
                    store.sums.pop((i, name), None)

        with progress_bar(ctx.progress) as bar:
            task = bar.add_task(f"corda {opts.mode} r={opts.rank}", total=len(chosen))
            adapter, residual, report = corda_transform(
                state, (lambda i, s: store.second_moment(i, s)) if needed else None, spec.num_layers, targets,
                opts.rank, opts.mode, damp=opts.damping, max_damp=opts.max_damping, inverse_tol=opts.inverse_tol,
                seed=opts.init_seed, base_dtype=base_dtype, layers=layers, on_layer=done, device=ctx.device,
                in_place=ctx.consume_model)
        new_state = {k: (v.to(base_dtype) if v.is_floating_point() else v) for k, v in {**state, **residual}.items()}
        options = {**opts.to_dict(), "dtype": str(base_dtype).replace("torch.", "")}
        manifest = provenance(self.name, options, loaded.identity(), statistics_provenance(store) if needed else None,
                              report)
        with atomic_dir(out, ctx.overwrite, ctx.inputs) as tmp:
            (tmp / "adapter").mkdir()
            (tmp / "base").mkdir()
            # the adapter belongs to the residual base (not the source): AutoPeftModelForCausalLM loads that pair
            cfg = adapter_config(targets, opts.rank, str(Path(out).resolve() / "base"), layers, spec.num_layers)
            write_json(tmp / "adapter" / "adapter_config.json", cfg)
            save_tensors(tmp / "adapter", adapter, prefix="adapter_model")
            config = loaded.model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp / "base")
            save_tensors(tmp / "base", untie_for_saving(new_state, bool(getattr(config, "tie_word_embeddings", False))))
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp / "base")
            if getattr(loaded.model, "generation_config", None) is not None:
                loaded.model.generation_config.save_pretrained(tmp / "base")
            write_json(tmp / "kvtool.json", manifest)
        return report

    def summary(self, report: dict[str, Any], out: Path) -> tuple[str, list[str], list[list[str]], list[str]]:
        cols = ["target", "modules", "energy kept (mean)", "min", "max", "max damping", "max inverse err"]
        rows = []
        for t in dict.fromkeys(m["target"] for m in report["modules"].values()):
            ms = [m for m in report["modules"].values() if m["target"] == t]
            e = [m["energy_kept"] for m in ms]
            damp_s = f"{max(m['damp'] for m in ms):.3g}" if "damp" in ms[0] else "-"
            inv_s = f"{max(m['inverse_error'] for m in ms):.2e}" if "inverse_error" in ms[0] else "-"
            rows.append([t, str(len(ms)), f"{sum(e) / len(e):.2e}", f"{min(e):.2e}", f"{max(e):.2e}", damp_s, inv_s])
        notes = [f"adapter parameters: {report['adapter_parameters']:,}; load with PeftModel.from_pretrained("
                 f"AutoModelForCausalLM.from_pretrained('{out}/base'), '{out}/adapter')"]
        return f"corda -> {out}", cols, rows, notes

    def validate(self, out: Path, manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """Logits of the base + adapter through the fused Triton LoRA kernel vs the PyTorch merged model (W_res + B·A),
        and the merged model vs the original model (the at-initialization identity)."""
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        from kvtool.data import embedded_text
        from kvtool.kernels.lora import FusedLoraLinear
        from kvtool.models import load_model

        device = options.get("device", "cpu")
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
        return report


def load_adapter(adapter_dir: Path) -> tuple[dict, dict[str, Any]]:
    """Read ``adapter_config.json`` and the adapter tensors of a kvtool (or PEFT) LoRA adapter folder."""
    from safetensors.torch import load_file

    cfg_path, st_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise KvtoolError(f"{adapter_dir} lacks adapter_config.json/adapter_model.safetensors: rerun kvtool corda")
    return json.loads(cfg_path.read_text()), load_file(str(st_path))


def adapted_modules(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{module path: (A, B)}`` from PEFT-named adapter tensors."""
    out: dict[str, tuple[Any, Any]] = {}
    prefix = "base_model.model."
    for k in tensors:
        if k.endswith(".lora_A.weight"):
            mod = k[len(prefix):-len(".lora_A.weight")] if k.startswith(prefix) else k[:-len(".lora_A.weight")]
            out[mod] = (tensors[k], tensors[k.replace(".lora_A.", ".lora_B.")])
    return out


