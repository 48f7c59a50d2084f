"""Calibration throughput and peak memory: kvtool's layer-sequential collection vs a plain forward vs PEFT.

CPU (embedded SmolLM2-135M, same windows for all three, each in its own process for a clean peak RSS):
    .venv/bin/python bench/calib_throughput.py --samples 16 --seq-len 512
  kvtool: attn_in, o_in, mlp_in, down_in (covers the inputs of all seven linears), float64 sums
  forward: one plain full forward pass over the windows (no statistics)
  peft: PEFT's CorDA covariance collection (peft.tuners.lora.corda.calib_cov_distribution, the collection
        step of preprocess_corda), hooks on all seven linears of every layer

GPU (an 8B Llama-shaped model with random bf16 weights, 128 windows x 2048 tokens):
    python bench/calib_throughput.py --synthetic-8b --device cuda --samples 128 --seq-len 2048 \
        --stats attn_in,q,k,v,o_in,mlp_in   (the default set of `kvtool calibrate`)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

STATS = "attn_in,o_in,mlp_in,down_in"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(args):
    from kvtool.models import load_model, wrap_model

    if not args.synthetic_8b:
        return load_model("smollm2-135m")
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    loaded = wrap_model(model)
    loaded.model_hash = "synthetic"
    return loaded


def windows_for(args, loaded):
    if args.synthetic_8b:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 128256, (args.samples, args.seq_len), generator=g)
    from kvtool.data import TextSource, calibration_windows

    return calibration_windows(loaded.tokenizer, TextSource(), args.samples, args.seq_len, seed=0)


def run_one(args) -> dict:
    loaded = load(args)
    windows = windows_for(args, loaded)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.mode == "kvtool":
        from kvtool.calib.collect import collect_statistics

        if args.wide_block is not None:  # ablation only: 0 = one whole product per batch for every statistic
            import kvtool.calib.stats as stats_module

            stats_module.WIDE_GRAM_BLOCK = args.wide_block or 1 << 30
        if args.no_layer_offload:  # ablation only: every sum stays on the GPU (what moving them to the host costs)
            from kvtool.calib.stats import StatsStore

            StatsStore.offload = lambda self, layer=None: None

        import tempfile

        # what `kvtool calibrate` does: each layer's sums go into the statistics file as the layer completes
        # (--in-memory: keep them all until the end, the library default)
        folder = None if args.in_memory else tempfile.mkdtemp(prefix="kvtool-calib-bench-")
        store = collect_statistics(loaded, windows, args.stats, device=dev, batch_size=args.batch_size,
                                   offload=args.offload, exact=args.exact, write_to=folder)
        # the statistics pass ends here, as `kvtool calibrate` times it (the sums are all written or in memory);
        # finishing the file (header, sha256 for the manifest) is timed apart
        if dev.type == "cuda":
            torch.cuda.synchronize()
        collect_end = time.perf_counter()
        if folder is not None:
            store.meta = {"model": {"hash": "bench"}}
            store.save(folder)
            save_seconds = time.perf_counter() - collect_end
            stats_gib = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**30
            shutil.rmtree(folder)
    elif args.mode == "forward":
        with torch.no_grad():
            for i in range(0, windows.shape[0], args.batch_size):
                loaded.model(input_ids=windows[i:i + args.batch_size].to(dev), use_cache=False)
    else:
        from peft import LoraConfig
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import calib_cov_distribution

        config = LoraConfig(r=8, target_modules=TARGETS, init_lora_weights="corda", corda_config=CordaConfig())

        def run_model() -> None:  # PEFT's hook squeezes the batch dimension: one window per call, as its docs do
            for i in range(windows.shape[0]):
                loaded.model(input_ids=windows[i:i + 1].to(dev), use_cache=False)

        calib_cov_distribution(loaded.model, config, run_model, None, None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = (collect_end if args.mode == "kvtool" else time.perf_counter()) - t0
    mode = args.mode + ("-exact" if args.mode == "kvtool" and args.exact else "")
    if args.mode == "kvtool" and args.wide_block is not None:
        mode += f"-wide-block-{args.wide_block}"
    if args.mode == "kvtool" and args.no_layer_offload:
        mode += "-no-layer-offload"
    if args.mode == "kvtool" and args.in_memory:
        mode += "-in-memory"
    out = {"mode": mode, "seconds": secs, "tokens": int(windows.numel()), "tokens_per_s": windows.numel() / secs,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.mode == "kvtool" and not args.in_memory:
        out["save_seconds"] = save_seconds
        out["stats_gib"] = round(stats_gib, 2)
    if dev.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["kvtool", "forward", "peft", "all"], default="all")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--exact", action="store_true", help="float64 Gram products (kvtool calibrate --exact)")
    ap.add_argument("--synthetic-8b", action="store_true")
    ap.add_argument("--no-layer-offload", action="store_true", help="ablation: keep every sum on the GPU")
    ap.add_argument("--in-memory", action="store_true", help="kvtool: keep all sums in memory (collect_statistics' "
                    "default) instead of writing each layer's into a statistics file as `kvtool calibrate` does")
    ap.add_argument("--wide-block", type=int, default=None, help="ablation: StatsStore's column block for wide "
                    "statistics on the tensor-core path (0: whole products; default: kvtool's)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--stats", default=STATS, help="kvtool statistics (default: inputs of all seven linears)")
    args = ap.parse_args()
    if args.mode != "all":
        print(json.dumps(run_one(args)))
        return
    modes = ["forward", "kvtool"] + ([] if args.synthetic_8b else ["peft"])
    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--mode", mode, "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device,
               "--layers", str(args.layers), "--stats", args.stats]
        cmd += (["--synthetic-8b"] if args.synthetic_8b else []) + (["--offload"] if args.offload else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds"]
    gpu = "peak_gpu_gib" in rows[0]
    print(f"\n{rows[0]['tokens']} tokens ({args.samples} x {args.seq_len}), device {args.device}")
    print("| run | seconds | tokens/s | vs plain forward | peak RSS MiB |" + (" peak GPU GiB |" if gpu else ""))
    print("|---|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        line = (f"| {r['mode']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['seconds'] / base:.2f}x | "
                f"{r['peak_rss_mib']:.0f} |")
        print(line + (f" {r['peak_gpu_gib']:.1f} |" if gpu else ""))


if __name__ == "__main__":
    main()
