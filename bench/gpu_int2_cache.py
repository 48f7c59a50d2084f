"""Generate at long context with ``kvtool.runtime.Int2Cache`` vs transformers' ``DynamicCache`` (GPU, 8B shapes).

    python3 bench/gpu_int2_cache.py --device cuda --context 32768 --new-tokens 64 --json gpu_int2_cache.json

A random-weight Llama-3.1-8B-shaped model (bf16, SDPA attention) prefills ``--context`` tokens and decodes
``--new-tokens`` greedily, once with each cache. Reported per cache: peak GPU memory during prefill + decode
(``torch.cuda.max_memory_allocated``, weights included), the bytes the cache holds at the end, prefill seconds and
decode tokens/s (CUDA-synchronized wall clock over the decode loop, after one warm-up step). The 2-bit cache uses
an OSCAR-shaped spec (random orthogonal per-head rotations, group 128, 64 sink + 256 recent tokens in bf16).

What this measures honestly: ``Int2Cache`` is a transformers ``Cache``; attention is still the model's SDPA over
keys/values the cache dequantizes for it each step, so it saves cache memory, not decode time. The fused kernel
that reads the 2-bit codes directly is timed in bench/gpu_int2_attention.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-256 model (CPU smoke test of the script)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from kvtool.runtime import Int2Cache
    from kvtool.runtime.kvquant import KVQuantSpec

    dev = torch.device(args.device)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=131072, attn_implementation="sdpa")
    if args.tiny:
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000, max_position_embeddings=131072,
                          attn_implementation="sdpa")
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    g, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    spec = KVQuantSpec(method="oscar", bits=2, group_size=128, sink=64, residual_window=256)
    gen = torch.Generator().manual_seed(1)
    for i in range(cfg.num_hidden_layers):
        for name in ("k_rotation", "v_rotation"):
            q, _ = torch.linalg.qr(torch.randn(g, d, d, generator=gen))
            getattr(spec, name)[i] = q.to(dev)
        spec.k_clip[i] = torch.ones(g, device=dev)
        spec.v_clip[i] = torch.ones(g, device=dev)
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), generator=gen).to(dev)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
              "context": args.context, "new_tokens": args.new_tokens, "layers": cfg.num_hidden_layers,
              "weights_bytes": weights_bytes, "caches": {}}

    @torch.no_grad()
    def run(name: str, cache: object) -> torch.Tensor:
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        first_logits = out.logits[0, -1].float()
        sync()
        prefill = time.perf_counter() - t
        nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t = time.perf_counter()
        for _ in range(args.new_tokens):
            nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        sync()
        decode = time.perf_counter() - t
        if isinstance(cache, Int2Cache):
            held = cache.nbytes()
        else:
            held = {"full_precision": sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)}
        row = {"prefill_s": round(prefill, 3), "decode_tokens_per_s": round(args.new_tokens / decode, 2),
               "decode_ms_per_token": round(1000 * decode / args.new_tokens, 2),
               "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
               "peak_minus_weights_gib": round((torch.cuda.max_memory_allocated() - weights_bytes) / 2 ** 30, 2)
               if cuda else None,
               "cache_bytes": held, "cache_gib": round(sum(held.values()) / 2 ** 30, 3)}
        result["caches"][name] = row
        print(name, json.dumps(row), flush=True)
        return first_logits

    a = run("DynamicCache (bf16)", DynamicCache(config=cfg))
    b = run("Int2Cache (2-bit, 64 sink + 256 recent bf16)", Int2Cache(spec, cfg.num_hidden_layers))
    result["prefill_logits_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    dyn, q = result["caches"].values()
    result["cache_bytes_ratio"] = round(sum(dyn["cache_bytes"].values()) / sum(q["cache_bytes"].values()), 2)
    result["decode_speed_ratio"] = round(q["decode_tokens_per_s"] / dyn["decode_tokens_per_s"], 3)
    print(json.dumps({k: v for k, v in result.items() if k != "caches"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
