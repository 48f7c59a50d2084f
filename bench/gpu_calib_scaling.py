"""Calibration tokens/s on 1 vs N GPUs (torchrun), 8B-shaped random bf16 model, kvtool's default statistics.

    torchrun --nproc-per-node 1 bench/gpu_calib_scaling.py --samples 128 --seq-len 2048
    torchrun --nproc-per-node 2 bench/gpu_calib_scaling.py --samples 128 --seq-len 2048

Each rank builds the same random model on its GPU, takes ``windows[rank::world]`` (what ``kvtool calibrate`` does
under torchrun) and collects the statistics; each layer's float64 sums are summed onto rank 0 as the layer
completes (included in the time).
Rank 0 prints wall seconds (after a barrier), tokens/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--stats", default="attn_in,q,k,v,o_in,mlp_in")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtool.calib.collect import collect_statistics
    from kvtool.calib.stats import parse_stats
    from kvtool.models import wrap_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl")
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    loaded = wrap_model(model)
    windows = torch.randint(0, cfg.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    stats = parse_stats(args.stats)
    collect_statistics(loaded, windows[:8 * world], stats, device="cuda", batch_size=8)  # warm-up
    torch.cuda.synchronize()
    if world > 1:
        dist.barrier()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    store = collect_statistics(loaded, windows, stats, device="cuda", batch_size=8)
    torch.cuda.synchronize()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - t
    if rank == 0:
        tokens = args.samples * args.seq_len
        print(json.dumps({"world_size": world, "device": torch.cuda.get_device_name(), "seconds": round(seconds, 3),
                          "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                          "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
                          "layers_with_stats": len(store.layers()),
                          "tokens_counted_layer0": store.count(0, "attn_in"),
                          "checksum_layer0_attn_in": float(store.sum(0, "attn_in").sum())}), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
