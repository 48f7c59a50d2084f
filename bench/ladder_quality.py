"""Quality of Ladder-residual rewiring without retraining: held-out perplexity vs how many / which layers.

Runs on the embedded SmolLM2-135M (30 layers) on the CPU:

* per-layer drift from one layer-sequential pass over calibration windows (``kvtool.calib.drift.layer_drift``);
* held-out perplexity (embedded held-out text, non-overlapping windows) with 0, 25 %, 50 % and all layers
  rewired, choosing the layers top-down (the paper's choice: the upper part) or by least drift (``auto``);
* optionally (``--heal-steps N``) a short healing fine-tune of the rewired layers only (AdamW on calibration
  windows, next-token loss) for one configuration, and the perplexity after it.

Example (about 10 minutes on 2 CPU cores):
    python bench/ladder_quality.py --tokens 4096 --out bench/ladder_quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows for the drift pass")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--fractions", default="0,0.25,0.5,1", help="fractions of layers to rewire")
    p.add_argument("--heal-steps", type=int, default=0, help="healing fine-tune steps (0 = skip)")
    p.add_argument("--heal-config", default="top:0.5", help="which configuration to heal, SELECTION:FRACTION")
    p.add_argument("--heal-lr", type=float, default=5e-5)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvtool.calib.drift import layer_drift
    from kvtool.convert.ladder import choose_least_drift
    from kvtool.data import TextSource, calibration_windows, heldout_tokens
    from kvtool.evaluate import perplexity
    from kvtool.models import load_model
    from kvtool.runtime.ladder import install_ladder, remove_ladder

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tok, n = loaded.model, loaded.tokenizer, loaded.spec.num_layers
    heldout = heldout_tokens(tok, TextSource(split="heldout"), args.tokens)
    windows = calibration_windows(tok, TextSource(), args.calib_samples, args.calib_seq_len, 0,
                                  loaded.spec.max_positions)
    t0 = time.perf_counter()
    drift = layer_drift(loaded, windows, batch_size=4)
    drift_s = time.perf_counter() - t0
    print(f"drift pass: {drift_s:.0f} s over {windows.numel()} calibration tokens")

    def ppl(layers: list[int]) -> float:
        install_ladder(model, layers)
        try:
            return perplexity(model, heldout, args.seq_len, None, 4)["perplexity"]
        finally:
            remove_ladder(model)

    rows = []
    cache: dict[tuple[int, ...], float] = {}
    for frac in (float(f) for f in args.fractions.split(",")):
        k = int(math.floor(n * frac + 0.5))
        for selection in ("top", "auto"):
            layers = list(range(n - k, n)) if selection == "top" else choose_least_drift(drift, k)
            key = tuple(layers)
            if key not in cache:
                t = time.perf_counter()
                cache[key] = ppl(layers)
                print(f"{selection:>4} {frac:>5.2f} k={k:>2} ppl={cache[key]:8.3f}  ({time.perf_counter() - t:.0f} s)"
                      f"  layers={layers}", flush=True)
            rows.append({"selection": selection, "fraction": frac, "k": k, "layers": layers,
                         "perplexity": cache[key], "drift_sum": sum(drift[i]["drift"] for i in layers)})

    heal = None
    if args.heal_steps:
        sel, frac = args.heal_config.split(":")
        k = int(math.floor(n * float(frac) + 0.5))
        layers = list(range(n - k, n)) if sel == "top" else choose_least_drift(drift, k)
        heal = heal_and_eval(model, windows, layers, args, heldout, perplexity, install_ladder)
        heal.update({"selection": sel, "fraction": float(frac), "k": k, "layers": layers,
                     "before": cache.get(tuple(layers))})

    base = cache[()]
    print("\nheld-out perplexity of", loaded.source, f"({heldout.numel()} tokens, seq-len {args.seq_len}, "
          "non-overlapping windows), no retraining")
    print(f"{'layers rewired':>16} | {'top-down':>10} | {'auto (least drift)':>18}")
    print("-" * 52)
    by = {(r["selection"], r["fraction"]): r for r in rows}
    for frac in (float(f) for f in args.fractions.split(",")):
        top, auto = by[("top", frac)], by[("auto", frac)]
        label = f"{top['k']}/{n} ({frac:.0%})"
        print(f"{label:>16} | {top['perplexity']:>10.3f} | {auto['perplexity']:>18.3f}")
    print(f"(source model: {base:.3f})")
    if heal:
        print(f"healing {heal['steps']} steps on {heal['selection']} {heal['k']} layers: "
              f"{heal['before']:.3f} -> {heal['after']:.3f} ({heal['seconds']:.0f} s)")
    result = {"model": loaded.source, "tokens": int(heldout.numel()), "seq_len": args.seq_len,
              "calibration_tokens": int(windows.numel()), "drift_seconds": drift_s, "drift": drift,
              "rows": rows, "heal": heal}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def heal_and_eval(model, windows, layers, args, heldout, perplexity, install_ladder) -> dict:
    """Fine-tune only the rewired layers' weights on calibration windows (a copy of the model), then evaluate."""
    student = copy.deepcopy(model)
    install_ladder(student, layers)
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for i in layers for p in student.model.layers[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.heal_lr, weight_decay=0.0)
    student.train()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    losses = []
    for step in range(args.heal_steps):
        idx = torch.randint(0, windows.shape[0], (args.heal_batch,), generator=g)
        batch = windows[idx]
        loss = student(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"heal step {step}: loss {loss.item():.3f}", flush=True)
    student.eval()
    after = perplexity(student, heldout, args.seq_len, None, 4)["perplexity"]
    return {"steps": args.heal_steps, "lr": args.heal_lr, "batch": args.heal_batch, "after": after,
            "seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": losses[-1]}


if __name__ == "__main__":
    main()
