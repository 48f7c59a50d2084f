"""CARE quality on the embedded model: held-out perplexity of GQA->MLA conversions (no healing).

Three studies, each what ``kvtool convert-mla`` does with the options named in the row:

``sweep`` (default): for each rope mode (keep, decoupled) and KV ratio, svd+uniform (weight-only baseline),
  care+uniform, care+care (water-filling), care+energy (min. residual), care+sensitivity (measured), with the CLI's
  default rope settings per format, plus the DeepSeek-V3 export (CLI defaults for --format deepseek-v3) loaded in
  stock transformers.
``rope``: rope-pair selection (norm / strided / uniform) x FreqFold x rope width at the given ratios (care+uniform),
  kvtool format, and the DeepSeek-V3 export for the selections its rotary can express.
``norm``: kv_a_layernorm weight rules of the DeepSeek-V3 export (and the norm bypassed, the layout's own error).

Calibration: 32 x 512 tokens of the embedded calibration text; evaluation: non-overlapping 512-token windows of
the disjoint held-out text.

    .venv/bin/python bench/care_quality.py --study sweep --max-tokens 8192 --json docs/results/care_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from kvtool.calib.collect import collect_statistics
from kvtool.calib.input_samples import AttnInputSampler
from kvtool.calib.sensitivity import kv_sensitivity
from kvtool.convert.care import convert_layers, mla_state_dict
from kvtool.convert.deepseek_export import add_ballast, deepseek_v3_checkpoint, latent_norm_weights
from kvtool.data import TextSource, calibration_windows, heldout_tokens
from kvtool.evaluate import perplexity
from kvtool.methods.care import ConvertMlaOptions
from kvtool.models import load_model
from kvtool.runtime.mla import MLA_MODELS, mla_config

VARIANTS = [("svd", "uniform"), ("care", "uniform"), ("care", "care"), ("care", "energy"),
            ("care", "sensitivity")]


def _memo_sqrt():
    """Reuse each layer's damped square root across the study's conversions (same statistics, same damping)."""
    import kvtool.convert.care as care

    cache, inner = {}, care.damped_sqrt

    def damped_sqrt(c, damping):
        key = (tuple(c.shape), float(c.double().sum()), float(c.double().pow(2).sum()), damping)
        if key not in cache:
            cache[key] = inner(c, damping)
        return cache[key]

    care.damped_sqrt = damped_sqrt


class Bench:
    def __init__(self, samples: int, seq_len: int, max_tokens: int, sample_inputs: bool = True):
        torch.manual_seed(0)
        self.loaded = load_model("smollm2-135m")
        self.windows = calibration_windows(self.loaded.tokenizer, TextSource(), samples, seq_len, seed=0)
        self.sampler = AttnInputSampler(2048)
        t0 = time.time()
        self.store = collect_statistics(self.loaded, self.windows, "attn_in", batch_size=8,
                                        visitors=[self.sampler] if sample_inputs else [])
        print(f"calibrated {self.windows.numel()} tokens in {time.time() - t0:.0f}s", flush=True)
        self.tokens = heldout_tokens(self.loaded.tokenizer, TextSource(split="heldout"), max_tokens)
        self.weights = {k: v.detach() for k, v in self.loaded.model.state_dict().items()}
        self.sensitivity = None
        self.original = self.ppl(self.loaded.model)
        print(f"original: {self.original:.3f}", flush=True)

    def ppl(self, model) -> float:
        return perplexity(model, self.tokens, 512)["perplexity"]

    def convert(self, opts: ConvertMlaOptions):
        care = opts.care_options()
        t0 = time.time()
        if care.rank_alloc in ("sensitivity", "sensitivity-split") and self.sensitivity is None:
            t1 = time.time()
            self.sensitivity = kv_sensitivity(self.loaded, self.windows)
            print(f"sensitivity pass {time.time() - t1:.0f}s", flush=True)
        layers, report = convert_layers(self.weights, self.store, self.loaded.spec, care,
                                        sensitivity=self.sensitivity)
        return layers, report, time.time() - t0

    def kvtool_ppl(self, opts: ConvertMlaOptions, layers, report) -> float:
        care = opts.care_options()
        cfg = mla_config(self.loaded.model.config, [(r["r_k"], r["r_v"]) for r in report["layers"]], care.rope,
                         report["rope_dim"], [r.get("rope_pairs", []) for r in report["layers"]])
        model = MLA_MODELS[self.loaded.spec.model_type](cfg).eval()
        model.load_state_dict(mla_state_dict(self.weights, layers, self.loaded.spec, torch.float32), strict=True)
        return self.ppl(model)

    def deepseek_ppl(self, layers, rule: str, bypass: bool = False, ballast: bool = False) -> float:
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = self.loaded.spec
        if ballast:
            layers, spread = add_ballast(layers, [self.sampler.samples[i] for i in range(spec.num_layers)],
                                         [self.sampler.first[i] for i in range(spec.num_layers)])
            print(f"ballast max relative deviation per layer: {[round(s, 3) for s in spread]}", flush=True)
        norms = latent_norm_weights(layers, [self.sampler.samples[i] for i in range(spec.num_layers)],
                                    [self.store.second_moment(i, "attn_in") for i in range(spec.num_layers)],
                                    float(self.loaded.model.config.rms_norm_eps), rule)
        state, cfg, _ = deepseek_v3_checkpoint(self.weights, layers, spec, self.loaded.model.config, norms,
                                               torch.float32)
        cfg = dict(cfg)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
        if model.config.tie_word_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        model.load_state_dict(state, strict=False)
        if bypass:
            for layer in model.model.layers:
                layer.self_attn.kv_a_layernorm.forward = lambda h: h
        return self.ppl(model)


def row_of(opts: ConvertMlaOptions, report, secs) -> dict:
    r = opts.resolved()
    return {"rope": r.rope, "rope_dim": report["rope_dim"], "rope_select": r.rope_select, "rope_fold": r.rope_fold,
            "ratio": r.kv_ratio, "method": r.method, "alloc": r.rank_alloc, "kv_ratio": report["kv_ratio"],
            "err_k": report["mean_err_k"], "err_v": report["mean_err_v"],
            "ranks_k": [x["r_k"] for x in report["layers"]], "ranks_v": [x["r_v"] for x in report["layers"]],
            "rope_stride": report["layers"][0].get("rope_stride"),
            "rope_fold_used": report["layers"][0].get("rope_fold"), "convert_seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=("sweep", "rope", "norm"), default="sweep")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--ratios", default="0.75,0.5,0.375,0.25")
    ap.add_argument("--ropes", default="keep,decoupled")
    ap.add_argument("--variants", default=",".join(f"{m}:{a}" for m, a in VARIANTS))
    ap.add_argument("--selects", default="norm,strided,uniform")
    ap.add_argument("--folds", default="1,2,4")
    ap.add_argument("--rope-dims", default="16,32,64")
    ap.add_argument("--deepseek", action="store_true", help="rope study: also evaluate the DeepSeek-V3 export")
    ap.add_argument("--norm-rules", default="lsq,mean-rms,inv-mean-inv-rms,rms")
    ap.add_argument("--configs", default="", help="rope study: explicit select:fold:dim list instead of the product")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    _memo_sqrt()
    ratios = [float(r) for r in args.ratios.split(",")]
    b = Bench(args.samples, args.seq_len, args.max_tokens,
              sample_inputs=args.study == "norm" or (args.study == "sweep" and "decoupled" in args.ropes)
              or args.deepseek)
    command = " ".join(["bench/care_quality.py"] + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                    if k != "json"])
    results = {"study": args.study, "original": b.original, "rows": [], "command": command,
               "calibration_tokens": int(b.windows.numel()), "heldout_tokens": int(b.tokens.numel()),
               "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}

    def emit(row):
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("ranks")}), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    if args.study == "sweep":
        for rope in args.ropes.split(","):
            for ratio in ratios:
                for variant in args.variants.split(","):
                    method, alloc = variant.split(":")
                    opts = ConvertMlaOptions(method=method, rank_alloc=alloc, kv_ratio=ratio, rope=rope)
                    layers, report, secs = b.convert(opts)
                    row = row_of(opts, report, secs)
                    row["ppl"] = b.kvtool_ppl(opts, layers, report)
                    emit(row)
                if rope == "decoupled":  # what `--format deepseek-v3` does by default
                    opts = ConvertMlaOptions(kv_ratio=ratio, format="deepseek-v3")
                    layers, report, secs = b.convert(opts)
                    row = row_of(opts, report, secs)
                    row.update(format="deepseek-v3", latent_norm=opts.latent_norm,
                               ppl=b.deepseek_ppl(layers, opts.latent_norm))
                    emit(row)
    elif args.study == "rope":
        configs = [(sel, int(fold), int(dim)) for sel, fold, dim in (c.split(":") for c in args.configs.split(",")
                                                                     if c)]
        configs = configs or [(sel, fold, dim) for dim in [int(x) for x in args.rope_dims.split(",")]
                              for sel in args.selects.split(",") for fold in [int(x) for x in args.folds.split(",")]]
        for ratio in ratios:
            for select, fold, dim in configs:
                opts = ConvertMlaOptions(kv_ratio=ratio, rope="decoupled", rope_dim=dim, rope_select=select,
                                         rope_fold=fold)
                try:
                    layers, report, secs = b.convert(opts)
                except Exception as e:  # e.g. uniform needs rope_dim/2 to divide head_dim/2
                    print(f"skip {dim} {select} {fold}: {e}")
                    continue
                row = row_of(opts, report, secs)
                row["rope_score_share"] = sum(x["rope_score_share"] for x in report["layers"]) / len(report["layers"])
                row["ppl"] = b.kvtool_ppl(opts, layers, report)
                if select in ("strided", "uniform") and args.deepseek:
                    row["deepseek_v3_ppl"] = b.deepseek_ppl(layers, "lsq")
                emit(row)
    else:
        for ratio in ratios:
            opts = ConvertMlaOptions(kv_ratio=ratio, format="deepseek-v3")
            layers, report, secs = b.convert(opts)
            row = row_of(opts, report, secs)
            row["ballast+lsq"] = b.deepseek_ppl(layers, "lsq", ballast=True)
            emit(dict(row))
            row["ballast+bypassed"] = b.deepseek_ppl(layers, "lsq", bypass=True, ballast=True)
            row["bypassed"] = b.deepseek_ppl(layers, "rms", bypass=True)
            for rule in args.norm_rules.split(","):
                row[rule] = b.deepseek_ppl(layers, rule)
            emit(row)
    print(f"\noriginal perplexity {results['original']:.2f} ({results['heldout_tokens']} held-out tokens)")


if __name__ == "__main__":
    main()
