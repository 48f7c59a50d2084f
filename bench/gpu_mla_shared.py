"""Shared-latent MLA decode (DeepSeek-V3's layout: one normalized c_KV row per token is both the nope key and the
value, plus a 64-wide RoPE key) vs the absorbed kernel reading the same cache as separate key and value views, vs
cuDNN SDPA over a BF16 GQA cache at Llama-3-8B shapes (the bandwidth reference), in one run.

    python bench/gpu_mla_shared.py                                       # on a GPU
    TRITON_INTERPRET=1 python bench/gpu_mla_shared.py --quick --device cpu   # tiny check on the CPU

Methodology (bench/gpu_common.py): CUDA-graph replays, medians; the shared kernel at its default launch
(``shared_config``, what ``kvtool.runtime.deepseek`` calls), then a small launch ablation chosen on one measurement
and timed again. Latent bandwidth = cache bytes read (B·S·(r + 64)·2) / time; SDPA's = its K+V bytes / time. At 128
heads the kernel's work is 2·B·H·S·(2r + 64) flops (scores over r + 64, values over r).

Shapes: kv_lora_rank r = 512 (DeepSeek-V3), 448 and 960 (the Llama-3-8B export at KV ratio 0.25 / 0.5: r + 64 =
ratio·2048); 32 heads (Llama-3-8B's query heads) and 128 (DeepSeek-V3's).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvtool.kernels.mla_decode import (  # noqa: E402
    mla_decode_absorbed,
    mla_decode_shared,
    mla_decode_shared_reference,
    shared_config,
)

ROPE = 64
ABLATE = {(512, 32, 32, 32768), (960, 32, 32, 32768), (512, 128, 32, 8192)}  # the launch ablation's cases


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(b, s, h, r, dev, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device=dev).manual_seed(seed)
    lat = torch.randn(b, s, r + ROPE, device=dev, dtype=dtype, generator=g)
    q = torch.randn(b, h, r + ROPE, device=dev, dtype=dtype, generator=g) / (r ** 0.5)
    return q, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ablation", action="store_true")
    args = ap.parse_args()
    dev = args.device
    scale = 192 ** -0.5
    if args.quick:
        q, lat = inputs(2, 70, 9, 40, dev, dtype=torch.float32)  # the interpreter computes bf16 dots wrongly
        c, pe = lat[..., :40], lat[..., 40:]
        out = mla_decode_shared(q[..., :40], q[..., 40:], c, pe, scale, num_splits=2, block_n=16)
        err = rel(out, mla_decode_shared_reference(q[..., :40], q[..., 40:], c, pe, scale))
        print(f"quick check: rel err {err:.2e}")
        assert err < 1e-2
        return
    from gpu_common import environment, read_bandwidth_gbs

    print(environment(), flush=True)
    print(f"device read bandwidth (large copy): {read_bandwidth_gbs():.0f} GB/s", flush=True)
    # correctness at a real shape (fp32 reference)
    q, lat = inputs(4, 3000, 32, 512, dev, seed=1)
    c, pe = lat[..., :512], lat[..., 512:]
    ref = mla_decode_shared_reference(q[..., :512], q[..., 512:], c, pe, scale)
    err = rel(mla_decode_shared(q[..., :512], q[..., 512:], c, pe, scale), ref)
    lens = torch.tensor([3000, 1000, 17, 2999], device=dev)
    err_lens = rel(mla_decode_shared(q[..., :512], q[..., 512:], c, pe, scale, seq_lens=lens),
                   mla_decode_shared_reference(q[..., :512], q[..., 512:], c, pe, scale, seq_lens=lens))
    print(f"check vs fp32 reference (bf16 inputs, B4 S3000 H32 r512): rel err {err:.2e}; with seq_lens {err_lens:.2e}",
          flush=True)
    assert err < 2e-2 and err_lens < 2e-2
    print("\n| r | heads | batch | context | SDPA GQA us | SDPA GB/s | shared us | shared GB/s | vs SDPA bw | "
          "absorbed (K, V views) us | absorbed GB/s | shared TFLOPS | launch |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    cases = [(512, 32, 32, 32768), (512, 32, 1, 32768), (512, 32, 1, 131072), (960, 32, 32, 32768),
             (448, 32, 32, 32768), (512, 128, 32, 8192), (512, 128, 1, 32768), (512, 64, 32, 8192)]
    for r, h, b, s in cases:
        one_case(r, h, b, s, dev, scale, ablate=not args.no_ablation and (r, h, b, s) in ABLATE)
        torch.cuda.empty_cache()


def one_case(r: int, h: int, b: int, s: int, dev: str, scale: float, ablate: bool) -> None:
    from gpu_common import graph_time_us

    t_sdpa, sdpa_bw = sdpa_reference(b, s, dev)
    q, lat = inputs(b, s, h, r, dev)
    c, pe = lat[..., :r], lat[..., r:]
    ql, qp = q[..., :r].contiguous(), q[..., r:].contiguous()

    def shared(**launch):
        return lambda: mla_decode_shared(ql, qp, c, pe, scale, **launch)

    t_sh = graph_time_us(shared())
    t_ab = graph_time_us(lambda: mla_decode_absorbed(q, lat, c, scale))
    nbytes = b * s * (r + ROPE) * 2
    flops = 2 * b * h * s * (2 * r + ROPE)
    bw = nbytes / (t_sh * 1e-6) / 1e9
    print(f"| {r} | {h} | {b} | {s} | {t_sdpa:.1f} | {sdpa_bw:.0f} | {t_sh:.1f} | {bw:.0f} | {bw / sdpa_bw:.2f} | "
          f"{t_ab:.1f} | {nbytes / (t_ab * 1e-6) / 1e9:.0f} | {flops / (t_sh * 1e-6) / 1e12:.0f} | "
          f"{shared_config(b, h, r)} |", flush=True)
    if not ablate:
        return
    best = None
    for block_h in (16, 32, 64):
        for block_n in (16, 32, 64):
            for warps in (4, 8):
                for stages in (2, 3):
                    if block_h * triton_pow2(r) > 64 * 1024 or block_n * triton_pow2(r) * stages > 96 * 1024:
                        continue
                    launch = dict(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages)
                    try:
                        t = graph_time_us(shared(**launch), rep_ms=30)
                    except Exception as exc:  # noqa: BLE001  (out of shared memory / registers)
                        print(f"  ({launch}: {type(exc).__name__})", flush=True)
                        continue
                    if best is None or t < best[0]:
                        best = (t, launch)
    if best:
        t2 = graph_time_us(shared(**best[1]))
        print(f"  ablation best {best[1]}: {t2:.1f} us ({nbytes / (t2 * 1e-6) / 1e9:.0f} GB/s; default "
              f"{t_sh:.1f} us)", flush=True)


def sdpa_reference(b: int, s: int, dev: str) -> tuple[float, float]:
    """(us, GB/s of K+V read) of cuDNN SDPA decode over a BF16 GQA cache at Llama-3-8B shapes (32 / 8 heads of 128)."""
    from gpu_common import graph_time_us, sdpa_decode

    q = torch.randn(b, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, 8, s, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, 8, s, 128, device=dev, dtype=torch.bfloat16)
    t = graph_time_us(lambda: sdpa_decode(q, k, v))
    return t, 2 * k.numel() * 2 / (t * 1e-6) / 1e9


def triton_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


if __name__ == "__main__":
    main()
