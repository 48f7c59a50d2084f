"""kvtool corda vs PEFT's own CorDA (``init_lora_weights="corda"`` + ``preprocess_corda``) on the embedded model.

Both see the same calibration windows, rank, targets and mode. Each runs end to end (load the model, calibrate,
decompose, write adapter + residual base) in its own subprocess; wall time and peak RSS (``ru_maxrss``) are
measured there. Then, in this process (untimed), the adapters are compared:

1. kvtool as shipped vs PEFT as shipped;
2. kvtool's decomposition fed with *PEFT-normalized* covariances vs PEFT: isolates the implementation (float64
   vs float32, damping) from the statistics;
3. kvtool vs kvtool-with-PEFT-normalization: the effect of PEFT's normalization alone. PEFT's forward hook divides
   each sample's inputs by ``|max(x)|`` (the signed maximum, then abs) before adding ``xᵀx``, and divides the sum by
   the number of samples; kvtool uses the plain token mean ``Σ xᵀx / tokens``. Per-sample scaling re-weights the
   samples by ``1/max²`` (dominated by outlier channels), which changes the covariance's shape, not just its scale.

Agreement per module: relative Frobenius difference of the adapter products ``B·A`` and mean cos² of the
principal angles between the two adapters' column spaces (B) and row spaces (A) (1 = same subspace).

    python bench/corda_vs_peft.py --samples 16 --seq-len 256 --rank 16 --mode kpa --json out/corda_vs_peft.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

T_START = time.perf_counter()
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def windows_for(tok, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    from kvtool.data import TextSource, calibration_windows

    return calibration_windows(tok, TextSource("embedded"), samples, seq_len, seed)


def child_kvtool(args: argparse.Namespace) -> dict:
    """kvtool end to end as the CLI runs it: `kvtool corda` (load, layer-by-layer statistics in batches of 8,
    decompose, write), in this process."""
    from kvtool.cli import app

    argv = ["corda", "smollm2-135m", "-o", str(args.out), "--samples", str(args.samples), "--seq-len",
            str(args.seq_len), "--seed", str(args.seed), "--batch-size", "8", "--rank", str(args.rank), "--mode",
            args.mode, "--targets", args.targets, "--device", "cpu", "--no-progress", "--json"]
    try:
        app(argv, standalone_mode=False)
    except SystemExit as e:  # typer exits 0 after printing
        if e.code:
            raise
    return {}


def child_peft(args: argparse.Namespace) -> dict:
    """PEFT end to end: load, preprocess_corda (hooks on every target, one window per forward), get_peft_model,
    save adapter and residual base."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtool.models import resolve_model_path

    path, _, _ = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    windows = windows_for(tok, args.samples, args.seq_len, args.seed)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=args.targets.split(","),
                        init_lora_weights="corda", task_type="CAUSAL_LM",
                        corda_config=CordaConfig(corda_method={"kpa": "kpm", "ipa": "ipm"}[args.mode]))

    @torch.no_grad()
    def run_model() -> None:
        for w in windows:  # PEFT's hook squeezes dim 0: one window per forward call
            model(input_ids=w[None])

    preprocess_corda(model, config, run_model=run_model)
    t_stats = time.perf_counter() - T_START
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(args.out / "adapter"))
    peft_model.unload().save_pretrained(str(args.out / "base"))  # residual weights (W − B·A) without the adapter
    return {"stats_done_s": t_stats}


