"""``export``: OSCAR rotations and clip ratios for a 2-bit (or 4-bit) KV cache, and its validator.

Recipe key ``export`` (alias ``oscar``); kvtool.json ``command: export``. Writes ``OUT/oscar.safetensors``
(``layers.{i}.k_rotation``/``v_rotation`` [G, d, d] float32, ``k_clip``/``v_clip`` [G]),
``OUT/quantization_config.json``
and ``OUT/kvtool.json`` (per-layer attention-aware errors). With ``--fold`` OUT is also a loadable model checkpoint
whose W_v/W_o have R_v folded in. Math: :mod:`kvtool.convert.oscar`; runtime: :mod:`kvtool.runtime.kvquant`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError
from kvtool.methods.base import Method, RunContext, cached_decode_report, merge_decode_report, statistics_provenance
from kvtool.options import Options, option


@dataclasses.dataclass
class ExportOptions(Options):
    """Options of ``kvtool export`` (CLI flags and recipe keys)."""

    bits: int = option(2, "KV cache bits: 2 (INT2) or 4 (INT4).", choices=(2, 4))
    group_size: int | None = option(None, "Elements per scale/zero along head_dim; must divide head_dim "
                                          "(default: head_dim).", positive=True)
    rotation: str = option("cov-hadamard", "cov-hadamard (kvtool: per-head candidates scored by the attention-aware "
                                           "error), released (OSCAR's released U·H·P_br from query/attention-weighted "
                                           "moments), cov, hadamard (randomized), none.",
                           choices=("none", "hadamard", "cov", "cov-hadamard", "released"))
    clip: str = option("search", "search (clip ratios 1.0..0.5 minimizing the attention-aware error), quantile "
                                 "(OSCAR as released: clamp each rotated row at --k-quantile/--v-quantile of |row|), "
                                 "none.", choices=("search", "quantile", "none"))
    k_quantile: float = option(0.96, "Key clip quantile with --clip quantile.", low=0.01, high=1.0)
    v_quantile: float = option(0.92, "Value clip quantile with --clip quantile.", low=0.01, high=1.0)
    residual_window: int = option(256, "Recent tokens kept in full precision at decode (OSCAR's deployment: 256).",
                                  low=0)
    sink: int = option(64, "First tokens kept in full precision at decode (OSCAR's deployment: 64); left out of the "
                           "clip search.", low=0)
    kv_samples: int = option(4, "Calibration windows whose keys/values drive the clip search.", positive=True)
    fold: bool = option(False, "Also write a model checkpoint into OUT with R_v folded into W_v/W_o.")


class Export(Method):
    name = "export"
    aliases = ("oscar",)
    Options = ExportOptions
    help = """OSCAR: attention-aware rotations and clip ratios for a 2-bit KV cache, per layer and KV head.

    Examples:
      kvtool export smollm2-135m --stats-dir stats/ -o out/oscar      (64 sink + 256 recent tokens in 16 bits)
      kvtool export smollm2-135m --rotation released --clip quantile -o out/oscar-released   (OSCAR as released)
      kvtool export smollm2-135m --stats-dir stats/ --sink 4 --residual-window 64 -o out/oscar-small
      kvtool eval smollm2-135m --kv-quant out/oscar      (perplexity with the INT2 cache)
      TRITON_INTERPRET=1 kvtool validate out/oscar --device cpu   (Triton kernels on real K/V)
      python: model.generate(..., past_key_values=kvtool.runtime.Int2Cache.from_export("out/oscar", loaded))
    """
    writes_model = False
    required = ("q", "k", "v")

    def required_stats(self, opts: ExportOptions) -> tuple[str, ...]:
        return self.required

    def preflight(self, spec: Any, opts: ExportOptions) -> None:
        from kvtool.runtime.kvquant import check_bits_group

        if spec is not None:
            check_bits_group(opts.bits, opts.group_size or spec.head_dim, spec.head_dim)
            d = spec.head_dim
            if opts.rotation == "released" and d & (d - 1):
                raise KvtoolError(f"--rotation released needs a power-of-two head_dim (Hadamard, bit reversal); the "
                                  f"model has {d}: use --rotation cov-hadamard")

    def check_data(self, opts: ExportOptions, data: Any) -> None:
        if opts.sink >= data.seq_len:
            raise KvtoolError(f"--sink {opts.sink} leaves no calibration keys in windows of --seq-len {data.seq_len}: "
                              f"use a --seq-len above {opts.sink} or a smaller --sink")

    def run(self, loaded: Any, store: Any, out: Path, opts: ExportOptions, ctx: RunContext) -> dict[str, Any]:
        """Compute OSCAR rotations/clips and write the export folder ``out`` atomically. Calibration keys/values
        for the clip search come from ``kv_samples`` windows of ``seq_len`` tokens (seed ``seed + 1``)."""
        from kvtool.calib.kv_samples import collect_kv_samples
        from kvtool.checkpoint import atomic_dir, provenance, save_model_checkpoint, save_tensors, write_json
        from kvtool.convert.oscar import OscarOptions, fold_value_rotation, oscar_transform
        from kvtool.data import calibration_windows
        from kvtool.progress import progress_bar

        spec, data = loaded.spec, ctx.data
        self.preflight(spec, opts)
        self.check_data(opts, data)
        math_opts = OscarOptions(bits=opts.bits, group_size=opts.group_size, rotation=opts.rotation, clip=opts.clip,
                                 k_quantile=opts.k_quantile, v_quantile=opts.v_quantile,
                                 residual_window=opts.residual_window, sink=opts.sink, seed=data.seed)
        math_opts.check(spec.head_dim)
        store.require(self.required, spec.num_layers, loaded.model_hash)
        windows = calibration_windows(loaded.tokenizer, data.source(), opts.kv_samples, data.seq_len, data.seed + 1,
                                      spec.max_positions)
        samples = collect_kv_samples(loaded.model, windows, sink=opts.sink, progress=ctx.progress)
        w_o = {i: layer.self_attn.o_proj.weight.detach().cpu() for i, layer in enumerate(spec.layers(loaded.model))}
        with progress_bar(ctx.progress) as bar:
            task = bar.add_task("rotations + clip search", total=spec.num_layers)
            tensors, report = oscar_transform(w_o, store, samples, spec, math_opts,
                                              progress=lambda i: bar.advance(task))
        report["kv_calibration"] = {"windows": opts.kv_samples, "seq_len": data.seq_len,
                                    "tokens_per_head": int(samples[0][0].shape[0])}
        options = {**opts.to_dict(), "group_size": opts.group_size or spec.head_dim, "dataset": data.dataset,
                   "seq_len": data.seq_len, "seed": data.seed}
        manifest = provenance(self.name, options, loaded.identity(), statistics_provenance(store), report)
        with atomic_dir(out, ctx.overwrite, ctx.inputs) as tmp:
            save_tensors(tmp, tensors, prefix="oscar")
            write_json(tmp / "quantization_config.json", quantization_config(math_opts, spec, opts.fold))
            if opts.fold:
                state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
                v_rot = {i: tensors[f"layers.{i}.v_rotation"] for i in range(spec.num_layers)}
                save_model_checkpoint(tmp, fold_value_rotation(state, spec, v_rot), loaded.model.config, manifest,
                                      loaded.tokenizer, getattr(loaded.model, "generation_config", None))
            else:
                write_json(tmp / "kvtool.json", manifest)
        return report

    def summary(self, report: dict[str, Any], out: Path) -> tuple[str, list[str], list[list[str]], list[str]]:
        cols = ["layers", "group", "K err (plain -> oscar)", "V err (plain -> oscar)", "K clip mean", "V clip mean"]
        clips = [(h["k"]["clip"], h["v"]["clip"]) for r in report["layers"] for h in r["heads"]]
        row = [str(len(report["layers"])), str(report["group_size"]),
               f"{report['mean_k_rel_error_plain']:.4f} -> {report['mean_k_rel_error']:.4f}",
               f"{report['mean_v_rel_error_plain']:.4f} -> {report['mean_v_rel_error']:.4f}",
               f"{sum(c[0] for c in clips) / len(clips):.3f}", f"{sum(c[1] for c in clips) / len(clips):.3f}"]
        notes = ["errors: mean attention-aware relative error per KV head on calibration K/V (K: Δkᵀ C_Q Δk / "
                 "kᵀ C_Q k; V: through W_o); 'plain' = per-token INT without rotation or clipping"]
        return f"OSCAR export -> {out}", cols, [row], notes

    def validate(self, out: Path, manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """Run the INT2 kernels on real K/V of the source model: pack vs reference, decode attention vs reference.

        Keys/values/queries come from a held-out window; two layers (first and last) are checked; the block table is
        shuffled so paging is exercised. The export's sink and recent tokens go to the kernel's full-precision segment,
        the rest to the packed INT2 cache; also reports that attention's error against exact attention.
        """
        import torch

        from kvtool.data import TextSource, heldout_tokens
        from kvtool.models import load_model
        from kvtool.runtime.int2_cache import Int2Cache
        from kvtool.runtime.kvquant import kv_quantization, load_oscar_spec, quantile_clip

        device = options.get("device", "cpu")
        from kvtool.kernels.int2_kv import (
            decode_attention_reference,
            int2_decode_attention,
            new_paged_cache,
            quantize_pack,
            quantize_pack_reference,
        )

        cfg_bits = (manifest.get("options") or {}).get("bits", 2)
        if cfg_bits != 2:
            raise KvtoolError(f"the kernels implement INT2 only; {out} was exported with --bits {cfg_bits}")
        source = (manifest.get("model") or {}).get("source")
        loaded = load_model(source, device=device)
        spec = loaded.spec
        qspec = load_oscar_spec(out, head_dim=spec.head_dim, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads)
        sink, recent = qspec.sink, qspec.residual_window
        n_tok = max(int(options.get("tokens", 64)), sink + recent + 32)  # at least 32 INT2 history tokens
        ids = heldout_tokens(loaded.tokenizer, TextSource("embedded", "heldout"), n_tok)[None].to(device)
        layers = sorted({0, spec.num_layers - 1})
        got: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def capture(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            if module.layer_idx in layers:
                got[module.layer_idx] = (q[0, :, -1].detach(), k[0].transpose(0, 1).detach(),
                                         v[0].transpose(0, 1).detach())

        with torch.no_grad(), kv_quantization(loaded.model, None, capture=capture):
            loaded.model(input_ids=ids, use_cache=False)
        block = 16
        gen = torch.Generator().manual_seed(0)
        report: dict[str, Any] = {"layers": layers, "tokens": int(ids.shape[1])}
        worst_pack, worst_attn, worst_vs_exact = 0.0, 0.0, 0.0
        for i in layers:
            q, k_all, v_all = (t.float() for t in got[i])  # q [H, d] (last position); k, v [T, G, d]
            t_all = k_all.shape[0]
            fp_idx = torch.cat([torch.arange(sink), torch.arange(t_all - recent, t_all)]).to(device)
            k, v = k_all[sink:t_all - recent], v_all[sink:t_all - recent]  # INT2 history
            t_len = k.shape[0]
            n_blocks = (t_len + block - 1) // block
            perm = torch.randperm(n_blocks + 2, generator=gen)[:n_blocks].to(device)
            slots = (perm.repeat_interleave(block)[:t_len] * block + torch.arange(t_len, device=device) % block).long()
            gs = qspec.group_size
            kc = new_paged_cache(n_blocks + 2, spec.num_kv_heads, block, spec.head_dim, gs, device)
            vc = new_paged_cache(n_blocks + 2, spec.num_kv_heads, block, spec.head_dim, gs, device)
            k_rot, v_rot = qspec.k_rotation[i].to(device), qspec.v_rotation.get(i)
            v_rot = v_rot.to(device) if v_rot is not None else None
            if qspec.k_quantile is not None:  # released clip: rows are rotated and clamped before packing
                k = quantile_clip(torch.einsum("ged,tgd->tge", k_rot, k), qspec.k_quantile)
                v = quantile_clip(v if v_rot is None else torch.einsum("ged,tgd->tge", v_rot, v), qspec.v_quantile)
            pack_k_rot = None if qspec.k_quantile is not None else k_rot
            pack_v_rot = None if qspec.k_quantile is not None else v_rot
            quantize_pack(k, pack_k_rot, qspec.k_clip[i].to(device), slots, kc)
            quantize_pack(v, pack_v_rot, qspec.v_clip[i].to(device), slots, vc)
            ref_packed, _, _ = quantize_pack_reference(k, pack_k_rot, qspec.k_clip[i].to(device), gs)
            packed = kc[0][slots // block, :, slots % block]
            mismatch = float((packed != ref_packed).float().mean())
            fp_seg, fp_lens = None, None
            if fp_idx.numel():  # full-precision sink + recent tokens, stored rotated like the cache
                fk = torch.einsum("ged,tgd->gte", k_rot, k_all[fp_idx])
                fv = v_all[fp_idx].transpose(0, 1) if v_rot is None else torch.einsum("ged,tgd->gte", v_rot,
                                                                                       v_all[fp_idx])
                fp_seg, fp_lens = (fk[None].contiguous(), fv[None].contiguous()), torch.tensor([fp_idx.numel()],
                                                                                                device=device)
            args = (q[None], kc, vc, perm[None].int(), torch.tensor([t_len], device=device), k_rot, v_rot)
            out_k = int2_decode_attention(*args, block_n=16, fp_segment=fp_seg, fp_lens=fp_lens)
            out_r = decode_attention_reference(*args, fp_segment=fp_seg, fp_lens=fp_lens)
            rep = q.shape[0] // spec.num_kv_heads
            kk, vv = k_all.transpose(0, 1).repeat_interleave(rep, 0), v_all.transpose(0, 1).repeat_interleave(rep, 0)
            exact = torch.softmax(torch.einsum("hd,htd->ht", q, kk) * spec.head_dim ** -0.5, -1)
            exact = torch.einsum("ht,htd->hd", exact, vv)
            attn_err = float((out_k - out_r).abs().max() / out_r.abs().max())
            vs_exact = float((out_k[0] - exact).norm() / exact.norm())
            report[f"layer{i}_packed_byte_mismatch"] = mismatch
            report[f"layer{i}_kernel_vs_reference_rel_max_err"] = attn_err
            report[f"layer{i}_int2_vs_exact_attention_rel_err"] = vs_exact
            worst_pack, worst_attn = max(worst_pack, mismatch), max(worst_attn, attn_err)
            worst_vs_exact = max(worst_vs_exact, vs_exact)
        report["int2_history_tokens"] = int(n_tok - sink - recent)
        report["fp_tokens (sink + recent)"] = int(sink + recent)
        report["max_packed_byte_mismatch"] = worst_pack
        report["max_kernel_vs_reference_rel_err"] = worst_attn
        report["max_int2_vs_exact_attention_rel_err"] = worst_vs_exact
        # rounding-boundary ties can flip a code between float orders; attention uses fp16 operands
        report["passed"] = bool(worst_pack <= 1e-3 and worst_attn <= 1e-2)
        # generate with Int2Cache against the same decode emulated in a full forward; short windows, so that
        # the check's few tokens really go through the 2-bit cache. Tolerance 1e-3, not 1e-4: a key computed in a
        # one-token decode step and in the full forward differs in the last float32 bit (other matrix shapes), and
        # at a rounding tie that flips its INT2 code by one step (a third of its group's range); on the embedded
        # model that leaves 1.4e-4 (docs/notes/closing-2026-12-04.md)
        short = dataclasses.replace(qspec, sink=min(sink, 2), residual_window=min(recent, 4))
        decode = cached_decode_report(
            loaded.model, loaded.tokenizer, device, new_cache=lambda: Int2Cache(short, spec.num_layers),
            reference=lambda: kv_quantization(loaded.model, dataclasses.replace(short, prefill=8)), tolerance=1e-3)
        decode["decode_windows (sink, recent)"] = f"{short.sink}, {short.residual_window}"
        return merge_decode_report(report, decode)


def quantization_config(opts: Any, spec: Any, folded: bool) -> dict[str, Any]:
    """The ``quantization_config.json`` content (docs/formats.md, "OSCAR export"): a ``kv_cache_scheme`` in the
    style of compressed-tensors (what is quantized how) plus ``rotations``/``clipping``/``full_precision`` (what
    OSCAR adds: which tensors rotate where, how rows are clipped, which tokens stay in 16 bits)."""
    gs = opts.group_size or spec.head_dim
    quantile = opts.clip == "quantile"
    return {
        "quant_method": "kvtool-oscar",
        "format_version": 2,
        "kv_cache_scheme": {
            "num_bits": opts.bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": gs,
            "dynamic": True, "observer": "minmax", "scale_dtype": "float16", "zp_dtype": "float16",
            "granularity": "per token, per KV head, per group of group_size consecutive head_dim elements",
            "targets": ["key", "value"],
        },
        "rotations": {
            "file": "oscar.safetensors", "convention": "row: cached x' = R x; R [kv_heads, head_dim, head_dim] "
                                                       "float32 per layer",
            "key": "layers.{i}.k_rotation, applied after RoPE (and q_norm/k_norm); every query head of KV group g "
                   "uses q' = R_k[g] q, so q'.k' = q.k",
            "value": "layers.{i}.v_rotation; the attention output is rotated back by R_v^T"
                     + (" (folded into this checkpoint: W_v <- R_v W_v, W_o <- W_o R_v^T; a rotation-aware "
                        "engine needs only R_k)" if folded else " (foldable into W_v and W_o: `kvtool export --fold`)"),
            "value_folded": folded, "mode": opts.rotation,
        },
        "clipping": {
            "mode": opts.clip,
            "key_quantile": opts.k_quantile if quantile else None,
            "value_quantile": opts.v_quantile if quantile else None,
            "rule": ("clamp each rotated (token, KV head) row to [-t, t], t = sorted(|row|)[min(int(q*head_dim), "
                     "head_dim-1)], before the group min/max" if quantile else
                     "range [lo, hi] of each group shrunk around its midpoint by layers.{i}.k_clip/v_clip "
                     "(per layer, KV head; 1.0 = no clip)"),
        },
        "full_precision": {"sink": opts.sink, "residual_window": opts.residual_window,
                           "rule": "the first `sink` tokens and the `residual_window` most recent stay in 16 bits; "
                                   "a token is quantized once, when it leaves the recent window"},
        "packing": f"{8 // opts.bits} codes per byte, element {8 // opts.bits}c+t in bits {opts.bits}t.. of byte c",
        "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
    }
