"""Whole-model decode, as ``model.generate`` runs it by default: the original GQA model vs kvtool MLA checkpoints.

Llama-3-8B shapes (32 layers, 32 query / 8 KV heads of 128, hidden 4096, MLP 14336, vocabulary 128256), random bf16
weights, one GPU. Each layout is the transformers model kvtool writes and loads (``KvtoolMlaLlamaForCausalLM`` for
MLA: decode steps through kvtool's Triton kernels over the latent cache, the default on CUDA), with the cache
transformers gives ``generate`` by default (``DynamicCache``), eager (that cache is not capturable in a CUDA graph).
The cache is filled to ``context`` tokens directly (random latents / keys / values: a prefill of 128k tokens would
measure the prefill), then one decode step is timed (CUDA events, median of repeats; the cache is cropped back after
each step so every repeat sees the same context).

Reported per layout: weights (parameters, GiB), cache bytes per token, ms per decode step and tokens/s at each
batch x context that fits, the largest batch whose weights + cache + measured workspace fit ``--budget-gib`` at each
context (memory by part), and tokens/s there. The physical cap of a layout against the original at a batch is the
ratio of bytes one step reads (weights + cache).

    python3 bench/serve.py --device cuda                       # one H200: the table in docs/benchmarks.md
    python3 bench/serve.py --device cpu --quick                # tiny shapes: a smoke test of the harness
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROPE = 64


def shapes(quick: bool) -> dict:
    if quick:
        return dict(hidden_size=256, intermediate_size=512, vocab_size=1000, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    return dict(hidden_size=4096, intermediate_size=14336, vocab_size=128256, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def build(layout: str, quick: bool, device: str):
    """(model, cache widths, cache heads) for a layout: original | int2 | mla-keep-R | mla-decoupled-R | deepseek-R
    (R = KV ratio)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import kvtool  # noqa: F401  (registers kvtool's classes)
    from kvtool.runtime.mla import MLA_MODELS, mla_config

    s = shapes(quick)
    cfg = LlamaConfig(**s, max_position_embeddings=262144, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 500000.0})
    cfg._attn_implementation = "sdpa"
    g, d, n_l = s["num_key_value_heads"], s["head_dim"], s["num_hidden_layers"]
    torch.manual_seed(0)
    if layout.startswith("deepseek-"):  # the DeepSeek-V3 export's layout, run by kvtool.runtime.deepseek
        from transformers import DeepseekV3Config

        from kvtool.runtime.deepseek import use_latent_attention

        rope_dim = min(ROPE, d // 2)
        kv_lora_rank = int(float(layout.split("-")[1]) * 2 * g * d) - rope_dim
        dcfg = DeepseekV3Config(
            vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            moe_intermediate_size=s["intermediate_size"], num_hidden_layers=n_l,
            num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_attention_heads"],
            first_k_dense_replace=n_l, kv_lora_rank=kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=rope_dim,
            qk_nope_head_dim=d, v_head_dim=d, head_dim=rope_dim, rope_interleave=True, max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
        dcfg._attn_implementation = "sdpa"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(dcfg, dtype=torch.bfloat16)
        use_latent_attention(model)
        widths, slots = (kv_lora_rank, rope_dim), 1  # cache "key" slot: c_KV; "value" slot: k_pe
    elif layout in ("original", "int2"):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        widths = (g * d, g * d)  # per head-slot: G heads of d in each of K and V
        slots = g
    else:
        _, rope, ratio = layout.split("-")
        width = int(float(ratio) * 2 * g * d)
        rope_dim = min(ROPE, d // 2) if rope == "decoupled" else 0
        r_k = (width - rope_dim) // 2
        r_v = width - rope_dim - r_k
        pairs = [list(range(0, d // 2, (d // 2) // (rope_dim // 2)))[: rope_dim // 2]] * n_l if rope_dim else [[]] * n_l
        mcfg = mla_config(cfg, [(r_k, r_v)] * n_l, rope, rope_dim, pairs)
        mcfg._attn_implementation = "sdpa"
        with torch.device(device):
            model = MLA_MODELS["llama"](mcfg).to(torch.bfloat16)
        widths = (r_k + rope_dim, r_v)
        slots = 1
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0)
    return model.eval(), widths, slots


def fill_cache(model, batch: int, context: int, widths: tuple[int, int], slots: int, device: str):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    n_l = model.config.num_hidden_layers
    wk, wv = widths[0] // slots, widths[1] // slots
    for i in range(n_l):
        k = torch.randn(batch, slots, context, wk, device=device, dtype=torch.bfloat16)
        v = torch.randn(batch, slots, context, wv, device=device, dtype=torch.bfloat16)
        cache.update(k, v, i)
    return cache


def fill_static_cache(model, batch: int, context: int, widths: tuple[int, int], slots: int, device: str):
    """transformers' StaticCache (fixed slots: what CUDA graphs need) with ``context`` valid random tokens."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + 16)
    wk, wv = widths[0] // slots, widths[1] // slots
    for i, layer in enumerate(cache.layers):
        one = lambda w: torch.zeros(batch, slots, 1, w, device=device, dtype=torch.bfloat16)  # noqa: E731
        cache.update(one(wk), one(wv), i)  # allocates the layer's buffers
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)
    return cache


BASELINE_IMPL = "kvtool_bench_sdpa_valid"


def _sdpa_over_valid(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The original model's strongest decode attention here: cuDNN SDPA (enable_gqa, no mask) over exactly the
    valid tokens of the static cache (the bench's context is a constant of each captured graph)."""
    n = module._bench_valid
    out = torch.nn.functional.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_strongest_baseline(model, valid: int) -> None:
    """Route the original model's attention through :func:`_sdpa_over_valid` for ``valid`` cached tokens."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BASELINE_IMPL, _sdpa_over_valid)
    AttentionMaskInterface.register(BASELINE_IMPL, sdpa_mask)
    model.config._attn_implementation_internal = BASELINE_IMPL
    for layer in model.model.layers:
        layer.self_attn._bench_valid = valid


def graph_step_ms(model, cache, batch: int, context: int, device: str) -> float:
    """One decode step over a static cache, captured in a CUDA graph and replayed (bench/gpu_common.graph_time_us;
    each replay first puts every layer's write position back at ``context``, inside the graph)."""
    from gpu_common import graph_time_us

    from kvtool.runtime.hf_cache import cache_kwarg

    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), context, device=device, dtype=torch.long)
    kw = {cache_kwarg(): cache}

    def one():
        for layer in cache.layers:
            if hasattr(layer, "set_length"):  # a static Int2Cache layer
                layer.set_length(context)
            else:
                layer.cumulative_length.fill_(context)
        model(input_ids=ids, position_ids=pos, use_cache=True, **kw)

    with torch.no_grad():
        return graph_time_us(one) / 1e3


def step_ms(model, cache, batch: int, context: int, device: str, repeats: int) -> float:
    from kvtool.runtime.hf_cache import cache_kwarg

    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), context, device=device, dtype=torch.long)
    kw = {cache_kwarg(): cache}

    def one():
        model(input_ids=ids, position_ids=pos, use_cache=True, **kw)
        for layer in cache.layers:  # back to `context` tokens (crop()'s argument changed meaning in 5.25)
            if layer.keys is None:  # Int2Cache: one more token per step (its windows move; not cropped)
                continue
            layer.keys, layer.values = layer.keys[..., :context, :], layer.values[..., :context, :]
            if isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length = context

    with torch.no_grad():
        one()
        one()
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                one()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                one()
                times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


INT2_SINK, INT2_RECENT = 64, 256  # the default export's 16-bit windows (OSCAR's)


def int2_bytes_per_token(n_layers: int, g: int, d: int, group: int) -> int:
    """K+V bytes of one token in the 2-bit part: codes + fp16 scale and zero per group."""
    return 2 * n_layers * g * (d // 4 + 4 * (d // group))


def fill_int2_cache(model, batch: int, context: int, device: str, static: bool = False):
    """A bound Int2Cache (the default export: group = head_dim, 64 sink + 256 recent tokens in bf16) holding
    ``context`` tokens: random codes, scales and zeros in the pool, random 16-bit sink and recent tokens.
    ``static``: the fixed-shape cache (``max_cache_len``) whose decode step a CUDA graph captures."""
    from kvtool.runtime import Int2Cache
    from kvtool.runtime.kvquant import KVQuantSpec

    cfg = model.config
    g, d, n_l = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    sink, recent = (INT2_SINK, INT2_RECENT) if context > 4 * (INT2_SINK + INT2_RECENT) else (4, 16)  # --quick
    spec = KVQuantSpec(method="oscar", bits=2, group_size=d, sink=sink, residual_window=recent)
    gen = torch.Generator().manual_seed(0)
    for i in range(n_l):
        spec.k_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for _ in range(g)])
        spec.v_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for _ in range(g)])
    if static:
        cache = Int2Cache(spec, n_l, max_cache_len=context + 16).bind(model)
        for layer in cache.layers:
            x = torch.zeros(batch, g, 1, d, device=device, dtype=torch.bfloat16)
            layer.lazy_initialization(x, x)
            for data, scale, zero in layer.pool.values():
                data.random_(0, 256)
                scale.uniform_(0.01, 0.05)
                zero.uniform_(-0.1, 0.0)
            for seg in layer.segment:
                seg.normal_()
            layer.set_length(context)
        return cache
    cache = Int2Cache(spec, n_l).bind(model)
    n_q = context - (sink + recent - 1)
    for layer in cache.layers:
        x = torch.zeros(batch, g, 1, d, device=device, dtype=torch.bfloat16)
        layer.lazy_initialization(x, x)
        layer._grow(n_q + 64)  # headroom: no pool doubling inside the timed steps
        for data, scale, zero in layer.pool.values():
            data.random_(0, 256)
            scale.uniform_(0.01, 0.05)
            zero.uniform_(-0.1, 0.0)
        layer.n_quantized, layer.length = n_q, context
        rnd = lambda n: torch.randn(batch, g, n, d, device=device, dtype=torch.bfloat16)  # noqa: E731
        layer.sink_k, layer.sink_v = rnd(sink), rnd(sink)
        layer.recent_k, layer.recent_v = rnd(recent - 1), rnd(recent - 1)
        if layer.fused:  # the rotated copies the fused path reads
            layer.rot_sink = (rnd(sink).float(), rnd(sink).float())
            layer.rot_recent = (rnd(recent - 1).float(), rnd(recent - 1).float())
    return cache


