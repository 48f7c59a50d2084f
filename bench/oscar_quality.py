"""Held-out perplexity of the embedded model with a 2-bit KV cache: FP32, INT2, Hadamard-INT2, KIVI-INT2 and the OSCAR
variants (kvtool's cov-hadamard + clip search, OSCAR as released: U·H·P_br + quantile clip, and the two crossed), at
the same bits and full-precision windows, for short and long windows.

    .venv/bin/python bench/oscar_quality.py --max-tokens 4096 --settings 256:0:0,1024:0:0,1024:64:256 \
        --json out/oscar_quality.json

A setting is SEQ_LEN:SINK:RECENT (perplexity windows of SEQ_LEN tokens; SINK first and RECENT most recent tokens of
each query kept in full precision). Every method is emulated as decode would see it (kvtool.runtime.kvquant: each
key/value outside the sink/recent window of a query is read dequantized, scales and zeros in fp16). Statistics and
calibration K/V come from the embedded *calibration* text; perplexity from the embedded *held-out* text.
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
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (512 tokens) for q/k/v statistics")
    ap.add_argument("--kv-samples", type=int, default=4, help="calibration windows (512 tokens) of K/V samples")
    ap.add_argument("--group-size", type=int, default=None, help="default: head_dim")
    ap.add_argument("--settings", default="256:0:0,1024:0:0,1024:64:256", help="comma-separated SEQ_LEN:SINK:RECENT")
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
    settings = [tuple(int(x) for x in w.split(":")) for w in args.settings.split(",")]
    store = statistics_for(loaded, ("q", "k", "v"), None, DataOptions(samples=args.samples, seq_len=512))
    calib = calibration_windows(loaded.tokenizer, TextSource("embedded"), args.kv_samples, 512, 1, spec.max_positions)
    kv = collect_kv_samples(loaded.model, calib, sink=4)
    w_o = {i: layer.self_attn.o_proj.weight.detach() for i, layer in enumerate(spec.layers(loaded.model))}
    t_calib = time.perf_counter() - t0

    def oscar_spec(rotation: str, clip: str) -> tuple[KVQuantSpec, dict]:
        t = time.perf_counter()
        opts = OscarOptions(group_size=gs, rotation=rotation, clip=clip)
        tensors, report = oscar_transform(w_o, store, kv, spec, opts)
        quantile = clip == "quantile"
        out = KVQuantSpec(method=f"oscar[{rotation}, clip {clip}]", bits=2, group_size=gs,
                          k_quantile=opts.k_quantile if quantile else None,
                          v_quantile=opts.v_quantile if quantile else None)
        for i in range(spec.num_layers):
            for name in ("k_rotation", "v_rotation", "k_clip", "v_clip"):
                getattr(out, name)[i] = tensors[f"layers.{i}.{name}"]
        return out, {"transform_seconds": round(time.perf_counter() - t, 1),
                     "mean_k_rel_error": report["mean_k_rel_error"],
                     "mean_v_rel_error": report["mean_v_rel_error"]}

    variants = {f"oscar-int2 [{rot}, clip {clip}]": oscar_spec(rot, clip)
                for rot, clip in (("cov-hadamard", "search"), ("released", "quantile"), ("released", "search"),
                                  ("cov-hadamard", "quantile"))}
    for name, (_, info) in variants.items():
        print(f"{name}: K err {info['mean_k_rel_error']:.4f} V err {info['mean_v_rel_error']:.4f} "
              f"({info['transform_seconds']} s)", flush=True)

    tokens = heldout_tokens(loaded.tokenizer, TextSource("embedded", "heldout"), args.max_tokens)
    kw = dict(head_dim=d, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, group_size=gs)
    rows = []

    def run(name: str, seq_len: int, sink: int, recent: int, qspec: KVQuantSpec | None,
            extra: dict | None = None) -> None:
        t = time.perf_counter()
        if qspec is not None:
            qspec.sink, qspec.residual_window = sink, recent
        r = perplexity_with_kv_quant(loaded, tokens, qspec, seq_len=seq_len)
        rows.append({"method": name, "seq_len": seq_len, "sink": sink, "recent": recent,
                     "perplexity": r["perplexity"], "nll": r["nll"], "tokens_scored": r["tokens_scored"],
                     "kv_bits": r.get("kv_bits_per_element", 32.0), "seconds": round(time.perf_counter() - t, 1),
                     **(extra or {})})
        print(f"{name:<44} seq={seq_len:<5} sink={sink:<3} recent={recent:<4} ppl={r['perplexity']:.3f} "
              f"({rows[-1]['seconds']} s)", flush=True)

    fp = {}
    for seq_len in sorted({s for s, _, _ in settings}):
        run("fp32", seq_len, 0, 0, None)
        fp[seq_len] = rows[-1]["perplexity"]
    for seq_len, sink, recent in settings:
        run("int2 per-token", seq_len, sink, recent, resolve_kv_quant("int2", **kw))
        run("hadamard-int2", seq_len, sink, recent, resolve_kv_quant("hadamard-int2", **kw))
        run("kivi-int2", seq_len, sink, recent, resolve_kv_quant("kivi-int2", **kw))
        for name, (qspec, info) in variants.items():
            run(name, seq_len, sink, recent, qspec, info)

    print(f"\nheld-out perplexity, {args.max_tokens} tokens, group size {gs}, calibration {t_calib:.0f} s, "
          f"total {time.perf_counter() - t0:.0f} s")
    print("| method | seq len | sink | recent | KV bits/elem | perplexity | vs FP32 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seq_len']} | {r['sink']} | {r['recent']} | {r['kv_bits']:.2f} | "
              f"{r['perplexity']:.3f} | {r['perplexity'] / fp[r['seq_len']]:.3f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "variants": {k: v[1] for k, v in variants.items()}}, indent=2))


if __name__ == "__main__":
    main()
