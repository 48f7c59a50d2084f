"""Where kvtool calibration spends its time on a GPU: torch.profiler over a 4-layer 8B-shaped model (random bf16).

    python3 bench/gpu_calib_profile.py --stats attn_in,q,k,v,o_in,mlp_in

Prints the top CUDA kernels and CPU ops of one `collect_statistics` call (after a warm-up call) and the wall time of
a plain forward over the same windows for comparison.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stats", default="attn_in,q,k,v,o_in,mlp_in")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtool.calib.collect import collect_statistics
    from kvtool.calib.stats import parse_stats
    from kvtool.models import wrap_model

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    loaded = wrap_model(model)
    windows = torch.randint(0, cfg.vocab_size, (args.samples, args.seq_len))
    stats = parse_stats(args.stats)
    collect_statistics(loaded, windows[:8], stats, device="cuda", batch_size=8)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.samples, 8):
            model(input_ids=windows[i:i + 8].cuda(), use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    collect_statistics(loaded, windows, stats, device="cuda", batch_size=8)
    torch.cuda.synchronize()
    cal = time.perf_counter() - t
    print(f"plain forward {fwd:.3f} s, collect_statistics {cal:.3f} s ({cal / fwd:.2f}x)", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        collect_statistics(loaded, windows, stats, device="cuda", batch_size=8)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    print(f"profiled call: wall {wall:.3f} s, GPU kernel+copy time {busy:.3f} s ({busy / wall:.0%} of wall)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
    # the same layer-by-layer pass with no statistics: what the statistics add, kernel by kernel
    from kvtool.calib.runner import run_layers

    with profile(activities=[ProfilerActivity.CUDA]) as bare:
        run_layers(loaded, windows, [], device="cuda", batch_size=8)
        torch.cuda.synchronize()
    base = {e.key: e.self_device_time_total for e in bare.key_averages()}
    calls = {e.key: e.count for e in bare.key_averages()}
    diff = sorted(((e.self_device_time_total - base.get(e.key, 0), e.key, e.count - calls.get(e.key, 0))
                   for e in prof.key_averages() if e.self_device_time_total), reverse=True)
    print(f"bare layer pass GPU time {sum(base.values()) / 1e6:.3f} s; statistics add, by kernel (ms, extra calls):")
    for extra, key, n in diff[:16]:
        print(f"  {extra / 1e3:9.1f}  {n:6d}  {key[:110]}")


if __name__ == "__main__":
    main()
