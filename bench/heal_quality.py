"""Held-out perplexity of converted checkpoints before and after `kvtool heal` (embedded SmolLM2-135M).

    .venv/bin/python bench/heal_quality.py --ratios 0.5 --layouts keep,decoupled,deepseek-v3 --json out/heal.json

Each row is what the CLI does by default: `kvtool convert-mla --kv-ratio R [--rope decoupled | --format
deepseek-v3]` (statistics on the default 32 x 512 calibration windows), then `kvtool heal` with its defaults (150
Adam steps per layer, lr 1e-3, 16 x 256 calibration windows; `--e2e-steps` adds end-to-end distillation). Perplexity
on the held-out part of the embedded text (disjoint from every calibration window), non-overlapping 512-token
windows. The DeepSeek-V3 rows load the export in stock transformers (DeepseekV3ForCausalLM, kv_a_layernorm in place).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

LAYOUTS = {"keep": {}, "decoupled": {"rope": "decoupled"}, "deepseek-v3": {"format": "deepseek-v3"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--layouts", default="keep,decoupled,deepseek-v3")
    ap.add_argument("--steps", type=int, default=None, help="heal steps per layer (default: kvtool heal's)")
    ap.add_argument("--e2e-steps", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from kvtool.calib import calibrate
    from kvtool.data import TextSource, heldout_tokens
    from kvtool.evaluate import perplexity
    from kvtool.methods import run_method
    from kvtool.methods.heal import HealOptions
    from kvtool.models import load_model
    from kvtool.options import DataOptions

    torch.manual_seed(0)
    source = load_model("smollm2-135m")
    tokens = heldout_tokens(source.tokenizer, TextSource(split="heldout"), args.max_tokens)
    result = {"original": perplexity(source.model, tokens, 512)["perplexity"], "rows": [],
              "heldout_tokens": int(tokens.numel())}
    print(f"original {result['original']:.3f}", flush=True)
    data = DataOptions()  # convert-mla's default calibration data
    t0 = time.perf_counter()
    store = calibrate(source, data.source(), ("attn_in",), samples=data.samples, seq_len=data.seq_len, seed=data.seed)
    print(f"statistics in {time.perf_counter() - t0:.0f} s", flush=True)
    heal_data = DataOptions(samples=16, seq_len=256, batch_size=4)  # kvtool heal's defaults
    steps = args.steps or HealOptions().steps
    tmp = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for layout in args.layouts.split(","):
            conv = tmp / f"{layout}-{ratio}"
            run_method("convert-mla", source, store, conv, kv_ratio=ratio, **LAYOUTS[layout])
            student = load_model(str(conv), strict=False)
            before = perplexity(student.model, tokens, 512)["perplexity"]
            t0 = time.perf_counter()
            report = run_method("heal", student, None, tmp / f"{layout}-{ratio}-healed", teacher="smollm2-135m",
                                data=heal_data, steps=steps, e2e_steps=args.e2e_steps)
            seconds = time.perf_counter() - t0
            healed = load_model(str(tmp / f"{layout}-{ratio}-healed"), strict=False)
            after = perplexity(healed.model, tokens, 512)["perplexity"]
            row = {"layout": layout, "kv_ratio": ratio, "before": before, "after": after,
                   "before_x": before / result["original"], "after_x": after / result["original"],
                   "heal_seconds": round(seconds, 1), "heal_tokens": report["tokens"], "steps_per_layer": steps,
                   "e2e_steps": args.e2e_steps}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    print("\n| layout | KV ratio | one-shot | healed | heal s |\n|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['layout']} | {r['kv_ratio']} | {r['before']:.2f} ({r['before_x']:.2f}x) | {r['after']:.2f} "
              f"({r['after_x']:.2f}x) | {r['heal_seconds']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
