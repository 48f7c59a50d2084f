"""CARE quality on the embedded model: held-out perplexity of GQA->MLA conversions at several KV ratios.

For each rope mode (keep, decoupled) and KV ratio, converts SmolLM2-135M with
  svd+uniform (weight-only baseline), care+uniform, care+care (water-filling), care+energy (min. residual),
and reports held-out perplexity (embedded held-out text, non-overlapping 512-token windows), plus the
DeepSeek-V3 export (decoupled, uniform rope pairs) to measure the kv_a_layernorm approximation.

    .venv/bin/python bench/care_quality.py --samples 32 --max-tokens 8192 --json out/care_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvtool.calib import collect_statistics
from kvtool.convert.care import CareOptions, convert_layers, mla_state_dict
from kvtool.convert.deepseek_export import deepseek_v3_checkpoint, latent_rms
from kvtool.data import TextSource, calibration_windows, heldout_tokens
from kvtool.evaluate import perplexity
from kvtool.models import load_model
from kvtool.runtime.mla import MLA_MODELS, mla_config

VARIANTS = [("svd", "uniform"), ("care", "uniform"), ("care", "care"), ("care", "energy")]


def mla_model(loaded, store, opts):
    weights = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    layers, report = convert_layers(weights, store, loaded.spec, opts)
    cfg = mla_config(loaded.model.config, [(r["r_k"], r["r_v"]) for r in report["layers"]], opts.rope,
                     report["rope_dim"], [r.get("rope_pairs", []) for r in report["layers"]])
    model = MLA_MODELS[loaded.spec.model_type](cfg).eval()
    model.load_state_dict(mla_state_dict(weights, layers, loaded.spec, torch.float32), strict=True)
    return model, layers, report, weights


def deepseek_model(loaded, store, layers, weights):
    from transformers import AutoConfig, AutoModelForCausalLM

    rms = latent_rms(layers, [store.second_moment(i, "attn_in") for i in range(loaded.spec.num_layers)])
    state, cfg, _ = deepseek_v3_checkpoint(weights, layers, loaded.spec, loaded.model.config, rms, torch.float32)
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config).eval()
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--ratios", default="0.75,0.5,0.375,0.25")
    ap.add_argument("--ropes", default="keep,decoupled")
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--variants", default=",".join(f"{m}:{a}" for m, a in VARIANTS),
                    help="method:allocation pairs, e.g. care:uniform")
    ap.add_argument("--rope-select", default="uniform", help="decoupled: uniform (DeepSeek-exportable) or norm")
    ap.add_argument("--rope-dims", default="", help="decoupled: comma-separated rope widths (default: kvtool's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    windows = calibration_windows(loaded.tokenizer, TextSource(), args.samples, args.seq_len, seed=0)
    t0 = time.time()
    store = collect_statistics(loaded, windows, "attn_in", batch_size=8)
    print(f"calibrated {windows.numel()} tokens in {time.time() - t0:.0f}s", flush=True)
    tokens = heldout_tokens(loaded.tokenizer, TextSource(split="heldout"), args.max_tokens)
    results = {"original": perplexity(loaded.model, tokens, 512)["perplexity"], "rows": [],
               "calibration_tokens": int(windows.numel()), "heldout_tokens": int(tokens.numel())}
    print(f"original: {results['original']:.3f}", flush=True)
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    rope_dims = [int(d) for d in args.rope_dims.split(",") if d] or [None]
    runs = [(rope, dim) for rope in args.ropes.split(",") for dim in (rope_dims if rope == "decoupled" else [None])]
    for rope, rope_dim in runs:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for method, alloc in variants:
                opts = CareOptions(method=method, rank_alloc=alloc, kv_ratio=ratio, rope=rope, damping=args.damping,
                                   rope_select=args.rope_select if rope == "decoupled" else "norm", rope_dim=rope_dim)
                t0 = time.time()
                model, layers, report, weights = mla_model(loaded, store, opts)
                secs = time.time() - t0
                ppl = perplexity(model, tokens, 512)["perplexity"]
                row = {"rope": rope, "rope_dim": rope_dim, "rope_select": opts.rope_select, "ratio": ratio,
                       "method": method, "alloc": alloc, "ppl": ppl,
                       "kv_ratio": report["kv_ratio"], "err_k": report["mean_err_k"], "err_v": report["mean_err_v"],
                       "ranks_k": [r["r_k"] for r in report["layers"]], "ranks_v": [r["r_v"] for r in report["layers"]],
                       "convert_seconds": secs}
                if rope == "decoupled" and method == "care" and alloc == "uniform" and opts.rope_select == "uniform":
                    row["deepseek_v3_ppl"] = perplexity(deepseek_model(loaded, store, layers, weights), tokens,
                                                        512)["perplexity"]
                results["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.startswith("ranks")}), flush=True)
                del model
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\noriginal perplexity {results['original']:.2f} ({results['heldout_tokens']} held-out tokens)")
    if variants != VARIANTS or rope_dims != [None]:
        for r in results["rows"]:
            print(f"| {r['rope']} dim={r['rope_dim']} select={r['rope_select']} | {r['ratio']} | {r['method']}+"
                  f"{r['alloc']} | {r['ppl']:.2f} |")
        return
    print("| rope | KV ratio | svd+uniform | care+uniform | care+care | care+energy | DeepSeek-V3 export |")
    print("|---|---|---|---|---|---|---|")
    for rope in args.ropes.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            rows = {(r["method"], r["alloc"]): r for r in results["rows"] if r["rope"] == rope and r["ratio"] == ratio}
            ds = rows[("care", "uniform")].get("deepseek_v3_ppl")
            cells = [f"{rows[v]['ppl']:.2f}" for v in VARIANTS]
            print(f"| {rope} | {ratio} | " + " | ".join(cells) + f" | {f'{ds:.2f}' if ds else '-'} |")


if __name__ == "__main__":
    main()
