"""Held-out perplexity, per domain of the evaluation suite, of converted checkpoints before and after `kvtool heal`
(embedded SmolLM2-135M).

    .venv/bin/python bench/heal_quality.py --ratios 0.5 --layouts keep,decoupled,deepseek-v3 \
        --datasets suite,embedded --json out/heal.json

Each row is what the CLI does by default, with the calibration text of ``--datasets`` (``suite``, the CLI's default:
the suite's calibration parts, equal weights; ``embedded``: the Python reference docs only): `kvtool calibrate`
(convert-mla's default 32 x 512 windows of that text), `kvtool convert-mla --kv-ratio R [--rope decoupled |
--format deepseek-v3]` on those statistics, then `kvtool heal` with its defaults (150 Adam steps per layer, lr 1e-3,
64 x 256 windows of the same text; `--e2e-steps` adds end-to-end distillation). Perplexity on the held-out part of
every suite domain (``--max-tokens`` tokens each; disjoint from every calibration window), non-overlapping 512-token
windows, and their geometric mean. The DeepSeek-V3 rows load the export in stock transformers (DeepseekV3ForCausalLM,
kv_a_layernorm in place). Each row records the heal's wall time and the 1-minute load average before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYOUTS = {"keep": {}, "decoupled": {"rope": "decoupled"}, "deepseek-v3": {"format": "deepseek-v3"}}


def score(model, streams, seq_len=512):  # noqa: ANN001, ANN201
    from kvtool.evaluate import geometric_mean, perplexity

    ppl = {d: perplexity(model, t, seq_len)["perplexity"] for d, t in streams.items()}
    return {**ppl, "geometric_mean": geometric_mean(list(ppl.values()))}


def ratios(ppl, original):  # noqa: ANN001, ANN201
    return {d: ppl[d] / original[d] for d in ppl}


NAMES = {"keep": "keep (exact RoPE)", "decoupled": "kvtool format, decoupled RoPE (absorbable)",
         "deepseek-v3": "DeepSeek-V3 export"}


def markdown(result: dict) -> str:
    """docs/benchmarks.md's rows: one per (KV ratio, layout, calibration text), healed perplexity per domain."""
    cols = [c for c in result["original"] if c != "geometric_mean"] + ["geometric_mean"]
    head = ["KV ratio", "layout", "calibration + healing text", "one-shot (geo. mean)",
            *[f"healed {c.replace('_', ' ')}" for c in cols], "heal s (load 1 min before/after)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|",
             "| - | original | - | - | " + " | ".join(f"{result['original'][c]:.2f}" for c in cols) + " | - |"]
    for r in result["rows"]:
        cells = [f"{r['after'][c]:.2f} ({r['after_x'][c]:.2f}x)" for c in cols]
        load = "/".join(f"{v:.1f}" for v in r["load_1min_before_after"])
        lines.append(f"| {r['kv_ratio']} | {NAMES[r['layout']]} | {r['dataset']} | {r['before']['geometric_mean']:.2f} "
                     f"({r['before_x']['geometric_mean']:.2f}x) | " + " | ".join(cells) +
                     f" | {r['heal_seconds']:.0f} ({load}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--layouts", default="keep,decoupled,deepseek-v3")
    ap.add_argument("--datasets", default="suite", help="calibration + healing texts to compare (comma-separated "
                    "--dataset values; default: the CLI's, suite)")
    ap.add_argument("--eval-dataset", default="suite", help="what is scored (its held-out part, part by part)")
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
    ap.add_argument("--table", type=Path, default=None, help="print docs/benchmarks.md's table from a saved --json "
                    "and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return

    from kvtool.calib.collect import calibrate
    from kvtool.data import TextSource, calibration_windows, describe_parts, heldout_streams
    from kvtool.methods import run_method
    from kvtool.methods.care import ConvertMla
    from kvtool.methods.heal import Heal, HealOptions
    from kvtool.models import load_model
    from kvtool.options import DataOptions

    torch.manual_seed(0)
    source = load_model("smollm2-135m")
    streams = heldout_streams(source.tokenizer, TextSource(args.eval_dataset, "heldout"), args.max_tokens)
    original = score(source.model, streams)
    result = {"original": original, "rows": [], "heldout_tokens": {d: int(t.numel()) for d, t in streams.items()},
              "eval_dataset": args.eval_dataset, "parts": describe_parts(TextSource(args.eval_dataset, "heldout")),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print("original", json.dumps(original), flush=True)
    steps = args.steps or HealOptions().steps
    tmp = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    for dataset in args.datasets.split(","):
        data = DataOptions(**{**ConvertMla.data_defaults, "dataset": dataset})  # convert-mla's default windows
        t0 = time.perf_counter()
        store = calibrate(source, data.source(), ("attn_in",), samples=data.samples, seq_len=data.seq_len,
                          seed=data.seed)
        print(f"{dataset}: statistics in {time.perf_counter() - t0:.0f} s", flush=True)
        (tmp / f"stats-{dataset}").mkdir(parents=True)
        store.save(tmp / f"stats-{dataset}")
    # each (ratio, layout) with every calibration text in turn: an interrupted run keeps whole comparisons
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for layout in args.layouts.split(","):
            for dataset in args.datasets.split(","):
                stats_dir = tmp / f"stats-{dataset}"
                heal_data = DataOptions(**{**Heal.data_defaults, "dataset": dataset,
                                           **({"samples": args.heal_samples} if args.heal_samples else {})})
                conv = tmp / f"{dataset}-{layout}-{ratio}"
                # the CLI itself (the DeepSeek export's latent-norm fit rides the statistics pass as a visitor)
                flags = [f"--{k.replace('_', '-')}={v}" for k, v in LAYOUTS[layout].items()]
                if args.rank_alloc:
                    flags.append(f"--rank-alloc={args.rank_alloc}")
                if args.rope_dim is not None and layout != "keep":
                    flags.append(f"--rope-dim={args.rope_dim}")
                subprocess.run([sys.executable, "-m", "kvtool.cli", "convert-mla", "smollm2-135m", "--stats-dir",
                                str(stats_dir), f"--kv-ratio={ratio}", *flags, "-o", str(conv), "--device", "cpu",
                                "--no-progress"], check=True, stdout=subprocess.DEVNULL)
                student = load_model(str(conv), strict=False)
                before = score(student.model, streams)
                load_before = os.getloadavg()[0]
                t0 = time.perf_counter()
                fit = {"fit": args.fit} if args.fit else {}
                report = run_method("heal", student, None, tmp / f"{conv.name}-healed", teacher="smollm2-135m",
                                    data=heal_data, steps=steps, **fit)
                seconds = time.perf_counter() - t0
                load_after = os.getloadavg()[0]
                healed = load_model(str(tmp / f"{conv.name}-healed"), strict=False)
                after = score(healed.model, streams)
                row = {"dataset": dataset, "layout": layout, "kv_ratio": ratio, "before": before, "after": after,
                       "before_x": ratios(before, original), "after_x": ratios(after, original),
                       "heal_seconds": round(seconds, 1), "load_1min_before_after": [load_before, load_after],
                       "heal_tokens": report["tokens"], "steps_per_layer": steps,
                       "fit": report.get("healing", report).get("fit"), "rank_alloc": args.rank_alloc or "default",
                       "rope_dim": args.rope_dim or "default", "heal_samples": heal_data.samples}
                if args.e2e_steps:
                    from kvtool.convert.heal import distill

                    t0 = time.perf_counter()
                    windows = calibration_windows(source.tokenizer, heal_data.source(), heal_data.samples,
                                                  heal_data.seq_len, heal_data.seed, source.spec.max_positions)
                    params = [p for layer in healed.model.model.layers for p in layer.self_attn.parameters()]
                    curve = distill(healed.model, lambda ids: source.model(input_ids=ids, use_cache=False).logits,
                                    list(windows.split(heal_data.batch_size)), params, steps=args.e2e_steps,
                                    lr=HealOptions().e2e_lr)
                    e2e = score(healed.model.eval(), streams)
                    row.update({"e2e_steps": args.e2e_steps, "after_e2e": e2e, "after_e2e_x": ratios(e2e, original),
                                "e2e_seconds": round(time.perf_counter() - t0, 1), "kl_before": curve[0],
                                "kl_after": curve[-1]})
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                if args.json:  # after every row: a stopped run keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + markdown(result))


if __name__ == "__main__":
    main()
