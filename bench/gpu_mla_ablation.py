"""Ablation of the absorbed MLA decode kernel's launch (what bounds its bandwidth at batch 32 / 32k).

    python3 bench/gpu_mla_ablation.py                       # every variant, timed under CUDA graphs, vs SDPA
    ncu ... python3 bench/gpu_mla_ablation.py --one default  # one eager call of one variant, for Nsight Compute

Shapes: Llama-3-8B attention (32 query heads, 8 KV heads x 128), kvtool-format uniform latents: KV ratio 0.5 ->
key latent 480 + 64 rope, value latent 480; 0.25 -> 224 + 64, 224. Variants change one thing against the default
launch (:func:`kvtool.kernels.mla_decode.absorbed_launch`): pipeline stages, key chunk width, token tile, warps,
output slices per head block (``dv_parts``: scores recomputed per slice, key tiles re-read from L2), heads per
program. Methodology: bench/gpu_common.py (graphs, medians; the best variant is timed again for its number).
"""

from __future__ import annotations

import argparse

import torch

H, G, D, ROPE = 32, 8, 128, 64
VARIANTS = {
    "default": {},
    "stages1": {"num_stages": 1}, "stages2": {"num_stages": 2}, "stages4": {"num_stages": 4},
    "block_d32": {"block_d": 32}, "block_d128": {"block_d": 128},
    "block_n32": {"block_n": 32}, "block_n128_w8": {"block_n": 128, "num_warps": 8},
    "warps8": {"num_warps": 8},
    "dv_parts2": {"dv_parts": 2}, "dv_parts2_w8": {"dv_parts": 2, "num_warps": 8},
    "dv_parts4": {"dv_parts": 4},
    "heads16": {"block_h": 16}, "heads16_dv2": {"block_h": 16, "dv_parts": 2},
    "stages4_n128_w8": {"num_stages": 4, "block_n": 128, "num_warps": 8},
    "stages4_d128": {"num_stages": 4, "block_d": 128},
    # the full-tile kernel (whole key row per token tile, the token loop pipelined)
    "full_n32_w8_s2": {"tile": "full", "block_n": 32, "num_warps": 8, "num_stages": 2},
    "full_n32_w8_s3": {"tile": "full", "block_n": 32, "num_warps": 8, "num_stages": 3},
    "full_n32_w4_s2": {"tile": "full", "block_n": 32, "num_warps": 4, "num_stages": 2},
    "full_n16_w4_s3": {"tile": "full", "block_n": 16, "num_warps": 4, "num_stages": 3},
    "full_n16_w8_s4": {"tile": "full", "block_n": 16, "num_warps": 8, "num_stages": 4},
    "full_n64_w8_s1": {"tile": "full", "block_n": 64, "num_warps": 8, "num_stages": 1},
    "full_n64_w8_s2": {"tile": "full", "block_n": 64, "num_warps": 8, "num_stages": 2},
    "full_n32_w4_s3": {"tile": "full", "block_n": 32, "num_warps": 4, "num_stages": 3},
    "full_n64_w4_s2": {"tile": "full", "block_n": 64, "num_warps": 4, "num_stages": 2},
    "full_n64_w8_s3": {"tile": "full", "block_n": 64, "num_warps": 8, "num_stages": 3},
    "full_n16_w4_s4": {"tile": "full", "block_n": 16, "num_warps": 4, "num_stages": 4},
    "full_n16_w4_s3_sp132": {"tile": "full", "block_n": 16, "num_warps": 4, "num_stages": 3, "num_splits": 132},
    "full_n32_w4_s3_sp132": {"tile": "full", "block_n": 32, "num_warps": 4, "num_stages": 3, "num_splits": 132},
    "full_n32_w4_s2_sp66": {"tile": "full", "block_n": 32, "num_warps": 4, "num_stages": 2, "num_splits": 66},
    "full_n16_w8_s3": {"tile": "full", "block_n": 16, "num_warps": 8, "num_stages": 3},
    "full_n16_w8_s2": {"tile": "full", "block_n": 16, "num_warps": 8, "num_stages": 2},
    "full_n32_w8_s2_sp132": {"tile": "full", "block_n": 32, "num_warps": 8, "num_stages": 2, "num_splits": 132},
    "full_n16_w8_s3_sp132": {"tile": "full", "block_n": 16, "num_warps": 8, "num_stages": 3, "num_splits": 132},
    "full_h32_n16_w8_s3": {"tile": "full", "block_h": 32, "block_n": 16, "num_warps": 8, "num_stages": 3},
    "full_h32_n16_w8_s2": {"tile": "full", "block_h": 32, "block_n": 16, "num_warps": 8, "num_stages": 2},
    "full_h32_n32_w8_s2": {"tile": "full", "block_h": 32, "block_n": 32, "num_warps": 8, "num_stages": 2},
    "full_h32_n16_w4_s3": {"tile": "full", "block_h": 32, "block_n": 16, "num_warps": 4, "num_stages": 3},
    "full_n16_w4_s2": {"tile": "full", "block_n": 16, "num_warps": 4, "num_stages": 2},
    "full_n16_w4_s3_splits132": {"tile": "full", "block_n": 16, "num_warps": 4, "num_stages": 3, "num_splits": 132},
    "full_n16_w4_s3_sp528": {"tile": "full", "block_n": 16, "num_warps": 4, "num_stages": 3, "num_splits": 528},
}


