"""Layer-wise healing of Ladder-rewired models (embedded SmolLM2-135M): held-out perplexity before and after.

Drives the CLI with its defaults, as a user would: `kvtool ladder --layers auto --count K` (the K layers of least
drift on the default 16 x 256 calibration windows), then `kvtool heal` (default: 150 Adam steps per rewired layer,
lr 1e-3, all parameters of each rewired layer, inputs and targets from the original model on heal's calibration
windows, 64 x 256 since 2026-12-01, 16 x 256 before; optionally `--e2e-steps`), and `kvtool eval` of the
original, the rewired and the healed model on the same held-out tokens (embedded held-out part, non-overlapping
512-token windows).

    .venv/bin/python bench/heal_ladder_quality.py --counts 15 --json docs/results/heal_ladder_quality.json
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

KVTOOL = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"
MODEL = "smollm2-135m"


def kvtool(*args: object) -> str:
    """Run one kvtool command and return its stdout (exit on failure)."""
    cmd = [KVTOOL, *[str(a) for a in args]]
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return res.stdout


def ppl(model: object, max_tokens: int) -> float:
    """Held-out perplexity through `kvtool eval`."""
    out = kvtool("eval", model, "--max-tokens", max_tokens, "--device", "cpu", "--json", "--no-progress")
    return json.loads(out)["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="15", help="how many of the 30 layers to rewire (comma-separated)")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--heal-args", default="", help="extra `kvtool heal` flags, e.g. '--steps 100 --e2e-steps 20'")
    ap.add_argument("--work", type=Path, default=None, help="keep checkpoints here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="heal-ladder-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--device", "cpu", "--no-progress"]
    results: dict = {"model": MODEL, "max_tokens": args.max_tokens, "heal_args": args.heal_args,
                     "original": ppl(MODEL, args.max_tokens), "rows": []}
    print(f"original {results['original']:.3f}", flush=True)
    for count in [int(c) for c in args.counts.split(",")]:
        rewired = work / f"ladder-{count}"
        if not rewired.exists():
            kvtool("ladder", MODEL, "-o", rewired, "--layers", "auto", "--count", count, *common)
        layers = json.loads((rewired / "config.json").read_text())["ladder_layers"]
        healed = work / f"ladder-{count}-healed"
        t0 = time.time()
        kvtool("heal", rewired, "--teacher", MODEL, "-o", healed, "--overwrite", *args.heal_args.split(), *common)
        wall = time.time() - t0
        report = json.loads((healed / "kvtool.json").read_text())["healing"]
        row = {"count": count, "layers": layers, "rewired": ppl(rewired, args.max_tokens),
               "healed": ppl(healed, args.max_tokens), "heal_seconds": report["seconds"], "wall_seconds": round(wall),
               "tokens": report["tokens"], "options": report["options"], "parameters": report["parameters"],
               "rel_error": [[r["layer"], round(r["loss_before"], 5), round(r["loss_after"], 5)]
                             for r in report["layers"]]}
        if report.get("e2e"):
            row["kl_before"], row["kl_after"] = report["e2e"]["kl_before"], report["e2e"]["kl_after"]
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rel_error"}), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    orig = results["original"]
    print(f"\noriginal perplexity {orig:.2f}")
    print("| layers rewired | rewired | healed | heal seconds | calibration tokens |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['count']}/30 | {r['rewired']:.2f} ({r['rewired'] / orig:.2f}×) | {r['healed']:.2f} "
              f"({r['healed'] / orig:.2f}×) | {r['heal_seconds']:.0f} | {r['tokens']} |")


if __name__ == "__main__":
    main()
