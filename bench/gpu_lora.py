"""GPU timing of the fused LoRA linear (kvtool.kernels.lora) vs unfused PyTorch, at Llama-3-8B projection shapes.

For each projection shape (out × in) and token count M it checks the kernel against the PyTorch reference, then
times (``triton.testing.do_bench``, median):

* ``base``: ``x @ W_resᵀ`` alone (cuBLAS; the floor: what a merged adapter would cost),
* ``unfused``: ``x @ W_resᵀ + (x @ Aᵀ) @ Bᵀ`` in PyTorch (three GEMMs + an add: what PEFT's forward does),
* ``fused``: the Triton kernel with default blocks, and ``fused*`` the best of a small block sweep.

Bytes moved (W + A + B + x + y) over time gives GB/s, compared with a device-to-device copy ceiling measured here.

    python bench/gpu_lora.py --device cuda                       # bf16, rank 16, M in 1,16,128,2048
    TRITON_INTERPRET=1 python bench/gpu_lora.py --device cpu --quick   # correctness-only smoke run on the CPU
"""

from __future__ import annotations

import argparse
import os
import time

import torch

# Llama-3-8B: hidden 4096, intermediate 14336, 32 query heads and 8 KV heads of 128
SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
             "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
QUICK_SHAPES = {"q_proj": (96, 64), "down_proj": (64, 160)}
SWEEP = [{"BM": bm, "BN": bn, "BK": bk, "num_warps": nw, "num_stages": ns}
         for bm, bn, bk, nw, ns in [(16, 32, 128, 4, 4), (16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (32, 64, 64, 4, 4),
                                    (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
                                    (128, 64, 64, 4, 4), (128, 256, 64, 8, 3)]]


def timer(device: str):
    """Median milliseconds of fn: triton.testing.do_bench on CUDA, a wall-clock median on the CPU."""
    if device.startswith("cuda"):
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn):
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[1]
    return cpu


def copy_ceiling_gbs(device: str, bench) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB buffer (1 MiB on the CPU)."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", default="1,16,128,2048", help="comma-separated token counts M")
    ap.add_argument("--targets", default=",".join(SHAPES_8B))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, no sweep (CPU interpreter smoke test)")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on the CPU the kernel runs in Triton's interpreter: set TRITON_INTERPRET=1")

    from kvtool.kernels.lora import default_blocks, lora_linear, lora_linear_reference

    dtype = getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else {t: SHAPES_8B[t] for t in args.targets.split(",")}
    tokens = [1, 5] if args.quick else [int(m) for m in args.tokens.split(",")]
    bench = timer(args.device)
    ceiling = copy_ceiling_gbs(args.device, bench)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(args.device, dtype)
        a = (torch.randn(args.rank, k, generator=gen) / k**0.5).to(args.device, dtype)
        b = (torch.randn(n, args.rank, generator=gen) * 0.1).to(args.device, dtype)
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(args.device, dtype)
            ref = lora_linear_reference(x.float(), w.float(), a.float(), b.float())
            got = lora_linear(x, w, a, b).float()
            err = float((got - ref).abs().max() / ref.abs().max())
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            if not err < tol:
                raise SystemExit(f"{name} M={m}: fused kernel differs from the reference (rel {err:.2e} > {tol})")
            t_base = bench(lambda x=x, w=w: x @ w.T)
            t_unfused = bench(lambda x=x, w=w, a=a, b=b: lora_linear_reference(x, w, a, b))
            t_fused = bench(lambda x=x, w=w, a=a, b=b: lora_linear(x, w, a, b))
            best, best_cfg = t_fused, default_blocks(m, n, k)
            if not (args.quick or args.no_sweep):
                for cfg in SWEEP:
                    if cfg["BM"] > max(16, 2 * m):
                        continue
                    try:
                        if float((lora_linear(x, w, a, b, blocks=cfg).float() - ref).abs().max()
                                 / ref.abs().max()) >= tol:
                            continue
                        t = bench(lambda x=x, w=w, a=a, b=b, cfg=cfg: lora_linear(x, w, a, b, blocks=cfg))
                    except Exception:  # a config may not fit in shared memory
                        continue
                    if t < best:
                        best, best_cfg = t, cfg
            nbytes = (w.numel() + a.numel() + b.numel() + x.numel() + m * n) * x.element_size()
            rows.append((name, f"{n}x{k}", m, err, t_base, t_unfused, t_fused, best, nbytes / best / 1e6,
                         "{BM}/{BN}/{BK}/w{num_warps}/s{num_stages}".format(**best_cfg)))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (interpreter)"
    print(f"\nfused LoRA linear, {args.dtype}, rank {args.rank}, device {dev}; copy ceiling {ceiling:.0f} GB/s")
    print("| proj | out×in | M | rel err | base ms | unfused ms | fused ms | fused* ms | fused* GB/s | "
          "unfused/fused* | fused*/base | best blocks BM/BN/BK |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1e} | {r[4]:.4f} | {r[5]:.4f} | {r[6]:.4f} | {r[7]:.4f} | "
              f"{r[8]:.0f} | {r[5] / r[7]:.2f} | {r[7] / r[4]:.2f} | {r[9]} |")


if __name__ == "__main__":
    main()
