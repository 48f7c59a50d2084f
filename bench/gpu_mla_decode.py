"""MLA decode kernels vs GQA decode (SDPA on a bf16 cache) at Llama-3.1-8B attention shapes, plus conversion time.

    python bench/gpu_mla_decode.py                 # on a GPU: checks, then times; prints a table
    TRITON_INTERPRET=1 python bench/gpu_mla_decode.py --quick --device cpu   # tiny check on the CPU

Shapes: 32 query heads, 8 KV heads, head_dim 128 (GQA cache 2*8*128 = 2048 values/token/layer).
KV ratio 0.5 -> latent 1024 values/token; 0.25 -> 512. For the absorbed (decoupled) form the cache is
[c_K | k_pe] (r_K + 64) and c_V (r_V) with r_K + r_V + 64 = ratio * 2048. For keep, r_K + r_V = ratio * 2048.
Bandwidth counts the bytes of the cache read once (the floor); the copy ceiling is a device-to-device copy.
Also times the CARE conversion of an 8B-shaped model (32 layers, random weights, synthetic statistics).
"""

from __future__ import annotations

import argparse
import time

import torch

from kvtool.kernels.mla_decode import (
    gqa_decode_reference,
    mla_decode_absorbed,
    mla_decode_absorbed_reference,
    mla_decode_keep,
    mla_decode_keep_reference,
)

H, G, D, ROPE = 32, 8, 128, 64


def bench(fn, device: str) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_ceiling(device: str) -> float:
    """GB/s of a large device-to-device copy (bytes read + written)."""
    if device != "cuda":
        return float("nan")
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device)
    return 2 * x.numel() / ms / 1e6


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter check)")
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--skip-convert", action="store_true")
    args = ap.parse_args()
    dev = args.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    contexts = [64] if args.quick else [int(c) for c in args.contexts.split(",")]
    batches = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    ceiling = copy_ceiling(dev)
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; copy ceiling {ceiling:.0f} GB/s")
    g = torch.Generator(device=dev).manual_seed(0)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        width = int(ratio * 2 * G * D)
        for b in batches:
            for s in contexts:
                q = torch.randn(b, H, D, device=dev, dtype=dt, generator=g)
                k = torch.randn(b, G, s, D, device=dev, dtype=dt, generator=g)
                v = torch.randn(b, G, s, D, device=dev, dtype=dt, generator=g)
                t_gqa = bench(lambda q=q, k=k, v=v: gqa_decode_reference(q, k, v), dev)
                gqa_bytes = 2 * b * G * s * D * k.element_size()
                del k, v
                # absorbed (decoupled RoPE): [c_K | k_pe] and c_V
                r_k = (width - ROPE) // 2
                r_v = width - ROPE - r_k
                qa = torch.randn(b, H, r_k + ROPE, device=dev, dtype=dt, generator=g) / 8
                kv = torch.randn(b, s, r_k + ROPE, device=dev, dtype=dt, generator=g)
                vl = torch.randn(b, s, r_v, device=dev, dtype=dt, generator=g)
                err_a = rel(mla_decode_absorbed(qa, kv[:, :2048], vl[:, :2048], 0.08),
                            mla_decode_absorbed_reference(qa, kv[:, :2048], vl[:, :2048], 0.08))
                best = None
                for bn, nw in ((32, 4), (64, 4), (64, 8)):
                    def absorbed(bn=bn, nw=nw, qa=qa, kv=kv, vl=vl):
                        return mla_decode_absorbed(qa, kv, vl, 0.08, block_n=bn, num_warps=nw)

                    t = bench(absorbed, dev)
                    best = (t, bn, nw) if best is None or t < best[0] else best
                t_abs = best[0]
                abs_bytes = b * s * width * kv.element_size()
                del kv, vl
                # keep: c_K, c_V, keys reconstructed + RoPE in the kernel
                r_k2 = width // 2
                r_v2 = width - r_k2
                ck = torch.randn(b, s, r_k2, device=dev, dtype=dt, generator=g)
                cv = torch.randn(b, s, r_v2, device=dev, dtype=dt, generator=g)
                wkb = (torch.randn(G, r_k2, D, device=dev, dtype=dt, generator=g) / r_k2 ** 0.5).contiguous()
                err_k = rel(mla_decode_keep(q, ck[:, :1024], cv[:, :1024], wkb, inv_freq, D ** -0.5),
                            mla_decode_keep_reference(q, ck[:, :1024], cv[:, :1024], wkb, inv_freq, D ** -0.5))
                t_keep = bench(lambda q=q, ck=ck, cv=cv, w=wkb: mla_decode_keep(q, ck, cv, w, inv_freq, D ** -0.5), dev)
                del ck, cv
                rows.append(dict(ratio=ratio, batch=b, ctx=s, gqa_ms=t_gqa, gqa_gbs=gqa_bytes / t_gqa / 1e6,
                                 abs_ms=t_abs, abs_gbs=abs_bytes / t_abs / 1e6, abs_cfg=best[1:], keep_ms=t_keep,
                                 keep_gbs=abs_bytes / t_keep / 1e6, err_abs=err_a, err_keep=err_k))
                r = rows[-1]
                print(r, flush=True)
                if dev == "cuda":
                    torch.cuda.empty_cache()
    if not args.skip_convert:
        convert_timing(dev, args.quick)
    print(f"\ncopy ceiling {ceiling:.0f} GB/s (read+write); bandwidth = cache bytes read once / time")
    print("| KV ratio | batch | context | GQA SDPA ms (GB/s) | MLA absorbed ms (GB/s, % ceiling) | speedup | "
          "MLA keep ms | rel err abs/keep |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']} | {r['batch']} | {r['ctx']} | {r['gqa_ms']:.3f} ({r['gqa_gbs']:.0f}) | "
              f"{r['abs_ms']:.3f} ({r['abs_gbs']:.0f}, {100 * r['abs_gbs'] / ceiling:.0f}%) | "
              f"{r['gqa_ms'] / r['abs_ms']:.2f}x | {r['keep_ms']:.3f} | {r['err_abs']:.1e}/{r['err_keep']:.1e} |")


def convert_timing(dev: str, quick: bool) -> None:
    """Time CARE's factorization for an 8B-shaped model (random weights, synthetic attn_in statistics)."""
    from kvtool.calib.stats import StatsStore
    from kvtool.convert.care import CareOptions, convert_layers
    from kvtool.models import ArchSpec

    layers, hidden = (2, 256) if quick else (32, 4096)
    spec = ArchSpec("llama", layers, hidden, 4 * hidden, 32, 8, hidden // 32, 128256, False, False, False, 5e5,
                    "default", 8192)
    g = torch.Generator().manual_seed(0)
    store, weights = StatsStore(), {}
    for i in range(layers):
        x = torch.randn(hidden, hidden, generator=g, dtype=torch.float32)
        store.add_gram(i, "attn_in", (x @ x.T).double() / hidden, 1)
        for p in ("q", "k", "v"):
            rows = hidden if p == "q" else spec.kv_width
            weights[f"model.layers.{i}.self_attn.{p}_proj.weight"] = torch.randn(rows, hidden, generator=g) * 0.02
    for rope in ("keep", "decoupled"):
        t0 = time.perf_counter()
        convert_layers(weights, store, spec, CareOptions(kv_ratio=0.5, rope=rope, rank_alloc="care"), device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"CARE conversion, {layers} layers x D={hidden}, rope={rope}, care allocation, on {dev}: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