def run_child(role: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--out", str(out), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--mode", args.mode, "--targets", args.targets,
           "--seed", str(args.seed), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{role} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- agreement

def load_pairs(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from kvtool.methods.corda import adapted_modules, load_adapter

    return adapted_modules(load_adapter(adapter_dir)[1])


def subspace_cos2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cos² of the principal angles between the column spaces of x and y."""
    qx, _ = torch.linalg.qr(x.double())
    qy, _ = torch.linalg.qr(y.double())
    return float(torch.linalg.matrix_norm(qx.T @ qy) ** 2 / x.shape[1])


def agreement(p: dict, q: dict) -> dict:
    """Per-target summary of how two adapters agree."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for mod, (a1, b1) in p.items():
        a2, b2 = q[mod]
        d1, d2 = b1.double() @ a1.double(), b2.double() @ a2.double()
        rel = float(torch.linalg.matrix_norm(d1 - d2) / torch.linalg.matrix_norm(d2))
        rows.setdefault(mod.rsplit(".", 1)[1], []).append((rel, subspace_cos2(b1, b2), subspace_cos2(a1.T, a2.T)))
    def summary(vals: list[tuple[float, float, float]]) -> dict:
        return {"rel_delta_median": statistics.median(v[0] for v in vals), "rel_delta_max": max(v[0] for v in vals),
                "cos2_B_mean": statistics.mean(v[1] for v in vals), "cos2_A_mean": statistics.mean(v[2] for v in vals)}

    out = {t: summary(vals) for t, vals in rows.items()}
    out["all"] = summary([v for vals in rows.values() for v in vals])
    return out


@torch.no_grad()
def peft_normalized_store(loaded, windows: torch.Tensor, names: tuple[str, ...]):
    """Covariances exactly as PEFT's hook forms them (per-window x / |max(x)|, summed, / windows), in a StatsStore,
    plus the spread of the per-window weights 1/max² for each statistic."""
    from kvtool.calib.stats import StatsStore

    store = StatsStore()
    weights: dict[tuple[str, int], list[float]] = {}
    hooks = []
    module_of = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
                 "down_in": "mlp.down_proj"}
    mods = dict(loaded.model.named_modules())
    for i in range(loaded.spec.num_layers):
        for n in names:
            def hook(module, args, i=i, n=n):
                x = args[0].detach().squeeze(0).float()
                m = torch.max(x).abs()
                weights.setdefault((n, i), []).append(float(1.0 / m**2))
                x = (x / m).double()
                store.add_gram(i, n, x.T @ x, 1)  # count = windows, as PEFT divides by sample_count
            hooks.append(mods[f"model.layers.{i}.{module_of[n]}"].register_forward_pre_hook(hook))
    try:
        for w in windows:
            loaded.model(input_ids=w[None])
    finally:
        for h in hooks:
            h.remove()
    spread = {n: max(max(v) / min(v) for (n2, _), v in weights.items() if n2 == n) for n in names}
    return store, spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["compare", "kvtool", "peft"], default="compare")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mode", choices=["kpa", "ipa"], default="kpa")
    ap.add_argument("--targets", default=TARGETS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in both runs (1: on a shared CPU, multi-threaded LAPACK SVDs oversubscribe)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.role != "compare":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        extra = (child_kvtool if args.role == "kvtool" else child_peft)(args)
        wall = time.perf_counter() - T_START
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        print(json.dumps({"role": args.role, "wall_s": wall, "peak_rss_mib": peak_mib, **extra}))
        return

    work = Path(tempfile.mkdtemp(prefix="corda-vs-peft-"))
    runs = {}
    for role in ("kvtool", "peft"):
        print(f"running {role} end to end ...", flush=True)
        runs[role] = run_child(role, args, work / role)
        print(f"  {runs[role]}", flush=True)

    from kvtool.convert.corda import corda_transform, parse_targets, required_stats
    from kvtool.models import load_model

    targets = parse_targets(args.targets)
    loaded = load_model("smollm2-135m")
    kv, pf = load_pairs(work / "kvtool" / "adapter"), load_pairs(work / "peft" / "adapter")
    assert set(kv) == set(pf), "the two adapters cover different modules"
    windows = windows_for(loaded.tokenizer, args.samples, args.seq_len, args.seed)
    pstore, spread = peft_normalized_store(loaded, windows, required_stats(targets))
    adapter_pn, _, rep_pn = corda_transform(loaded.model.state_dict(), pstore.second_moment, loaded.spec.num_layers,
                                            targets, args.rank, args.mode)
    from kvtool.methods.corda import adapted_modules

    kv_pn = adapted_modules(adapter_pn)

    # identity at init of both outputs, with stock PEFT loading
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    ident, saved_init = {}, {}
    with torch.no_grad():
        ref = loaded.model(input_ids=windows[:2]).logits
        for role in ("kvtool", "peft"):
            base = AutoModelForCausalLM.from_pretrained(str(work / role / "base"), dtype=torch.float32)
            cfg = LoraConfig.from_pretrained(str(work / role / "adapter"))
            if role == "peft":  # PEFT saves init_lora_weights="corda", which re-runs corda_init on load and fails
                saved_init[role] = cfg.init_lora_weights
                cfg.init_lora_weights = True
            m = PeftModel.from_pretrained(base, str(work / role / "adapter"), config=cfg)
            ident[role] = float((m(input_ids=windows[:2]).logits - ref).abs().max())
    result = {
        "setup": {"threads": args.threads, "samples": args.samples, "seq_len": args.seq_len, "rank": args.rank,
                  "mode": args.mode,
                  "targets": list(targets), "modules": len(kv)},
        "runs": runs,
        "identity_max_abs_logit_diff": ident, "max_abs_logit": float(ref.abs().max()),
        "agreement_kvtool_vs_peft": agreement(kv, pf),
        "agreement_kvtool_peftnorm_vs_peft": agreement(kv_pn, pf),
        "agreement_kvtool_vs_kvtool_peftnorm": agreement(kv, kv_pn),
        "per_window_weight_spread_max_over_min": spread,
        "peftnorm_damp_max": rep_pn["damp_max"],
        "peft_saved_init_lora_weights": saved_init.get("peft"),
    }
    print("\n| run | wall s | calibration done at s | peak RSS MiB |")
    print("|---|---|---|---|")
    for role, r in runs.items():
        stats_s = f"{r['stats_done_s']:.1f}" if "stats_done_s" in r else "-"
        print(f"| {role} | {r['wall_s']:.1f} | {stats_s} | {r['peak_rss_mib']:.0f} |")
    print(f"speed-up kvtool vs PEFT: {runs['peft']['wall_s'] / runs['kvtool']['wall_s']:.2f}x; peak memory ratio "
          f"kvtool/PEFT: {runs['kvtool']['peak_rss_mib'] / runs['peft']['peak_rss_mib']:.2f}")
    print(f"identity at init (max |Δlogits|, stock PEFT load): kvtool {ident['kvtool']:.2e}, peft {ident['peft']:.2e} "
          f"(max |logit| {result['max_abs_logit']:.1f})")
    print("\n| comparison | target | median rel ‖ΔBA‖ | max rel ‖ΔBA‖ | mean cos² B | mean cos² A |")
    print("|---|---|---|---|---|---|")
    for name, key in (("kvtool vs PEFT", "agreement_kvtool_vs_peft"),
                      ("kvtool(PEFT-normalized cov) vs PEFT", "agreement_kvtool_peftnorm_vs_peft"),
                      ("kvtool vs kvtool(PEFT-normalized cov)", "agreement_kvtool_vs_kvtool_peftnorm")):
        for t, v in result[key].items():
            print(f"| {name} | {t} | {v['rel_delta_median']:.2e} | {v['rel_delta_max']:.2e} | "
                  f"{v['cos2_B_mean']:.4f} | {v['cos2_A_mean']:.4f} |")
    print("\nper-window weight 1/max² spread (max over layers of max/min over windows): "
          + ", ".join(f"{k} {v:.1f}" for k, v in spread.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
