"""Held-out perplexity of converted checkpoints before and after `kvtool heal` (embedded SmolLM2-135M).

    .venv/bin/python bench/heal_quality.py --ratios 0.5 --layouts keep,decoupled,deepseek-v3 --json out/heal.json

Each row is what the CLI does by default: `kvtool convert-mla --kv-ratio R [--rope decoupled | --format
deepseek-v3]` (statistics on the default 32 x 512 calibration windows), then `kvtool heal` with its defaults (150
Adam steps per layer, lr 1e-3, 64 x 256 calibration windows; `--e2e-steps` adds end-to-end distillation). Perplexity
on the held-out part of the embedded text (disjoint from every calibration window), non-overlapping 512-token
windows. The DeepSeek-V3 rows load the export in stock transformers (DeepseekV3ForCausalLM, kv_a_layernorm in place).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
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
    ap.add_argument("--e2e-steps", type=int, default=0, help="then end-to-end distillation of the healed checkpoint "
                    "(KL to the original's logits on heal's windows, kvtool heal's e2e code path), scored again")
    ap.add_argument("--fit", default=None, help="kvtool heal --fit (default: heal's)")
    ap.add_argument("--rank-alloc", default=None, help="convert-mla --rank-alloc (default: convert-mla's)")
    ap.add_argument("--rope-dim", type=int, default=None, help="convert-mla --rope-dim (default: convert-mla's)")
    ap.add_argument("--heal-samples", type=int, default=None, help="kvtool heal --samples: calibration windows of "
                    "the layer-wise fit and the e2e stage (default: heal's)")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from kvtool.calib.collect import calibrate
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
    stats_dir = Path(tempfile.mkdtemp(prefix="heal-bench-stats-")) / "stats"
    stats_dir.mkdir(parents=True)
    store.save(stats_dir)
    from kvtool.methods.heal import Heal

    heal_data = DataOptions(**{**Heal.data_defaults, **({"samples": args.heal_samples} if args.heal_samples else {})})
    steps = args.steps or HealOptions().steps
    tmp = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for layout in args.layouts.split(","):
            conv = tmp / f"{layout}-{ratio}"
            # the CLI itself (the DeepSeek export's latent-norm fit rides the statistics pass as a visitor)
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in LAYOUTS[layout].items()]
            if args.rank_alloc:
                flags.append(f"--rank-alloc={args.rank_alloc}")
            if args.rope_dim is not None and layout != "keep":
                flags.append(f"--rope-dim={args.rope_dim}")
            exe = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"
            subprocess.run([exe, "convert-mla", "smollm2-135m", "--stats-dir", str(stats_dir), f"--kv-ratio={ratio}",
                            *flags, "-o", str(conv), "--device", "cpu", "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL)
            student = load_model(str(conv), strict=False)
            before = perplexity(student.model, tokens, 512)["perplexity"]
            t0 = time.perf_counter()
            fit = {"fit": args.fit} if args.fit else {}
            report = run_method("heal", student, None, tmp / f"{layout}-{ratio}-healed", teacher="smollm2-135m",
                                data=heal_data, steps=steps, **fit)
            seconds = time.perf_counter() - t0
            healed = load_model(str(tmp / f"{layout}-{ratio}-healed"), strict=False)
            after = perplexity(healed.model, tokens, 512)["perplexity"]
            row = {"layout": layout, "kv_ratio": ratio, "before": before, "after": after,
                   "before_x": before / result["original"], "after_x": after / result["original"],
                   "heal_seconds": round(seconds, 1), "heal_tokens": report["tokens"], "steps_per_layer": steps,
                   "fit": report.get("healing", report).get("fit"), "rank_alloc": args.rank_alloc or "default",
                   "rope_dim": args.rope_dim or "default", "heal_samples": heal_data.samples}
            if args.e2e_steps:
                from kvtool.convert.heal import distill
                from kvtool.data import calibration_windows

                t0 = time.perf_counter()
                windows = calibration_windows(source.tokenizer, heal_data.source(), heal_data.samples,
                                              heal_data.seq_len, heal_data.seed, source.spec.max_positions)
                params = [p for layer in healed.model.model.layers for p in layer.self_attn.parameters()]
                curve = distill(healed.model, lambda ids: source.model(input_ids=ids, use_cache=False).logits,
                                list(windows.split(heal_data.batch_size)), params, steps=args.e2e_steps,
                                lr=HealOptions().e2e_lr)
                e2e = perplexity(healed.model.eval(), tokens, 512)["perplexity"]
                row.update({"e2e_steps": args.e2e_steps, "after_e2e": e2e, "after_e2e_x": e2e / result["original"],
                            "e2e_seconds": round(time.perf_counter() - t0, 1), "kl_before": curve[0],
                            "kl_after": curve[-1]})
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every row: a stopped run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| layout | KV ratio | one-shot | healed | + e2e | heal s |\n|---|---|---|---|---|---|")
    for r in result["rows"]:
        e2e = f"{r['after_e2e']:.2f} ({r['after_e2e_x']:.2f}x)" if "after_e2e" in r else "-"
        print(f"| {r['layout']} | {r['kv_ratio']} | {r['before']:.2f} ({r['before_x']:.2f}x) | {r['after']:.2f} "
              f"({r['after_x']:.2f}x) | {e2e} | {r['heal_seconds']:.0f} |")


if __name__ == "__main__":
    main()
