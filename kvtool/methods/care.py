"""``convert-mla``: CARE GQA -> MLA (activation-aware factorization, rank allocation, KV-parity mapping).

Recipe key ``convert-mla`` (alias ``care``); kvtool.json ``command: convert-mla``. Math: :mod:`kvtool.convert.care`
and :mod:`kvtool.convert.deepseek_export`; the converted model runs in :mod:`kvtool.runtime.mla`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from kvtool.errors import KvtoolError
from kvtool.methods.base import (
    Method,
    RunContext,
    cached_decode_report,
    merge_decode_report,
    output_dtype,
    size_note,
    size_report,
    statistics_provenance,
)
from kvtool.options import Options, option

FORMATS = ("kvtool", "deepseek-v3", "gguf")
DEEPSEEK_FORMATS = ("deepseek-v3", "gguf")  # gguf: the deepseek-v3 checkpoint plus model.gguf for llama.cpp
LATENT_SAMPLES = 2048  # calibration tokens per layer kept for the kv_a_layernorm fit (deepseek-v3)


@dataclasses.dataclass
class ConvertMlaOptions(Options):
    """Options of ``kvtool convert-mla`` (CLI flags and recipe keys)."""

    method: str = option("care", "care (activation-aware) or svd (weight-only baseline).", choices=("care", "svd"))
    rank_alloc: str | None = option(None, "uniform, care (CARE Eq. 1: water-filling on σ²/tail), energy (min. "
                                          "total residual), sensitivity (min. predicted calibration-loss "
                                          "increase, K and V of all layers in one pool; one extra forward+backward "
                                          "pass) or sensitivity-split (the same rule within each layer: equal "
                                          "widths, only the K/V split moves). Default: sensitivity, or "
                                          "sensitivity-split for --format deepseek-v3 (one kv_lora_rank for all "
                                          "layers).",
                                    choices=("uniform", "care", "energy", "sensitivity", "sensitivity-split"))
    kv_rank: int | None = option(None, "Cache width per layer (r_K + r_V [+ rope dims]); overrides --kv-ratio.",
                                 positive=True)
    kv_ratio: float = option(0.5, "Cache width as a fraction of the GQA cache 2*g*d (e.g. 0.5).", positive=True,
                             high=1.0)
    rank_min: int | None = option(None, "Floor per K or V rank (care/energy allocation).", positive=True)
    rank_max: int | None = option(None, "Ceiling per K or V rank.", positive=True)
    damping: float = option(0.01, "λ: C + λ·mean(diag C)·I before the square root.", low=0.0)
    rope: str | None = option(None, "keep (reconstruct keys, then RoPE; exact at full rank) or decoupled "
                                    "(DeepSeek-style, absorbable). Default: keep, or decoupled for --format "
                                    "deepseek-v3.", choices=("keep", "decoupled"))
    rope_dim: int | None = option(None, "Decoupled: shared rope key width. Default min(64, head_dim) "
                                        "(DeepSeek's and FlashMLA's 64), at most a third of the layer's cache "
                                        "width, a multiple of 8 (e.g. 32 for SmolLM2 at --kv-ratio 0.25).",
                                  positive=True)
    rope_select: str | None = option(None, "Decoupled: norm (largest ‖q‖‖k‖ pairs, any set), strided (the best "
                                           "{0, s, 2s, ...} by the same score, what DeepSeek's rotary expresses) or "
                                           "uniform (s = head_dim/rope_dim). Default: norm, or strided for "
                                           "--format deepseek-v3.", choices=("norm", "strided", "uniform"))
    rope_fold: int | None = option(None, "Decoupled: FreqFold, each kept pair's RoRoPE group spans this many "
                                         "adjacent pairs (1 = none). Default: the stride of the kept pairs "
                                         "(strided/uniform: the groups partition all pairs), 2 for norm.",
                                   positive=True)
    latent_norm: str = option("lsq", "deepseek-v3: how kv_a_layernorm is approximated: lsq (per-channel "
                                     "least-squares weight on calibration tokens), ballast (one latent channel meant "
                                     "to make the per-token RMS nearly constant, then lsq), mean-rms, "
                                     "inv-mean-inv-rms or rms (docs/benchmarks.md compares them).",
                              choices=("ballast", "lsq", "mean-rms", "inv-mean-inv-rms", "rms"))
    format: str = option("kvtool", "kvtool (per-layer ranks, exact), deepseek-v3 (stock transformers "
                                   "DeepseekV3ForCausalLM) or gguf (the deepseek-v3 checkpoint plus model.gguf for "
                                   "llama.cpp in the output --dtype, written after --heal-steps; `kvtool export-gguf` "
                                   "writes one from any deepseek-v3 output, f16 by default).", choices=FORMATS)
    q_lora: str = option("none", "deepseek-v3: the query path. none: q_proj, q_lora_rank null (transformers, vLLM); "
                                 "identity: q_lora_rank = hidden size, q_a_proj the identity and the input norm's "
                                 "weight folded into q_b_proj and kv_a_proj_with_mqa (llama.cpp loads it for any "
                                 "layer count; exact up to the norm's eps).", choices=("none", "identity"))
    heal_steps: int = option(0, "Then heal the output (kvtool heal with its defaults): Adam steps per layer; 0 = "
                                "off.", low=0)

    def resolved(self) -> ConvertMlaOptions:
        """Defaults that depend on the format filled in (DeepSeek: decoupled RoPE on strided pairs, one width for all
        layers)."""
        ds = self.format in DEEPSEEK_FORMATS
        return dataclasses.replace(self, rope=self.rope or ("decoupled" if ds else "keep"),
                                   rank_alloc=self.rank_alloc or ("sensitivity-split" if ds else "sensitivity"),
                                   rope_select=self.rope_select or ("strided" if ds else "norm"),
                                   rope_fold=self.rope_fold or 0)

    def care_options(self) -> Any:
        """The math's option bundle (:class:`kvtool.convert.care.CareOptions`)."""
        from kvtool.convert.care import CareOptions

        r = self.resolved()
        return CareOptions(**{f.name: getattr(r, f.name) for f in dataclasses.fields(CareOptions)})


