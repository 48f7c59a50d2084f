"""Quality beyond perplexity for a 2-bit KV cache: long teacher-forced agreement and long greedy generation.

    .venv/bin/python bench/oscar_long_generation.py --export out/oscar --json out/oscar_long_generation.json

Two measurements on the embedded model's *held-out* text, against the same model with its full-precision cache:

1. Teacher-forced: one window of ``--tokens`` (1,024) held-out tokens; the fraction of positions whose top-1
   next-token prediction with the 2-bit cache (every key and value outside the export's sink/recent windows read
   from 2 bits, emulated as decode reads it) equals the full-precision model's.
2. Greedy generation: from ``--prompts`` held-out prompts of ``--prompt-len`` tokens, decode ``--new-tokens``
   (1,024) tokens with ``kvtool.runtime.Int2Cache`` (the real 2-bit cache) and with the default full-precision
   cache; score each continuation's perplexity under the full-precision model (lower = more fluent under the
   original model); also the number of leading tokens on which the two continuations agree, and the longest
   repeated 4-gram run (garbling / looping shows up here first).

Without ``--export`` an export is made first (``kvtool export`` defaults, statistics from the calibration text).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def repeated_ngram_fraction(ids: list[int], n: int = 4) -> float:
    """Fraction of n-grams that already occurred earlier in the sequence (looping output scores high)."""
    seen, rep = set(), 0
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / max(len(grams), 1)


@torch.no_grad()
def continuation_perplexity(model: torch.nn.Module, prompt: torch.Tensor, continuation: torch.Tensor) -> float:
    """Perplexity of ``continuation`` given ``prompt`` under ``model`` (full precision, one forward)."""
    ids = torch.cat([prompt, continuation], dim=1)
    logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, continuation[0])
    return math.exp(float(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--export", type=Path, default=None, help="a `kvtool export` folder (default: export now)")
    ap.add_argument("--tokens", type=int, default=1024, help="teacher-forced window length")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--sink", type=int, default=None, help="override the export's sink")
    ap.add_argument("--residual-window", type=int, default=None, help="override the export's recent window")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from kvtool.data import TextSource, heldout_tokens
    from kvtool.models import load_model
    from kvtool.runtime import Int2Cache
    from kvtool.runtime.kvquant import kv_quantization, load_oscar_spec

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model, spec = loaded.model.eval(), loaded.spec
    export = args.export
    if export is None:
        import shutil
        import subprocess
        import sys
        import tempfile

        export = Path(tempfile.mkdtemp()) / "oscar"
        exe = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"
        subprocess.run([exe, "export", args.model, "-o", str(export), "--no-progress"], check=True)
    qspec = load_oscar_spec(export, head_dim=spec.head_dim, num_layers=spec.num_layers,
                            num_kv_heads=spec.num_kv_heads, residual_window=args.residual_window, sink=args.sink)
    held = heldout_tokens(loaded.tokenizer, TextSource("embedded", "heldout"))
    result: dict = {"export": str(export), "sink": qspec.sink, "residual_window": qspec.residual_window,
                    "group_size": qspec.group_size, "k_quantile": qspec.k_quantile}

    # 1. teacher-forced top-1 agreement over one long window
    window = held[:args.tokens][None]
    with torch.no_grad():
        ref = model(input_ids=window).logits[0].argmax(-1)
        with kv_quantization(model, qspec):
            got = model(input_ids=window).logits[0].argmax(-1)
    positions = torch.arange(args.tokens)
    quantized_reads = positions >= qspec.sink + qspec.residual_window  # queries that read some 2-bit tokens
    agree = (got == ref).float()
    result["teacher_forced"] = {"tokens": args.tokens, "top1_agreement": float(agree.mean()),
                                "top1_agreement_where_2bit_is_read": float(agree[quantized_reads].mean())}
    print(f"teacher-forced top-1 agreement over {args.tokens} tokens: {float(agree.mean()):.4f} "
          f"({float(agree[quantized_reads].mean()):.4f} at positions that read 2-bit tokens)", flush=True)

    # 2. greedy generation with the real 2-bit cache vs the full-precision cache
    gens = []
    step = (held.numel() - args.prompt_len) // max(args.prompts, 1)
    for p in range(args.prompts):
        prompt = held[p * step:p * step + args.prompt_len][None]
        mask = torch.ones_like(prompt)
        t = time.perf_counter()
        fp_out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False)[:, prompt.shape[1]:]
        t_fp = time.perf_counter() - t
        cache = Int2Cache.from_export(export, loaded, residual_window=args.residual_window, sink=args.sink)
        t = time.perf_counter()
        q_out = model.generate(input_ids=prompt, attention_mask=mask, past_key_values=cache,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False)[:, prompt.shape[1]:]
        t_q = time.perf_counter() - t
        same = (fp_out[0] == q_out[0]).int()
        lead = int(same.cumprod(0).sum())
        row = {"prompt": p, "ppl_fp_continuation": continuation_perplexity(model, prompt, fp_out),
               "ppl_int2_continuation": continuation_perplexity(model, prompt, q_out),
               "leading_tokens_equal": lead, "tokens_equal": float(same.float().mean()),
               "repeated_4gram_fp": repeated_ngram_fraction(fp_out[0].tolist()),
               "repeated_4gram_int2": repeated_ngram_fraction(q_out[0].tolist()),
               "cache_bytes": cache.nbytes(), "seconds_fp": round(t_fp, 1), "seconds_int2": round(t_q, 1),
               "int2_text_tail": loaded.tokenizer.decode(q_out[0, -60:])}
        gens.append(row)
        print(f"prompt {p}: ppl under FP model: FP continuation {row['ppl_fp_continuation']:.3f}, INT2 "
              f"continuation {row['ppl_int2_continuation']:.3f}; first {lead} tokens equal; repeated 4-grams "
              f"{row['repeated_4gram_fp']:.2f} / {row['repeated_4gram_int2']:.2f}", flush=True)
    ratio = [g["ppl_int2_continuation"] / g["ppl_fp_continuation"] for g in gens]
    result["generation"] = {"new_tokens": args.new_tokens, "prompts": gens,
                            "mean_ppl_ratio_int2_over_fp": sum(ratio) / len(ratio)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"mean continuation perplexity ratio (INT2 / FP): {sum(ratio) / len(ratio):.3f}; total {result['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
