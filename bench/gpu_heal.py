"""GPU time of layer-wise healing (`kvtool heal`'s code path) on a Llama-3-8B-shaped random-weight model.

Builds, on the device, a random-weight Llama decoder with Llama-3-8B shapes (hidden 4096, 32 query / 8 KV heads of
128, MLP 14336, vocab 128256) and ``--layers`` decoder layers, and its GQA->MLA student in kvtool's format (KV
ratio 0.5: decoupled rope, 64 rope dims, r_K = r_V = 480, cache 1024 of 2048 per token per layer), then runs
:func:`kvtool.methods.heal.heal_model` exactly as `kvtool heal` does: one layer-by-layer pass over the teacher
(:class:`kvtool.calib.teacher.TeacherVisitor`), and for each layer ``--steps`` Adam steps on the layer's relative
output error. Reported: seconds per layer (teacher pass included), seconds per million training tokens (steps x
batch x seq_len per layer), the 32-layer projection, and peak GPU memory. Weights are random (timing does not
depend on them); the loss values are not a quality claim.

    python bench/gpu_heal.py --device cuda --layers 4 --json gpu_heal.json
    python bench/gpu_heal.py --device cpu --quick      # tiny shapes: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtool.models import LoadedModel, arch_spec_from_config
    from kvtool.runtime.mla import MLA_MODELS, mla_config

    if args.quick:
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, vocab_size=512)
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256)
    cfg = LlamaConfig(num_hidden_layers=args.layers, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False, **shape)
    cfg._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(cfg).to(dtype).eval()
    d, g = shape["head_dim"], shape["num_key_value_heads"]
    rope_dim = 64 if not args.quick else 8
    width = int(round(args.kv_ratio * 2 * g * d)) - rope_dim
    ranks = [(width // 2, width - width // 2)] * args.layers
    pairs = [list(range(0, d // 2, d // rope_dim))] * args.layers  # every other frequency pair: rope_dim dims
    scfg = mla_config(cfg, ranks, "decoupled", rope_dim, pairs)
    scfg._attn_implementation = args.attn
    with torch.device(device):
        student = MLA_MODELS["llama"](scfg).to(dtype).eval()
    loaded = LoadedModel(teacher, None, arch_spec_from_config(cfg), "random-llama3-8b-shape", "0" * 64)
    return loaded, student, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--layers", type=int, default=4, help="decoder layers built and healed")
    ap.add_argument("--steps", type=int, default=150, help="Adam steps per layer (kvtool heal's default)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--kv-ratio", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a CPU check that the script runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from kvtool.methods.heal import HealOptions, heal_model

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    loaded, student, cfg = build(args, device, dtype)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (args.samples, args.seq_len), generator=gen)
    opts = HealOptions(teacher="random", steps=args.steps, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = heal_model(student, loaded, windows, opts, device=str(device), batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    train_tokens = args.layers * args.steps * args.batch_size * args.seq_len
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "attn": args.attn, "quick": args.quick,
        "layers": args.layers, "steps_per_layer": args.steps, "samples": args.samples, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "kv_ratio": args.kv_ratio, "build_seconds": round(build_s, 2),
        "heal_seconds": round(secs, 2), "seconds_per_layer": round(secs / args.layers, 3),
        "seconds_per_million_training_tokens": round(secs / train_tokens * 1e6, 2),
        "projected_32_layer_seconds": round(secs / args.layers * 32, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "rel_error": [[r["layer"], round(r["loss_before"], 4), round(r["loss_after"], 4)] for r in report["layers"]],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
