"""Held-out perplexity of the embedded model with a quantized KV cache: FP32, INT4, INT2, Hadamard-INT2, KIVI-INT2,
OSCAR-INT2 (and OSCAR ablations), same group size and full-precision windows for every method.

    .venv/bin/python bench/oscar_quality.py --max-tokens 4096 --windows 0:0,4:64 --json out/oscar_quality.json

Every method is emulated as decode would see it (kvtool.runtime.kvquant: each key/value outside the sink/recent
window of a query is read dequantized). Statistics and calibration K/V come from the embedded *calibration* text;
perplexity from the embedded *held-out* text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens to score")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8, help="calibration windows for the q/k/v statistics")
    ap.add_argument("--kv-samples", type=int, default=4, help="calibration windows for the clip search")
    ap.add_argument("--group-size", type=int, default=None, help="default: head_dim")
    ap.add_argument("--windows", default="0:0,4:64", help="comma-separated SINK:RECENT full-precision windows")
    ap.add_argument("--ablations", action="store_true", help="also OSCAR rotation/clip ablations (first window)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from kvtool.calib.kv_samples import collect_kv_samples
    from kvtool.convert.oscar import OscarOptions, oscar_transform
    from kvtool.data import TextSource, calibration_windows, heldout_tokens
    from kvtool.methods import statistics_for
    from kvtool.models import load_model
    from kvtool.options import DataOptions
    from kvtool.runtime.kvquant import KVQuantSpec, perplexity_with_kv_quant, resolve_kv_quant

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    spec = loaded.spec
    d = spec.head_dim
    gs = args.group_size or d
    windows = [tuple(int(x) for x in w.split(":")) for w in args.windows.split(",")]
    store = statistics_for(loaded, ("q", "k", "v"), None, DataOptions(samples=args.samples, seq_len=args.seq_len))
    calib = calibration_windows(loaded.tokenizer, TextSource("embedded"), args.kv_samples, args.seq_len, 1,
                                spec.max_positions)
    kv = collect_kv_samples(loaded.model, calib, sink=max(s for s, _ in windows))
    w_o = {i: layer.self_attn.o_proj.weight.detach() for i, layer in enumerate(spec.layers(loaded.model))}
    t_calib = time.perf_counter() - t0

    def oscar_spec(rotation: str, clip: bool) -> tuple[KVQuantSpec, dict]:
        t = time.perf_counter()
        opts = OscarOptions(group_size=gs, rotation=rotation, clip=clip)
        tensors, report = oscar_transform(w_o, store, kv, spec, opts)
        out = KVQuantSpec(method=f"oscar[{rotation}{'' if clip else ',no-clip'}]", bits=2, group_size=gs)
        for i in range(spec.num_layers):
            out.k_rotation[i] = tensors[f"layers.{i}.k_rotation"]
            out.v_rotation[i] = tensors[f"layers.{i}.v_rotation"]
            out.k_clip[i] = tensors[f"layers.{i}.k_clip"]
            out.v_clip[i] = tensors[f"layers.{i}.v_clip"]
        return out, {"transform_seconds": round(time.perf_counter() - t, 1),
                     "mean_k_rel_error": report["mean_k_rel_error"],
                     "mean_v_rel_error": report["mean_v_rel_error"]}

    oscar, oscar_info = oscar_spec("cov-hadamard", True)
    ablations = {}
    if args.ablations:
        for rot, clip in (("none", True), ("hadamard", True), ("cov", True), ("cov-hadamard", False)):
            ablations[f"oscar-int2 [{rot}{', clip' if clip else ', no clip'}]"] = oscar_spec(rot, clip)

    tokens = heldout_tokens(loaded.tokenizer, TextSource("embedded", "heldout"), args.max_tokens)
    kw = dict(head_dim=d, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, group_size=gs)
    rows = []

    def run(name: str, sink: int, recent: int, qspec: KVQuantSpec | None, extra: dict | None = None) -> None:
        t = time.perf_counter()
        if qspec is not None:
            qspec.sink, qspec.residual_window = sink, recent
        r = perplexity_with_kv_quant(loaded, tokens, qspec, seq_len=args.seq_len)
        rows.append({"method": name, "sink": sink, "recent": recent, "perplexity": r["perplexity"], "nll": r["nll"],
                     "tokens_scored": r["tokens_scored"], "kv_bits": r.get("kv_bits_per_element", 32.0),
                     "seconds": round(time.perf_counter() - t, 1), **(extra or {})})
        print(f"{name:<40} sink={sink:<3} recent={recent:<4} ppl={r['perplexity']:.3f}", flush=True)

    run("fp32", 0, 0, None)
    for sink, recent in windows:
        run("int4 per-token", sink, recent, resolve_kv_quant("int4", **kw))
        run("int2 per-token", sink, recent, resolve_kv_quant("int2", **kw))
        run("hadamard-int2", sink, recent, resolve_kv_quant("hadamard-int2", **kw))
        run("kivi-int2", sink, recent, resolve_kv_quant("kivi-int2", **kw))
        run("oscar-int2", sink, recent, oscar, oscar_info)
    for name, (qspec, info) in ablations.items():
        run(name, *windows[0], qspec, info)

    fp = rows[0]["perplexity"]
    print(f"\nheld-out perplexity, {rows[0]['tokens_scored']} tokens, seq-len {args.seq_len}, group size {gs}, "
          f"calibration {t_calib:.0f} s, total {time.perf_counter() - t0:.0f} s")
    print("| method | sink | recent | KV bits/elem | perplexity | vs FP32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['sink']} | {r['recent']} | {r['kv_bits']:.2f} | {r['perplexity']:.3f} | "
              f"{100 * (r['perplexity'] / fp - 1):+.1f}% |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "oscar": oscar_info}, indent=2))


if __name__ == "__main__":
    main()
