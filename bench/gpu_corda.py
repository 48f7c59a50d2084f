"""CorDA on an 8B-shaped model on one GPU: what `kvtool corda --device cuda` does, timed, with peak memory.

    python3 bench/gpu_corda.py --device cuda --samples 64 --seq-len 2048 --json corda_8b.json

Llama-3-8B shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256), random bf16 weights held in host
memory (as `kvtool corda` loads a checkpoint); the layer-by-layer calibration runner streams one decoder layer at a
time to the GPU and keeps the windows' hidden states on the host (`--offload`), statistics attn_in, o_in, mlp_in,
down_in (all seven projections), then the Corda method with the CLI's context (KPA, rank 16, float64 factorization
on the GPU, residuals written in place, each layer's statistics freed once factored, adapter + 16 GB residual base
written to a temporary folder). Reported: seconds
per phase, peak GPU memory allocated (torch) and reserved, host peak RSS, and one layer's adapters recomputed on the
CPU in float64 for agreement. Weights are random, so quality says nothing here; memory and time are the point
(issue 15: ≤ 20 GB of GPU memory; PEFT's CorDA README reports ~43 GB for Llama-2-7B in fp32).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch


def synthetic_8b(layers: int, device: str, tiny: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvtool.models import wrap_model

    shapes = dict(hidden_size=256, intermediate_size=512, vocab_size=1000) if tiny else \
        dict(hidden_size=4096, intermediate_size=14336, vocab_size=128256)
    cfg = LlamaConfig(**shapes, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator(device).manual_seed(0)  # drawn on the compute device (fast), kept in host memory
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=device).mul_(0.02))
            else:
                p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # inv_freq buffers after to_empty
    model.eval()
    loaded = wrap_model(model)
    loaded.model_hash = "synthetic-8b"
    return loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="hidden 256 / MLP 512 (a CPU smoke run of this script)")
    ap.add_argument("--no-write", action="store_true", help="skip writing the checkpoint (time the math only)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from gpu_common import environment

    from kvtool.calib.collect import collect_statistics
    from kvtool.convert.corda import ALL_TARGETS, corda_transform
    from kvtool.methods import RunContext, get_method
    from kvtool.options import DataOptions

    result: dict = {"env": environment(), "args": vars(args) | {"json": str(args.json)}}
    print(json.dumps(result["env"]), flush=True)
    t0 = time.perf_counter()
    loaded = synthetic_8b(args.layers, args.device, args.tiny)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    layer0 = {k: v.clone() for k, v in loaded.model.state_dict().items() if k.startswith("model.layers.0.")}
    windows = torch.randint(0, loaded.model.config.vocab_size, (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def peak(kind: str = "allocated") -> float:
        if not cuda:
            return 0.0
        return round((torch.cuda.max_memory_allocated() if kind == "allocated" else torch.cuda.max_memory_reserved())
                     / 2**30, 2)

    def reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    reset()
    t0 = time.perf_counter()
    store = collect_statistics(loaded, windows, ("attn_in", "o_in", "mlp_in", "down_in"), device=dev, batch_size=8,
                               offload=True)
    if cuda:
        torch.cuda.synchronize()
    result["calibrate_s"] = round(time.perf_counter() - t0, 1)
    result["calibrate_peak_gpu_gib"] = peak()
    print(f"statistics {result['calibrate_s']} s, peak GPU {result['calibrate_peak_gpu_gib']} GiB", flush=True)
    # one layer's second moments, kept for the CPU cross-check below
    stat0 = {s: store.second_moment(0, s).clone() for s in ("attn_in", "o_in", "mlp_in", "down_in")}
    reset()
    out = Path(tempfile.mkdtemp(prefix="gpu-corda-")) / "corda"
    t0 = time.perf_counter()
    if args.no_write:
        adapter, _, report = corda_transform(loaded.model.state_dict(), lambda i, s: store.second_moment(i, s),
                                             args.layers, ALL_TARGETS, args.rank, "kpa", device=dev, in_place=True)
    else:
        # the CLI's context: statistics freed per layer once factored, residuals written into the loaded weights
        method = get_method("corda")
        opts = method.Options.from_dict({"mode": "kpa", "rank": args.rank, "targets": ",".join(ALL_TARGETS)}, "corda")
        ctx = RunContext(device=args.device, dtype="auto", data=DataOptions(), overwrite=False, progress=False,
                         release_statistics=True, consume_model=True)
        report = method.run(loaded, store, out, opts, ctx)
        from safetensors.torch import load_file

        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    if cuda:
        torch.cuda.synchronize()
    result["corda_s"] = round(time.perf_counter() - t0, 1)
    result["corda_peak_gpu_gib"] = peak()
    result["corda_peak_gpu_reserved_gib"] = peak("reserved")
    result["host_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["modules"] = len(report["modules"])
    result["max_damp"] = max(m["damp"] for m in report["modules"].values())
    result["max_inverse_error"] = max(m["inverse_error"] for m in report["modules"].values())
    print(f"corda {result['corda_s']} s, peak GPU {result['corda_peak_gpu_gib']} GiB allocated / "
          f"{result['corda_peak_gpu_reserved_gib']} reserved, host RSS {result['host_peak_rss_gib']} GiB", flush=True)
    # agreement: layer 0 recomputed on the CPU in float64 from the same statistics and the original weights
    t0 = time.perf_counter()
    cpu_adapter, _, _ = corda_transform(layer0, lambda i, s: stat0[s], args.layers, ALL_TARGETS, args.rank, "kpa",
                                        layers=[0], device="cpu")
    worst = 0.0
    for k, v in cpu_adapter.items():
        if ".lora_B." not in k:
            continue
        a_key = k.replace("lora_B", "lora_A")
        ref = v.double() @ cpu_adapter[a_key].double()
        got = adapter[k].double() @ adapter[a_key].double()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    result["layer0_cpu_vs_gpu_rel_diff_BA"] = worst
    result["cpu_check_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