def profile_step(model, cache, batch: int, context: int, device: str, layout: str) -> None:
    """torch.profiler over three eager decode steps: the top operators by host and by device time."""
    from torch.profiler import ProfilerActivity, profile

    from kvtool.runtime.hf_cache import cache_kwarg

    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), context, device=device, dtype=torch.long)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        for _ in range(3):
            model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kwarg(): cache})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    print(f"\nprofile: {layout}, batch {batch}, context {context}, 3 eager steps", flush=True)
    for key in ("self_cpu_time_total",) + (("self_device_time_total",) if device.startswith("cuda") else ()):
        print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)


def run_step(model, batch: int, context: int, widths: tuple[int, int], slots: int, dev: str, args):
    """(cache, ms per decode step) in the chosen mode."""
    if getattr(model, "_bench_int2", False):
        if args.mode == "graph":  # the static Int2Cache (max_cache_len), its decode step in a CUDA graph
            cache = fill_int2_cache(model, batch, context, dev, static=True)
            return cache, graph_step_ms(model, cache, batch, context, dev)
        cache = fill_int2_cache(model, batch, context, dev)  # eager: the dynamic cache (Python-side appends)
        return cache, step_ms(model, cache, batch, context, dev, args.repeats)
    if args.mode == "graph":
        if model.config.model_type == "llama":  # the original: cuDNN SDPA over the valid tokens only
            use_strongest_baseline(model, context + 1)
        cache = fill_static_cache(model, batch, context, widths, slots, dev)
        return cache, graph_step_ms(model, cache, batch, context, dev)
    cache = fill_cache(model, batch, context, widths, slots, dev)
    return cache, step_ms(model, cache, batch, context, dev, args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test; CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--layouts", default="original,mla-keep-0.5,mla-decoupled-0.5,mla-decoupled-0.25")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--context", default="8192,32768,131072")
    ap.add_argument("--budget-gib", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--profile", action="store_true",
                    help="also profile three eager steps of each layout at the first batch and context")
    ap.add_argument("--mode", default="eager", choices=("eager", "graph"),
                    help="eager: DynamicCache, eager steps (what generate does by default); graph: transformers' "
                         "StaticCache and the decode step captured in a CUDA graph (a serving loop; the original's "
                         "attention is cuDNN SDPA over exactly the valid tokens, its strongest path here)")
    args = ap.parse_args()
    for part in (args.batch, args.context):
        if not all(x.strip().isdigit() and int(x) > 0 for x in part.split(",")):
            ap.error(f"--batch/--context take positive integers separated by commas, got {part!r}")
    layouts = args.layouts.split(",")
    bad = [x for x in layouts
           if x not in ("original", "int2") and not x.startswith(("mla-keep-", "mla-decoupled-", "deepseek-"))]
    if bad:
        ap.error(f"unknown layouts {bad}: use original, int2, mla-keep-R, mla-decoupled-R, deepseek-R (R = KV ratio)")
    dev = args.device
    batches = [int(x) for x in args.batch.split(",")]
    contexts = [int(x) for x in args.context.split(",")]
    if args.quick:
        batches, contexts = [1, 2], [64]
    if dev.startswith("cuda"):
        from gpu_common import environment

        print(environment(), flush=True)
    if args.mode == "graph" and not dev.startswith("cuda"):
        ap.error("--mode graph needs --device cuda (CUDA graphs)")
    budget = args.budget_gib * 2 ** 30
    rows = []
    print(f"mode: {args.mode}", flush=True)
    print("\n| layout | params (B) | weights GiB | cache bytes/token | batch | context | cache GiB | peak GiB | "
          "ms/step | tokens/s |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for layout in layouts:
        model, widths, slots = build(layout, args.quick, dev)
        n_l = model.config.num_hidden_layers
        params = sum(p.numel() for p in model.parameters())
        w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        per_token = 2 * n_l * (widths[0] + widths[1])  # bf16
        if layout == "int2":
            model._bench_int2 = True
            cfg = model.config
            per_token = int2_bytes_per_token(n_l, cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim)
        workspace = {}
        for context in contexts:
            for batch in batches:
                cache_bytes = per_token * batch * context
                if w_bytes + 1.15 * cache_bytes > budget:  # the step's concatenation copies one layer at a time
                    continue
                if dev.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                cache, ms = run_step(model, batch, context, widths, slots, dev, args)
                peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else 0
                workspace[(batch, context)] = max(0, peak - w_bytes - cache_bytes)
                if args.profile and (batch, context) == (batches[0], contexts[0]):
                    profile_step(model, cache, batch, context, dev, layout)
                del cache
                row = dict(mode=args.mode, layout=layout, params=params, weight_bytes=w_bytes,
                           cache_bytes_per_token=per_token,
                           batch=batch, context=context, cache_bytes=cache_bytes, peak_bytes=peak, ms_per_step=ms,
                           tokens_per_s=batch / ms * 1e3)
                rows.append(row)
                print(f"| {layout} | {params / 1e9:.2f} | {w_bytes / 2**30:.1f} | {per_token} | {batch} | {context} | "
                      f"{cache_bytes / 2**30:.1f} | {peak / 2**30:.1f} | {ms:.2f} | {row['tokens_per_s']:.0f} |",
                      flush=True)
        # the largest batch in the budget at each context: weights + cache + the workspace measured per sequence
        for context in contexts:
            # workspace = fixed + per sequence x batch, fitted through the smallest and largest batch measured
            seen = sorted((b, ws) for (b, c), ws in workspace.items() if c == context)
            if len(seen) >= 2:
                (b0, w0), (b1, w1) = seen[0], seen[-1]
                per_seq_ws = max(0.0, (w1 - w0) / (b1 - b0))
                fixed_ws = max(0.0, w0 - per_seq_ws * b0)
            else:
                per_seq_ws, fixed_ws = (seen[0][1] / seen[0][0], 0.0) if seen else (0.0, 0.0)
            fit = int((budget - w_bytes - fixed_ws) // (per_token * context * 1.0 + per_seq_ws))
            if fit < 1 or args.quick:
                continue
            batch = fit
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                cache, ms = run_step(model, batch, context, widths, slots, dev, args)
                peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else 0
                del cache
            except torch.OutOfMemoryError:
                print(f"| {layout} | largest batch at {context}: {batch} did not fit (OOM) |", flush=True)
                continue
            row = dict(mode=args.mode, layout=layout, params=params, weight_bytes=w_bytes,
                       cache_bytes_per_token=per_token,
                       batch=batch, context=context, cache_bytes=per_token * batch * context, peak_bytes=peak,
                       ms_per_step=ms, tokens_per_s=batch / ms * 1e3, largest_batch_in_budget=True)
            rows.append(row)
            print(f"| {layout} (largest batch in {args.budget_gib:.0f} GiB) | {params / 1e9:.2f} | "
                  f"{w_bytes / 2**30:.1f} | {per_token} | {batch} | {context} | "
                  f"{row['cache_bytes'] / 2**30:.1f} | {peak / 2**30:.1f} | {ms:.2f} | {row['tokens_per_s']:.0f} |",
                  flush=True)
        del model
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    # ratios against the original at the same (batch, context), and the byte caps
    orig = {(r["batch"], r["context"], r.get("largest_batch_in_budget", False)): r for r in rows
            if r["layout"] == "original"}
    print("\n| layout | batch | context | step time vs original | byte cap (weights + cache read) |\n"
          "|---|---|---|---|---|")
    for r in rows:
        o = orig.get((r["batch"], r["context"], False))
        if r["layout"] == "original" or o is None or r.get("largest_batch_in_budget"):
            continue
        cap = (o["weight_bytes"] + o["cache_bytes"]) / (r["weight_bytes"] + r["cache_bytes"])
        print(f"| {r['layout']} | {r['batch']} | {r['context']} | {o['ms_per_step'] / r['ms_per_step']:.2f}x | "
              f"{cap:.2f}x |")
    largest = {r["context"]: r for r in rows if r["layout"] == "original" and r.get("largest_batch_in_budget")}
    print("\n| layout | context | largest batch | tokens/s | vs original's largest batch |\n|---|---|---|---|---|")
    for r in rows:
        if not r.get("largest_batch_in_budget"):
            continue
        o = largest.get(r["context"])
        ratio = f"{r['tokens_per_s'] / o['tokens_per_s']:.2f}x" if o else "n/a"
        print(f"| {r['layout']} | {r['context']} | {r['batch']} | {r['tokens_per_s']:.0f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
