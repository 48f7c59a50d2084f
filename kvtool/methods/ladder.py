"""``ladder``: rewire chosen decoder layers to Ladder residual (weights unchanged) and write the checkpoint.

Output folder: ``config.json`` (a ``kvtool_ladder_<arch>`` config: the source fields + ``ladder_layers``), the
source weights as safetensors, the tokenizer, and ``kvtool.json`` (options, chosen layers, per-layer drift,
optional held-out perplexity before/after). ``AutoModelForCausalLM.from_pretrained(OUT)`` after ``import kvtool``
runs it; ``kvtool validate OUT`` runs it through the tensor-parallel path (world 1) with the fused Triton
add+RMSNorm kernel and compares with the HF model. Math: :mod:`kvtool.convert.ladder`; drift pass:
:mod:`kvtool.calib.drift`; runtime: :mod:`kvtool.runtime.ladder`, :mod:`kvtool.runtime.tp`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError
from kvtool.methods.base import Method, RunContext, cached_decode_report, merge_decode_report, output_dtype
from kvtool.options import LAYERS_HELP, Options, option


@dataclasses.dataclass
class LadderOptions(Options):
    """Options of ``kvtool ladder`` (CLI flags and recipe keys)."""

    layers: str = option("auto", LAYERS_HELP + " Or 'auto' with --count K: the K layers whose rewiring moves the "
                                               "layer output least on calibration text.")
    count: int | None = option(None, "With --layers auto: how many layers to rewire.", low=0)
    drift: bool = option(True, "Measure per-layer drift even when the layers are given explicitly (always on for "
                               "auto).")
    eval_tokens: int = option(0, "Also report held-out perplexity of the source and the ladder model on this many "
                                 "tokens of the held-out part of --dataset (0 = skip).", low=0)
    eval_seq_len: int = option(512, "Window length of that evaluation.", low=2)
    heal_steps: int = option(0, "Then heal the output (kvtool heal with its defaults): Adam steps per layer; 0 = "
                                "off.", low=0)


class Ladder(Method):
    name = "ladder"
    Options = LadderOptions
    help = """Rewire decoder layers to Ladder residual (each attention/MLP reads the stream one module earlier).

    Weights are unchanged; the config lists the ladder layers. Under tensor parallelism a ladder module's
    all-reduce overlaps the next module (see bench/ladder_tp_speed.py).

    Examples:
      kvtool ladder smollm2-135m -o out/ladder --layers 15-
      kvtool ladder smollm2-135m -o out/ladder --layers auto --count 8 --eval-tokens 4096
    """
    data_defaults = {"samples": 16, "seq_len": 256, "batch_size": 4}

    def choice(self, opts: LadderOptions) -> Any:
        from kvtool.convert.ladder import parse_layers

        return parse_layers(opts.layers, opts.count)

    def visitors(self, opts: LadderOptions) -> dict[str, Any]:
        from kvtool.calib.drift import DriftVisitor

        return {"drift": DriftVisitor()} if opts.drift or self.choice(opts).mode == "auto" else {}

    def preflight(self, spec: Any, opts: LadderOptions) -> None:
        choice = self.choice(opts)
        if spec is not None and choice.mode != "auto":
            choice.resolve(spec.num_layers)

    def run(self, loaded: Any, store: Any, out: Path, opts: LadderOptions, ctx: RunContext) -> dict[str, Any]:
        from kvtool.calib.drift import layer_drift
        from kvtool.checkpoint import atomic_dir, provenance, save_model_checkpoint
        from kvtool.convert.ladder import check_ladder_supported, ladder_convert
        from kvtool.data import calibration_windows

        choice = self.choice(opts)
        check_ladder_supported(loaded.model)
        spec, data = loaded.spec, ctx.data
        if choice.mode != "auto":
            choice.resolve(spec.num_layers)  # range errors before the drift pass
        drift_rows, calib = None, None
        if opts.drift or choice.mode == "auto":
            if "drift" in ctx.visitors:  # rode the calibration pass
                drift_rows = ctx.visitors["drift"].rows
            else:
                windows = calibration_windows(loaded.tokenizer, data.source(), data.samples, data.seq_len, data.seed,
                                              spec.max_positions)
                drift_rows = layer_drift(loaded, windows, device=ctx.device, batch_size=data.batch_size,
                                         progress=ctx.progress)
            calib = {"dataset": data.source().describe(), "samples": data.samples, "seq_len": data.seq_len,
                     "seed": data.seed, "tokens": data.samples * data.seq_len}
        chosen = choice.resolve(spec.num_layers, drift_rows)
        lazy = getattr(loaded.model, "_kvtool_weights", None)  # layers streamed from disk: read the tensors there
        state = {k: lazy.get(k) for k in lazy._where} if lazy is not None else loaded.model.state_dict()
        if lazy is not None and opts.eval_tokens:
            raise KvtoolError("--eval-tokens needs the whole model in memory: load it without layer streaming")
        dtype = output_dtype(ctx.dtype, loaded)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        state, config, report = ladder_convert(state, loaded.model.config, chosen, drift_rows, choice)
        if opts.eval_tokens:
            report["perplexity"] = self._eval(loaded, chosen, opts, ctx)
        options = {**opts.to_dict(), "dtype": str(dtype).replace("torch.", "")}
        manifest = provenance(self.name, options, loaded.identity(), calib, report)
        with atomic_dir(out, ctx.overwrite, ctx.inputs) as tmp:
            save_model_checkpoint(tmp, state, config, manifest, loaded.tokenizer,
                                  getattr(loaded.model, "generation_config", None))
            if opts.heal_steps:
                from kvtool.methods.heal import heal_written

                report["healing"] = heal_written(tmp, loaded, opts.heal_steps, ctx)
        return report

    def _eval(self, loaded: Any, chosen: list[int], opts: LadderOptions, ctx: RunContext) -> dict[str, Any]:
        from kvtool.data import TextSource, heldout_tokens
        from kvtool.evaluate import perplexity
        from kvtool.runtime.ladder import install_ladder, remove_ladder

        d = ctx.data
        ids = heldout_tokens(loaded.tokenizer, TextSource(d.dataset, "heldout", d.text_field), opts.eval_tokens)
        before = perplexity(loaded.model, ids, opts.eval_seq_len, None, d.batch_size, progress=ctx.progress)
        install_ladder(loaded.model, chosen)
        try:
            after = perplexity(loaded.model, ids, opts.eval_seq_len, None, d.batch_size, progress=ctx.progress)
        finally:
            remove_ladder(loaded.model)
        return {"source": before["perplexity"], "ladder": after["perplexity"], "tokens_scored": after["tokens_scored"],
                "seq_len": after["seq_len"], "mode": after["mode"]}

    def summary(self, report: dict[str, Any], out: Path) -> tuple[str, list[str], list[list[str]], list[str]]:
        cols = ["layer", "ladder", "drift", "attn part", "mlp part", "layer update"]
        chosen = set(report["ladder_layers"])
        rows = []
        for row in report.get("drift") or [{"layer": i} for i in range(report["num_layers"])]:
            i = row["layer"]
            cells = [f"{row[k]:.4f}" if k in row else "-" for k in ("drift", "attn_drift", "mlp_drift", "update")]
            rows.append([str(i), "yes" if i in chosen else "", *cells])
        notes = [f"ladder layers ({len(report['ladder_layers'])}/{report['num_layers']}): {report['ladder_layers']}; "
                 f"all-reduces overlappable under TP: {report['overlappable_allreduces']}/{report['allreduces']}"]
        if "perplexity" in report:
            p = report["perplexity"]
            notes.append(f"held-out perplexity ({p['tokens_scored']} tokens, seq-len {p['seq_len']}): "
                         f"source {p['source']:.3f} -> ladder {p['ladder']:.3f}")
        if report.get("healing"):
            from kvtool.methods.heal import healing_note

            notes.append(healing_note(report["healing"]))
        return f"ladder -> {out}", cols, rows, notes

    def validate(self, out: Path, manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """Run the ladder checkpoint through the TP path (world 1) with the fused Triton add+RMSNorm and compare.

        Checks: (1) TP path with the Triton kernel vs the HF model's logits, (2) the same with the PyTorch add+norm
        (isolates the kernel), on 16 held-out tokens. Passes when both max errors are below 1e-4 of the logit
        scale (float32) and cached decode equals the full forward (``cached_decode_report``).
        """
        import torch

        from kvtool.data import TextSource, heldout_tokens
        from kvtool.models import load_model
        from kvtool.runtime.tp import TPDecoder

        device = options.get("device", "cpu")
        loaded = load_model(str(out), device=device)
        ids = heldout_tokens(loaded.tokenizer, TextSource(split="heldout"), 16)[None].to(device)
        with torch.no_grad():
            ref = loaded.model(ids).logits.float()
        n = ids.shape[1]
        errs = {}
        for fused in (True, False):
            tp = TPDecoder.from_hf(loaded.model, fused_norm=fused, max_len=n)
            tp.setup_cache(1, n)
            got = tp(ids, torch.arange(n, device=device)).float()
            errs[fused] = (got - ref).abs().max().item()
        scale = ref.abs().max().item()
        tol = 1e-4 * max(scale, 1.0)
        report = {"passed": errs[True] <= tol and errs[False] <= tol,
                  "ladder_layers": str(loaded.model.config.ladder_layers),
                  "tokens": n, "max_err_tp_triton_vs_hf": errs[True], "max_err_tp_torch_vs_hf": errs[False],
                  "logit_scale": scale, "tolerance": tol}
        return merge_decode_report(report, cached_decode_report(loaded.model, loaded.tokenizer, device))