class ConvertMla(Method):
    name = "convert-mla"
    data_defaults = {"dataset": "suite"}  # statistics on the evaluation suite's calibration parts (kvtool.data)
    aliases = ("care",)
    Options = ConvertMlaOptions
    help = """Convert GQA attention to MLA with CARE (activation-aware factorization, rank allocation, KV-parity).

    Examples:
      kvtool convert-mla smollm2-135m --stats-dir stats/ --kv-ratio 0.5 -o out/mla
      kvtool convert-mla smollm2-135m --format deepseek-v3 --kv-ratio 0.5 -o out/mla-ds
    """
    required: ClassVar[tuple[str, ...]] = ("attn_in",)

    def required_stats(self, opts: ConvertMlaOptions) -> tuple[str, ...]:
        return self.required

    def visitors(self, opts: ConvertMlaOptions) -> dict[str, Any]:
        if opts.format in DEEPSEEK_FORMATS and opts.latent_norm != "rms":
            from kvtool.calib.input_samples import AttnInputSampler

            return {"latent-inputs": AttnInputSampler(LATENT_SAMPLES)}
        return {}

    def preflight(self, spec: Any, opts: ConvertMlaOptions) -> None:
        from kvtool.convert.care import check_options
        from kvtool.convert.deepseek_export import check_exportable

        r = opts.resolved()
        if r.q_lora != "none" and r.format not in DEEPSEEK_FORMATS:
            raise KvtoolError(f"--q-lora {r.q_lora} shapes the DeepSeek-V3 export's query path: add --format "
                              "deepseek-v3 (or gguf) or drop --q-lora")
        if r.format in DEEPSEEK_FORMATS:
            check_exportable(spec, r.rope, r.rope_select, r.rank_alloc)
        if spec is not None:
            check_options(spec, opts.care_options())

    def run(self, loaded: Any, store: Any, out: Path, opts: ConvertMlaOptions, ctx: RunContext) -> dict[str, Any]:
        from kvtool.checkpoint import atomic_dir, provenance, save_model_checkpoint
        from kvtool.convert.care import SENSITIVITY_ALLOCATIONS, convert_layers, mla_state_dict
        from kvtool.convert.deepseek_export import add_ballast, deepseek_v3_checkpoint, latent_norm_weights
        from kvtool.runtime.mla import mla_config

        spec = loaded.spec
        self.preflight(spec, opts)
        store.require(self.required, spec.num_layers, loaded.model_hash)
        care = opts.care_options()
        torch_dtype = output_dtype(ctx.dtype, loaded)
        dtype_name = str(torch_dtype).replace("torch.", "")
        weights = {k: v.detach() for k, v in loaded.model.state_dict().items()}
        sensitivity = None
        if care.rank_alloc in SENSITIVITY_ALLOCATIONS:
            from kvtool.calib.sensitivity import kv_sensitivity
            from kvtool.data import calibration_windows

            d = ctx.data
            windows = calibration_windows(loaded.tokenizer, d.source(), d.samples, d.seq_len, d.seed,
                                          spec.max_positions)
            sensitivity = kv_sensitivity(loaded, windows, device=ctx.device, batch_size=d.batch_size,
                                         progress=ctx.progress)
        layers, report = convert_layers(weights, store, spec, care, device=ctx.device, sensitivity=sensitivity)
        if sensitivity is not None:
            report["sensitivity"] = sensitivity
        if opts.format == "kvtool":
            state = mla_state_dict(weights, layers, spec, torch_dtype)
            config: Any = mla_config(loaded.model.config, [(r["r_k"], r["r_v"]) for r in report["layers"]],
                                     care.rope, report["rope_dim"], [r.get("rope_pairs", []) for r in report["layers"]])
            config.dtype = dtype_name
        else:
            sampler = ctx.visitors.get("latent-inputs")
            samples = [sampler.samples[i] for i in range(spec.num_layers)] if sampler is not None else None
            rule, spread = opts.latent_norm, None
            if rule == "ballast":
                layers, spread = add_ballast(layers, samples, [sampler.first[i] for i in range(spec.num_layers)])
                rule = "lsq"
            norms = latent_norm_weights(layers, samples, [store.second_moment(i, "attn_in")
                                                          for i in range(spec.num_layers)],
                                        float(loaded.model.config.rms_norm_eps), rule)
            state, config, export = deepseek_v3_checkpoint(weights, layers, spec, loaded.model.config, norms,
                                                           torch_dtype, q_lora=opts.q_lora)
            export["latent_norm"] = opts.latent_norm
            if spread is not None:
                export["ballast_relative_spread"] = spread
            config["dtype"] = dtype_name
            report["deepseek_v3"] = export
            report["kv_bytes_per_token_after"] = export["kv_bytes_per_token"]
        report["format"] = opts.format
        elem = torch_dtype.itemsize
        report.update(size_report(weights, state, bool(loaded.model.config.tie_word_embeddings), elem,
                                  report["kv_bytes_per_token_before"], report["kv_bytes_per_token_after"]))
        options = {**opts.resolved().to_dict(), "dtype": dtype_name}
        manifest = provenance(self.name, options, loaded.identity(), statistics_provenance(store), report)
        with atomic_dir(out, ctx.overwrite, ctx.inputs) as tmp:
            save_model_checkpoint(tmp, state, config, manifest, loaded.tokenizer,
                                  getattr(loaded.model, "generation_config", None))
            if opts.heal_steps:
                from kvtool.methods.heal import heal_written

                report["healing"] = heal_written(tmp, loaded, opts.heal_steps, ctx)
            if opts.format == "gguf":
                from kvtool.convert.gguf_export import GGUF_FILE, source_pre_tokenizer, write_gguf

                # after healing (which rewrites the checkpoint); kvtool.json's report is the checkpoint's
                write_gguf(tmp, tmp / GGUF_FILE, {"float16": "f16", "bfloat16": "bf16"}.get(dtype_name, "f32"),
                           source_pre_tokenizer(tmp, loaded.source), name=Path(out).name)
        return report

    def summary(self, report: dict[str, Any], out: Path) -> tuple[str, list[str], list[list[str]], list[str]]:
        rk = [r["r_k"] for r in report["layers"]]
        rv = [r["r_v"] for r in report["layers"]]
        row = [str(len(rk)), f"{min(rk)}/{sum(rk) / len(rk):.1f}/{max(rk)}",
               f"{min(rv)}/{sum(rv) / len(rv):.1f}/{max(rv)}",
               f"{report['mean_err_k']:.4f}", f"{report['mean_err_v']:.4f}",
               f"{report['kv_bytes_per_token_before']} -> {report['kv_bytes_per_token_after']}"]
        cols = ["layers", "ranks K (min/mean/max)", "ranks V", "mean err K", "mean err V", "KV bytes/token"]
        notes = [size_note(report)] if "memory_at" in report else []
        if report.get("healing"):
            from kvtool.methods.heal import healing_note

            notes.append(healing_note(report["healing"]))
        return f"CARE -> {out} ({report['format']})", cols, [row], notes

    def validate(self, out: Path, manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """Cached decode vs the full forward (every format; the DeepSeek-V3 export both in stock transformers and
        through kvtool's latent runtime), then decode held-out tokens twice, PyTorch path vs Triton kernels, and
        compare logits and greedy tokens."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from kvtool.runtime import register_auto_classes

        register_auto_classes()  # kvtool's MLA config and model classes (AutoConfig below reads the output)
        device = options.get("device", "cpu")
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        fmt = manifest.get("options", {}).get("format")
        if fmt != "kvtool":  # deepseek-v3: as users load it (stock transformers), then through kvtool's runtime
            from kvtool.runtime.deepseek import use_latent_attention

            model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
            stock = cached_decode_report(model, tokenizer, device)
            use_latent_attention(model)
            report = _kernel_vs_pytorch(model, tokenizer, device, {"format": fmt})
            report["stock_transformers_decode_passed"] = stock["decode_passed"]
            report["stock_transformers_decode_rel_err"] = stock["cached_vs_full_max_rel_err"]
            report["passed"] = bool(report["passed"] and stock["decode_passed"])
            return report
        cfg = AutoConfig.from_pretrained(str(out))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if cfg.mla_rope == "keep" and (head_dim < 32 or head_dim & (head_dim - 1)):
            raise KvtoolError(f"the rope=keep MLA decode kernel needs a power-of-two head_dim >= 32 (this model has "
                              f"{head_dim}): kernel validation is not available; `kvtool eval` still scores it")
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
        return _kernel_vs_pytorch(model, tokenizer, device, {"rope": manifest["options"]["rope"]})


def _kernel_vs_pytorch(model: Any, tokenizer: Any, device: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Cached decode vs the full forward on the PyTorch path, then held-out tokens decoded twice (PyTorch path vs
    the Triton kernels: logits and greedy ``generate`` tokens), for kvtool MLA and DeepSeek-V3 latent models."""
    import torch

    from kvtool.data import TextSource, heldout_tokens
    from kvtool.runtime.hf_cache import cache_kwarg, output_cache
    from kvtool.runtime.mla import set_decode_kernel

    set_decode_kernel(model, False)
    decode = cached_decode_report(model, tokenizer, device)
    tokens = heldout_tokens(tokenizer, TextSource(split="heldout"), 2 * 36)
    ids = tokens.view(2, 36).to(device)
    prefill, steps = 32, 4  # the Triton interpreter on a CPU runs each layer's kernel per step: keep it short
    runs = {}
    with torch.no_grad():
        for use in (False, True):
            n = set_decode_kernel(model, use)
            out_ = model(input_ids=ids[:, :prefill], use_cache=True)
            cache, logits = output_cache(out_), []
            for t in range(prefill, prefill + steps):
                step = model(input_ids=ids[:, t:t + 1], use_cache=True, **{cache_kwarg(): cache})
                cache = output_cache(step)
                logits.append(step.logits[:, -1].float())
            runs[use] = torch.stack(logits)
        gen = {}
        prompt = ids[:1, :prefill]
        for use in (False, True):  # greedy generate through each path: the same tokens
            set_decode_kernel(model, use)
            gen[use] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)[0, prefill:]
    set_decode_kernel(model, None)
    same_tokens = bool(torch.equal(gen[True], gen[False]))
    diff = (runs[True] - runs[False]).abs().max().item()
    rel = ((runs[True] - runs[False]).norm() / runs[False].norm()).item()
    agree = (runs[True].argmax(-1) == runs[False].argmax(-1)).float().mean().item()
    return merge_decode_report({"passed": bool(rel < 1e-3 and agree == 1.0 and same_tokens),
                                "generate_kernel_vs_pytorch_same_tokens": same_tokens, "layers_through_kernel": n,
                                "decode_steps": steps, "batch": 2, "prefill": prefill,
                                "max_abs_logit_diff": diff, "rel_logit_diff": rel, "argmax_agreement": agree,
                                **extra}, decode)
