"""Where a wide statistic's cost goes on a GPU (down_in of an 8B model: 14336 wide), one step at a time.

    python3 bench/gpu_calib_wide.py [--rows 16384 --width 14336]

Times, with CUDA events, each step `StatsStore` takes per batch and per layer for one [rows, width] bf16 activation
batch (16384 rows = one batch of 8 x 2048 tokens): the whole bf16 Gram product with a float32 output and its float64
accumulation (the path before the blocked one), the blocked product of the blocks on and above the diagonal
accumulated in place (block sizes), the mirror
(CUDA-event medians, triton.testing.do_bench); then the per-layer offload: device -> pinned copy of the float64 sum
and the pinned -> ordinary host memory copy the drain thread makes (fresh memory and reused memory, torch's thread
count and one thread). FLOP rates count the products computed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def cuda_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=1, rep=100, return_mode="median")


def wall_ms(fn, reps: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--width", type=int, default=14336)
    args = ap.parse_args()
    from kvtool.calib.stats import add_upper_gram, gram_fp32, mirror_upper

    n, d = args.rows, args.width
    torch.manual_seed(0)
    x = torch.randn(n, d, device="cuda").to(torch.bfloat16)
    total = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    full_flop = 2.0 * n * d * d
    rows = {}

    def before() -> None:  # gram_fp32 then add_gram: a float64 temporary of the whole product, then +=
        total.add_(gram_fp32(x).to(torch.float64))

    def full_inplace() -> None:
        total.add_(gram_fp32(x))

    rows["full product, float64 temporary (before)"] = (cuda_ms(before), 1.0)
    rows["full product, in-place float64 add"] = (cuda_ms(full_inplace), 1.0)
    rows["full product alone"] = (cuda_ms(lambda: gram_fp32(x)), 1.0)
    for block in (1024, 2048, 3584):
        nb = -(-d // block)
        frac = sum((min(b * block + block, d) - b * block) * (d - b * block) for b in range(nb)) / (d * d)
        rows[f"upper blocks {block}, in-place float64 add"] = (cuda_ms(lambda b=block: add_upper_gram(total, x, b)),
                                                              frac)
    rows["mirror (block 2048)"] = (cuda_ms(lambda: mirror_upper(total, 2048)), 0.0)
    for name, (ms, frac) in rows.items():
        rate = full_flop * frac / (ms * 1e-3) / 1e12 if frac else 0.0
        print(json.dumps({"step": name, "ms": round(ms, 2), "flop_fraction": round(frac, 3),
                          "tflops": round(rate, 1)}), flush=True)

    gib = total.numel() * 8 / 2**30
    pinned = torch.empty(d, d, dtype=torch.float64, pin_memory=True)
    ms = cuda_ms(lambda: pinned.copy_(total, non_blocking=True))
    print(json.dumps({"step": "device -> pinned copy of one float64 sum", "gib": round(gib, 2), "ms": round(ms, 1),
                      "gb_s": round(gib * 2**30 / 1e9 / (ms * 1e-3), 1)}), flush=True)
    reused = torch.empty_like(pinned)
    reused.copy_(pinned)
    for threads in (torch.get_num_threads(), 1):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        fresh = wall_ms(lambda: pinned.clone())
        warm = wall_ms(lambda: reused.copy_(pinned))
        torch.set_num_threads(previous)
        print(json.dumps({"step": "pinned -> host memory (drain)", "threads": threads, "fresh_ms": round(fresh, 1),
                          "reused_ms": round(warm, 1), "fresh_gb_s": round(gib * 2**30 / 1e9 / (fresh * 1e-3), 1),
                          "reused_gb_s": round(gib * 2**30 / 1e9 / (warm * 1e-3), 1)}), flush=True)


if __name__ == "__main__":
    main()
