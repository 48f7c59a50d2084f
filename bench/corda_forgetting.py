"""Does KPA forget less? Fine-tune KPA / IPA / plain LoRA / PiSSA-style adapters on a second text domain (CPU).

Domains (both offline):

* **A = Python docs**: the embedded Python reference (``kvtool.data`` ``embedded``): calibration part for statistics,
  held-out part for perplexity.
* **B = software licenses**: the license texts in ``/usr/share/common-licenses`` (Debian/Ubuntu ``base-files``;
  symlinks de-duplicated). Held out: Apache-2.0, MPL-2.0, CC0-1.0, BSD; fine-tuning text: all others.

Adapters are written by ``kvtool.methods.run_method('corda', ...)`` (the real output path), loaded with stock
``PeftModel.from_pretrained(base, adapter, is_trainable=True)``, checked against the original model at
initialization (max |Δlogits| and perplexity on both domains), then trained with the same seed, data order,
optimizer and learning rate, and evaluated again. KPA uses statistics of A (the knowledge to keep, as in the
paper); IPA uses statistics of B (the task, as in the paper). Run:

    python bench/corda_forgetting.py --steps 200 --rank 8 --seq-len 64 --batch 2 --layers 18-29 \
        --json out/forgetting.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

LICENSES = Path("/usr/share/common-licenses")
HELDOUT_LICENSES = ("Apache-2.0", "MPL-2.0", "CC0-1.0", "BSD")


def license_text(part: str) -> str:
    """Training (``train``) or held-out (``heldout``) license text, each file once (symlinks skipped)."""
    if not LICENSES.is_dir():
        sys.exit(f"{LICENSES} not found: this benchmark needs the Debian/Ubuntu base-files license texts")
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    chosen = [p for p in files if (p.name in HELDOUT_LICENSES) == (part == "heldout")]
    return "\n\n".join(p.read_text(errors="replace") for p in chosen)


def windows_of(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def ppl(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """Perplexity over non-overlapping windows (mean token NLL)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="kpa,ipa,lora,pissa")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--layers", default="18-29",
                    help="adapted layers; the backward pass stops at the first one, so upper layers are cheaper")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from kvtool.calib.collect import collect_statistics
    from kvtool.convert.corda import parse_targets, required_stats
    from kvtool.data import TextSource, calibration_windows, embedded_text
    from kvtool.methods import run_method
    from kvtool.models import load_model
    from kvtool.options import parse_layers

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    targets = parse_targets(args.targets)
    loaded = load_model("smollm2-135m")
    layers = parse_layers(args.layers, loaded.spec.num_layers) or list(range(loaded.spec.num_layers))
    tok, orig = loaded.tokenizer, loaded.model

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tok(text).input_ids, dtype=torch.long)

    eval_a = windows_of(encode(embedded_text("heldout"))[: args.eval_tokens], args.calib_seq_len)
    eval_b = windows_of(encode(license_text("heldout"))[: args.eval_tokens], args.calib_seq_len)
    train_b = windows_of(encode(license_text("train")), args.seq_len)
    print(f"domain A held-out {eval_a.numel()} tokens; domain B held-out {eval_b.numel()} tokens, "
          f"train {train_b.numel()} tokens ({train_b.shape[0]} windows of {args.seq_len})", flush=True)

    t0 = time.perf_counter()
    names = required_stats(targets)
    stats_a = collect_statistics(loaded, calibration_windows(tok, TextSource("embedded"), args.calib_samples,
                                                             args.calib_seq_len, args.seed), names,
                                 layers=layers)
    gen = torch.Generator().manual_seed(args.seed)
    b_calib = windows_of(encode(license_text("train")), args.calib_seq_len)
    b_calib = b_calib[torch.randperm(b_calib.shape[0], generator=gen)[: args.calib_samples]]
    stats_b = collect_statistics(loaded, b_calib, names, layers=layers)
    print(f"statistics A ({args.calib_samples}×{args.calib_seq_len}) and B ({b_calib.shape[0]}×"
          f"{args.calib_seq_len}) in {time.perf_counter() - t0:.0f}s", flush=True)

    with torch.no_grad():
        probe = eval_a[:2]
        logits_orig = orig(input_ids=probe).logits
    original = {"ppl_A": ppl(orig, eval_a), "ppl_B": ppl(orig, eval_b)}
    print(f"original: ppl A {original['ppl_A']:.3f}  ppl B {original['ppl_B']:.3f}", flush=True)

    # fixed data order, shared by every mode
    order = torch.randint(0, train_b.shape[0], (args.steps, args.batch), generator=torch.Generator().manual_seed(1))
    results = {}
    tmpdir = Path(tempfile.mkdtemp(prefix="corda-forget-"))
    for mode in args.modes.split(","):
        store = {"kpa": stats_a, "ipa": stats_b}.get(mode)
        out = tmpdir / mode
        rep = run_method("corda", loaded, store, out, mode=mode, rank=args.rank, targets=",".join(targets),
                         layers=",".join(map(str, layers)), init_seed=args.seed)
        base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(out / "adapter"), is_trainable=True)
        with torch.no_grad():
            init_diff = float((model(input_ids=probe).logits - logits_orig).abs().max())
        # identity at init: logits on two held-out windows of A (perplexity would repeat the original's)
        init = {"max_abs_logit_diff": init_diff, "max_abs_logit": float(logits_orig.abs().max())}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        torch.manual_seed(args.seed)
        model.train()
        t1 = time.perf_counter()
        losses = []
        for step in range(args.steps):
            ids = train_b[order[step]]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if (step + 1) % 50 == 0 or step == 9:
                print(f"  {mode} step {step + 1}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                      f"({time.perf_counter() - t1:.0f}s)", flush=True)
        train_s = time.perf_counter() - t1
        after = {"ppl_A": ppl(model, eval_a), "ppl_B": ppl(model, eval_b)}
        results[mode] = {"init": init, "after": after, "train_seconds": round(train_s, 1),
                         "first_loss": losses[0], "last50_loss": sum(losses[-50:]) / min(50, len(losses)),
                         "energy_kept_mean": rep["energy_kept_mean"],
                         "trainable_parameters": sum(p.numel() for p in params)}
        print(f"{mode}: init max|Δlogit| {init_diff:.1e}; after "
              f"{args.steps} steps ppl A {after['ppl_A']:.3f} B {after['ppl_B']:.3f} ({train_s:.0f}s)", flush=True)
        del model, base, opt

    print(f"\noriginal model: ppl A (Python docs) {original['ppl_A']:.3f}, ppl B (licenses) {original['ppl_B']:.3f}")
    print("| init | max abs Δlogits at init | ppl A after | ppl B after | ΔA (forgetting) | ΔB (learning) | "
          "last-50 train loss |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        i, a = r["init"], r["after"]
        print(f"| {mode} | {i['max_abs_logit_diff']:.1e} | {a['ppl_A']:.3f} | {a['ppl_B']:.3f} | "
              f"{a['ppl_A'] - original['ppl_A']:+.3f} | {a['ppl_B'] - original['ppl_B']:+.3f} | "
              f"{r['last50_loss']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "original": original,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
