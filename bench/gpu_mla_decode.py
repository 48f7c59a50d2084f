"""MLA decode kernels vs GQA decode (PyTorch SDPA, enable_gqa, on a BF16 cache) at Llama-3.1-8B attention shapes.

    python bench/gpu_mla_decode.py                 # on a GPU: checks, then times; prints tables
    TRITON_INTERPRET=1 python bench/gpu_mla_decode.py --quick --device cpu   # tiny check on the CPU

Methodology (bench/gpu_common.py): CUDA-graph replays timed with CUDA events, medians; the absorbed kernel runs its
default launch (what the runtime calls; chosen on separate runs of bench/gpu_mla_ablation.py); bytes = everything
read and written (cache, queries, split partials, outputs); the bandwidth reference is the read bandwidth of a large
device copy measured in the same run, and SDPA's own achieved bandwidth is reported beside it.

Shapes: 32 query heads, 8 KV heads, head_dim 128 (GQA cache 2*8*128 = 2048 values/token/layer). KV ratio 0.5 ->
latent 1024 values/token; 0.25 -> 512. Absorbed (decoupled RoPE) cache: [c_K | k_pe] (r_K + 64) and c_V (r_V) with
r_K + r_V + 64 = ratio * 2048. Also: a whole-model decode step (32 layers of attention in one graph) with per-layer
ranks as CARE's allocation produces them vs uniform ranks vs GQA, and the CARE conversion time of an 8B-shaped model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvtool.kernels.mla_decode import (  # noqa: E402
    _num_splits,
    absorbed_config,
    mla_decode_absorbed,
    mla_decode_absorbed_reference,
    mla_decode_keep,
    mla_decode_keep_reference,
    padded_latent_cache,
)

H, G, D, ROPE = 32, 8, 128, 64


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def absorbed_bytes(b: int, s: int, dk: int, dv: int, elem: int) -> int:
    """Bytes the absorbed kernel reads and writes with its default launch: latent cache, queries, split partials
    (written, re-read), output."""
    def cdiv(x: int, y: int) -> int:
        return (x + y - 1) // y

    cfg = absorbed_config(b, H, dk, dv)
    block_n = cfg["block_n"]
    splits = _num_splits(b, cdiv(H, cfg["block_h"]), s, block_n, cfg["waves"])  # as mla_decode_absorbed does
    splits = cdiv(s, cdiv(cdiv(s, splits), block_n) * block_n)
    partial = b * H * splits * (dv + 2) * 4
    return b * s * (dk + dv) * elem + b * H * dk * elem + 2 * partial + b * H * dv * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter check)")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--skip-model", action="store_true", help="skip the whole-model per-layer-rank decode step")
    ap.add_argument("--width-sweep", action="store_true",
                    help="only: one layer's absorbed decode time at each latent width per_layer_ranks gives (b=1, 32k)")
    ap.add_argument("--widths", default="", help="with --width-sweep: these latent widths instead (comma list)")
    args = ap.parse_args()
    dev = args.device
    if dev != "cuda" or args.quick:
        return quick_check(dev)
    from gpu_common import environment, graph_time_us, read_bandwidth_gbs, sdpa_decode

    print(environment(), flush=True)
    if args.width_sweep:
        return width_sweep(dev, graph_time_us, [int(w) for w in args.widths.split(",") if w])
    read_bw = read_bandwidth_gbs()
    print(f"read bandwidth reference (device copy, bytes read / time): {read_bw:.0f} GB/s", flush=True)
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        width = int(ratio * 2 * G * D)
        for b in [int(x) for x in args.batches.split(",")]:
            for s in [int(x) for x in args.contexts.split(",")]:
                q = torch.randn(b, H, D, device=dev, dtype=dt, generator=g)
                k = torch.randn(b, G, s, D, device=dev, dtype=dt, generator=g)
                v = torch.randn(b, G, s, D, device=dev, dtype=dt, generator=g)
                t_gqa = graph_time_us(lambda q=q, k=k, v=v: sdpa_decode(q, k, v))
                gqa_bytes = 2 * b * G * s * D * 2 + 2 * b * H * D * 2
                del k, v
                r_k = (width - ROPE) // 2
                r_v = width - ROPE - r_k
                qa = torch.randn(b, H, r_k + ROPE, device=dev, dtype=dt, generator=g) / 8
                kv = torch.randn(b, s, r_k + ROPE, device=dev, dtype=dt, generator=g)
                vl = torch.randn(b, s, r_v, device=dev, dtype=dt, generator=g)
                err_a = rel(mla_decode_absorbed(qa, kv[:, :2048], vl[:, :2048], 0.08),
                            mla_decode_absorbed_reference(qa, kv[:, :2048], vl[:, :2048], 0.08))
                # the default launch, what the runtime calls (chosen on separate runs: bench/gpu_mla_ablation.py)
                cfg = absorbed_config(b, H, r_k + ROPE, r_v)
                t_abs = graph_time_us(lambda qa=qa, kv=kv, vl=vl: mla_decode_absorbed(qa, kv, vl, 0.08))
                abs_bytes = absorbed_bytes(b, s, r_k + ROPE, r_v, 2)
                del kv, vl
                r_k2, r_v2 = width // 2, width - width // 2
                ck = torch.randn(b, s, r_k2, device=dev, dtype=dt, generator=g)
                cv = torch.randn(b, s, r_v2, device=dev, dtype=dt, generator=g)
                wkb = (torch.randn(G, r_k2, D, device=dev, dtype=dt, generator=g) / r_k2 ** 0.5).contiguous()
                err_k = rel(mla_decode_keep(q, ck[:, :1024], cv[:, :1024], wkb, inv_freq, D ** -0.5),
                            mla_decode_keep_reference(q, ck[:, :1024], cv[:, :1024], wkb, inv_freq, D ** -0.5))
                t_keep = graph_time_us(lambda q=q, ck=ck, cv=cv, w=wkb: mla_decode_keep(q, ck, cv, w, inv_freq,
                                                                                        D ** -0.5))
                del ck, cv
                torch.cuda.empty_cache()
                row = dict(ratio=ratio, batch=b, ctx=s, gqa_us=t_gqa, gqa_gbs=gqa_bytes / t_gqa / 1e3, abs_us=t_abs,
                           abs_gbs=abs_bytes / t_abs / 1e3, abs_cfg=cfg, keep_us=t_keep, err_abs=err_a, err_keep=err_k)
                rows.append(row)
                print(row, flush=True)
    print("\n| KV ratio | batch | context | SDPA us (GB/s) | MLA absorbed us (GB/s; % of read ref; % of SDPA's) "
          "| speedup | MLA keep us | rel err abs/keep |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']} | {r['batch']} | {r['ctx']} | {r['gqa_us']:.1f} ({r['gqa_gbs']:.0f}) | "
              f"{r['abs_us']:.1f} ({r['abs_gbs']:.0f}; {100 * r['abs_gbs'] / read_bw:.0f}%; "
              f"{100 * r['abs_gbs'] / r['gqa_gbs']:.0f}%) | {r['gqa_us'] / r['abs_us']:.2f}x | {r['keep_us']:.1f} | "
              f"{r['err_abs']:.1e}/{r['err_keep']:.1e} |", flush=True)
    if not args.skip_model:
        whole_model_step(dev, graph_time_us)
    if not args.skip_convert:
        convert_timing(dev, False)


def per_layer_ranks(layers: int, total: int, ratio: float) -> list[int]:
    """A non-uniform latent width per layer with the same total as uniform: the shape CARE's allocation gives
    (small in early layers, rising with depth), in multiples of 16."""
    weights = [0.5 + i / (layers - 1) for i in range(layers)]
    scale = total / sum(weights)
    widths = [max(64, int(round(w * scale / 16)) * 16) for w in weights]
    widths[-1] += total - sum(widths)
    return widths


def whole_model_step(dev: str, graph_time_us) -> None:
    """Attention of a 32-layer decode step, all layers in one CUDA graph: per-layer latent widths vs uniform vs GQA."""
    layers, dt = 32, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    print("\n| batch | context | KV ratio | GQA SDPA 32 layers us | MLA uniform us | MLA per-layer ranks us | "
          "per-layer, rows padded to 16 us | padded per-layer / uniform |\n|---|---|---|---|---|---|---|---|",
          flush=True)
    from gpu_common import sdpa_decode

    for b, s in ((1, 32768), (8, 8192)):
        q = torch.randn(b, H, D, device=dev, dtype=dt, generator=g)
        ks = [torch.randn(b, G, s, D, device=dev, dtype=dt, generator=g) for _ in range(layers)]
        vs = [torch.randn(b, G, s, D, device=dev, dtype=dt, generator=g) for _ in range(layers)]
        t_gqa = graph_time_us(lambda q=q, ks=ks, vs=vs: [sdpa_decode(q, k, v) for k, v in zip(ks, vs, strict=True)])
        ks = vs = None
        torch.cuda.empty_cache()
        for ratio in (0.5, 0.25):
            total = int(ratio * 2 * G * D) * layers
            times = {}
            for name, widths, pad in (("uniform", [total // layers] * layers, 1),
                                      ("per-layer", per_layer_ranks(layers, total, ratio), 1),
                                      ("per-layer padded", per_layer_ranks(layers, total, ratio), 16)):
                caches = []
                for w in widths:
                    r_k = (w - ROPE) // 2
                    kv = padded_latent_cache(b, s, r_k + ROPE, dt, dev, pad)
                    vl = padded_latent_cache(b, s, w - ROPE - r_k, dt, dev, pad)
                    kv.normal_(generator=g)
                    vl.normal_(generator=g)
                    caches.append((torch.randn(b, H, r_k + ROPE, device=dev, dtype=dt, generator=g) / 8, kv, vl))
                times[name] = graph_time_us(lambda caches=caches: [mla_decode_absorbed(qa, kv, vl, 0.08)
                                                                   for qa, kv, vl in caches])
                del caches
                torch.cuda.empty_cache()
            print(f"| {b} | {s} | {ratio} | {t_gqa:.0f} | {times['uniform']:.0f} | {times['per-layer']:.0f} | "
                  f"{times['per-layer padded']:.0f} | {times['per-layer padded'] / times['uniform']:.2f}x |",
                  flush=True)


def width_sweep(dev: str, graph_time_us, widths: list[int] | None = None) -> None:
    """Per-layer cost against latent width: is per-layer-rank time proportional to bytes?"""
    g = torch.Generator(device=dev).manual_seed(2)
    b, s = 1, 32768
    widths = widths or sorted(set(per_layer_ranks(32, 512 * 32, 0.25) + per_layer_ranks(32, 1024 * 32, 0.5)))
    print("| width | r_K + rope | r_V | tile/BLOCK_H/BLOCK_N/warps | splits | us | GB/s |\n"
          "|---|---|---|---|---|---|---|")
    for w in widths:
        r_k = (w - ROPE) // 2
        r_v = w - ROPE - r_k
        qa = torch.randn(b, H, r_k + ROPE, device=dev, dtype=torch.bfloat16, generator=g) / 8
        kv = torch.randn(b, s, r_k + ROPE, device=dev, dtype=torch.bfloat16, generator=g)
        vl = torch.randn(b, s, r_v, device=dev, dtype=torch.bfloat16, generator=g)
        c = absorbed_config(b, H, r_k + ROPE, r_v)
        splits = _num_splits(b, -(-H // c["block_h"]), s, c["block_n"], c["waves"])
        us = graph_time_us(lambda qa=qa, kv=kv, vl=vl: mla_decode_absorbed(qa, kv, vl, 0.08))
        launch = f"{c['tile']}/{c['block_h']}/{c['block_n']}/{c['num_warps']}"
        print(f"| {w} | {r_k + ROPE} | {r_v} | {launch} | {splits} | {us:.1f} | {b * s * w * 2 / us / 1e3:.0f} |",
              flush=True)


def quick_check(dev: str) -> None:
    """Tiny shapes through the kernels against their references (CPU interpreter or GPU)."""
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(2, H, 48 + ROPE, device=dev, generator=g)
    kv = torch.randn(2, 64, 48 + ROPE, device=dev, generator=g)
    vl = torch.randn(2, 64, 40, device=dev, generator=g)
    err = rel(mla_decode_absorbed(q, kv, vl, 0.08), mla_decode_absorbed_reference(q, kv, vl, 0.08))
    print(f"absorbed kernel vs reference: rel err {err:.1e}")
    assert err < 1e-3


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