def tensors(ratio: float, batch: int, ctx: int, dev: str):
    width = int(ratio * 2 * G * D)
    r_k = (width - ROPE) // 2
    r_v = width - ROPE - r_k
    g = torch.Generator(device=dev).manual_seed(0)
    qa = torch.randn(batch, H, r_k + ROPE, device=dev, dtype=torch.bfloat16, generator=g) / 8
    kv = torch.randn(batch, ctx, r_k + ROPE, device=dev, dtype=torch.bfloat16, generator=g)
    vl = torch.randn(batch, ctx, r_v, device=dev, dtype=torch.bfloat16, generator=g)
    return qa, kv, vl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", default=None, help="run one variant once (eager) for a profiler, then exit")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--batches", default="32,1")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--variants", default="", help="comma list of variant names (default: all)")
    args = ap.parse_args()
    dev = "cuda"
    if args.one:
        from kvtool.kernels.mla_decode import mla_decode_absorbed

        qa, kv, vl = tensors(args.ratio, 32, args.context, dev)
        mla_decode_absorbed(qa, kv, vl, 0.08, **VARIANTS[args.one])
        torch.cuda.synchronize()
        return
    from gpu_common import environment

    print(environment(), flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            names = [v for v in args.variants.split(",") if v] or list(VARIANTS)
            ablate(ratio, batch, args.context, dev, names)
            torch.cuda.empty_cache()


def ablate(ratio: float, batch: int, ctx: int, dev: str, names: list[str]) -> None:
    from gpu_common import graph_time_us, sdpa_decode

    from kvtool.kernels.mla_decode import mla_decode_absorbed, mla_decode_absorbed_reference

    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, G, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    t_sdpa = graph_time_us(lambda k=k, v=v: sdpa_decode(q, k, v))
    sdpa_gbs = (2 * k.numel() * 2) / t_sdpa / 1e3
    del k, v
    qa, kv, vl = tensors(ratio, batch, ctx, dev)
    lat_bytes = (kv.numel() + vl.numel()) * 2

    def share(us: float) -> str:
        return f"{lat_bytes / us / 1e3:6.0f} GB/s ({100 * lat_bytes / us / 1e3 / sdpa_gbs:.0f}% of SDPA's)"

    ref = mla_decode_absorbed_reference(qa, kv[:, :2048], vl[:, :2048], 0.08)
    trial = {}
    for name in names:
        kw = VARIANTS[name]
        try:
            out = mla_decode_absorbed(qa, kv[:, :2048], vl[:, :2048], 0.08, **kw)
            err = float((out - ref).norm() / ref.norm())
            trial[name] = graph_time_us(lambda kw=kw: mla_decode_absorbed(qa, kv, vl, 0.08, **kw), rep_ms=60)
        except Exception as exc:  # noqa: BLE001 (a variant that does not compile is reported, not fatal)
            print(f"ratio {ratio} batch {batch} {name}: failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        print(f"ratio {ratio} batch {batch} {name:14s} {trial[name]:8.1f} us  latent read {share(trial[name])}  "
              f"x{t_sdpa / trial[name]:.2f} SDPA  err {err:.1e}", flush=True)
    best = min(trial, key=trial.get)
    t_best = graph_time_us(lambda: mla_decode_absorbed(qa, kv, vl, 0.08, **VARIANTS[best]))
    t_def = graph_time_us(lambda: mla_decode_absorbed(qa, kv, vl, 0.08))
    print(f"== ratio {ratio} batch {batch} ctx {ctx}: SDPA {t_sdpa:.1f} us ({sdpa_gbs:.0f} GB/s); default "
          f"{t_def:.1f} us (x{t_sdpa / t_def:.2f}, {share(t_def)}); best {best} {t_best:.1f} us "
          f"(x{t_sdpa / t_best:.2f}, {share(t_best)})", flush=True)

if __name__ == "__main__":
    main()
