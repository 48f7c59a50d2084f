"""``heal``: layer-wise healing of a converted checkpoint against the model it was converted from.

For each decoder layer in turn, the original model's inputs to that layer and its outputs on the calibration
windows come from one layer-by-layer pass over the *source* model (:class:`kvtool.calib.teacher.TeacherVisitor`);
the converted layer's attention parameters (MLA: the latent down/up projections, the query and rope-key
projections, ``o_proj``, and the DeepSeek export's ``kv_a_layernorm``) are fitted so that the converted layer
reproduces the original layer's output (:func:`kvtool.convert.heal.fit_layer`). Optionally a short end-to-end
distillation to the original model's next-token distributions follows (``--e2e-steps``). Calibration text only;
``kvtool eval`` scores the held-out part. Works for kvtool-format MLA (both RoPE modes), the DeepSeek-V3 export,
which heals with its ``kv_a_layernorm`` in place, so the stock layout keeps quality, and Ladder-rewired models
(``kvtool ladder`` outputs: only the rewired layers are fitted, all their parameters, each fed the original model's
residual streams).

The output is the same format as the input (same config, tokenizer, ``kvtool.json`` with a ``healing`` section:
loss curves per layer, tokens, seconds) plus ``healing.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError
from kvtool.methods.base import Method, RunContext
from kvtool.options import LAYERS_HELP, Options, option, parse_layers

HEALABLE = ("convert-mla", "ladder")


@dataclasses.dataclass
class HealOptions(Options):
    """Options of ``kvtool heal`` (CLI flags and recipe keys)."""

    teacher: str | None = option(None, "The source model the checkpoint was converted from (its hash must match "
                                       "kvtool.json; in a recipe: the recipe's model).")
    steps: int = option(150, "Adam steps per layer.", positive=True)
    lr: float = option(1e-3, "Adam learning rate of the layer-wise fit.", positive=True)
    e2e_steps: int = option(0, "Then this many end-to-end distillation steps (KL to the teacher's logits).", low=0)
    e2e_lr: float = option(1e-4, "Adam learning rate of the end-to-end distillation.", positive=True)
    layers: str = option("all", LAYERS_HELP + " Layers to heal.")
    fit: str = option("auto", "What each fitted layer must reproduce: layer (the decoder layer's output), "
                              "attention (the attention block's output; skips the MLP, several times cheaper; MLA "
                              "outputs only), or auto (attention for convert-mla outputs, layer for ladder).",
                      choices=("auto", "layer", "attention"))


class Heal(Method):
    name = "heal"
    Options = HealOptions
    help = """Heal a converted checkpoint: fit each converted layer to reproduce the original layer's output.

    Examples:
      kvtool heal out/mla --teacher smollm2-135m -o out/mla-healed
      kvtool heal out/mla-ds --teacher smollm2-135m -o out/mla-ds-healed --steps 200 --e2e-steps 50
      kvtool heal out/ladder --teacher smollm2-135m -o out/ladder-healed
    """
    # 64 x 256 calibration windows: with 16 the DeepSeek export at KV ratio 0.5 healed to 1.32x and 100 e2e steps
    # over-fit them (1.38x); with 64, 1.23x and 1.14x (docs/benchmarks.md, "Healed MLA"); the step count is the same
    # heal on the evaluation suite's calibration parts (equal weights), so the healed model holds across domains
    data_defaults = {"dataset": "suite", "samples": 64, "seq_len": 256, "batch_size": 4}
    windows_defaults = {"samples": 64, "seq_len": 256, "batch_size": 4}  # --heal-steps: on the caller's text
    acts_on_output = True

    def preflight(self, spec: Any, opts: HealOptions) -> None:
        parse_layers(opts.layers, spec.num_layers if spec is not None else None)

    def check_source(self, folder: Path) -> dict[str, Any]:
        """The converted folder's kvtool.json (refused unless kvtool wrote it with a healable method)."""
        manifest_path = Path(folder) / "kvtool.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            raise KvtoolError(f"{folder} was not written by kvtool (no readable kvtool.json): heal a folder that "
                              "`kvtool convert-mla` or `kvtool ladder` wrote") from None
        if manifest.get("command") not in HEALABLE:
            raise KvtoolError(f"{folder} was written by `kvtool {manifest.get('command')}`, which heal does not "
                              f"handle: heal outputs of {', '.join(HEALABLE)}")
        return manifest

    def run(self, loaded: Any, store: Any, out: Path, opts: HealOptions, ctx: RunContext) -> dict[str, Any]:
        """``loaded`` is the converted checkpoint (``loaded.path`` its folder); the teacher is ``opts.teacher``."""
        from kvtool.checkpoint import atomic_dir
        from kvtool.models import load_model

        if opts.teacher is None:
            raise KvtoolError("heal needs the source model: pass --teacher MODEL (the model the checkpoint was "
                              "converted from)")
        if ctx.data.split != "calib":
            raise KvtoolError(f"heal fits on calibration text only (--split {ctx.data.split} would heal on text that "
                              "kvtool eval scores): drop --split or use --split calib")
        manifest = self.check_source(loaded.path)
        if manifest["command"] == "ladder" and opts.fit == "attention":
            raise KvtoolError("--fit attention is for convert-mla outputs: a ladder layer's MLP changes too, use --fit "
                              "layer")
        teacher = load_model(opts.teacher, dtype=ctx.dtype, device="cpu")
        want = (manifest.get("model") or {}).get("hash")
        if want != teacher.model_hash:
            raise KvtoolError(f"the teacher {opts.teacher} is not the model {loaded.path} was converted from (hash "
                              f"{teacher.model_hash[:19]}…, expected {str(want)[:19]}…): pass that model as --teacher")
        self.preflight(teacher.spec, opts)
        with atomic_dir(out, ctx.overwrite, (*ctx.inputs, loaded.path)) as tmp:
            return heal_checkpoint(loaded, teacher, manifest, opts, ctx, tmp)

    def summary(self, report: dict[str, Any], out: Path) -> tuple[str, list[str], list[list[str]], list[str]]:
        rows = [[str(r["layer"]), f"{r['loss_before']:.4f}", f"{r['loss_after']:.4f}"] for r in report["layers"]]
        notes = [f"{report['tokens']} calibration tokens, {report['seconds']:.0f} s; loss curves in {out}/kvtool.json "
                 f"and {out}/healing.png"]
        if report.get("e2e"):
            notes.append(f"end-to-end KL {report['e2e']['kl_before']:.4f} -> {report['e2e']['kl_after']:.4f}")
        return f"heal -> {out}", ["layer", "rel. error before", "after"], rows, notes


def heal_checkpoint(student: Any, teacher: Any, manifest: dict[str, Any], opts: HealOptions, ctx: RunContext,
                    dest: Path) -> dict[str, Any]:
    """Heal ``student`` (a loaded kvtool output, ``manifest`` its kvtool.json) against ``teacher`` (the loaded source)
    on the calibration windows of ``ctx.data`` (recorded: a mixture's parts with weights, origins, digests) and write
    the healed checkpoint into ``dest`` (the caller's atomic output folder): same format, kvtool.json with a
    ``healing`` section, ``healing.png``. Returns the report."""
    from kvtool.checkpoint import save_model_checkpoint
    from kvtool.data import calibration_windows, describe_parts

    data = ctx.data
    windows = calibration_windows(teacher.tokenizer, data.source(), data.samples, data.seq_len, data.seed,
                                  teacher.spec.max_positions)
    t0 = time.perf_counter()
    report = heal_model(student.model, teacher, windows, opts, device=ctx.device, batch_size=data.batch_size,
                        progress=ctx.progress, ladder=manifest["command"] == "ladder")
    report.update(seconds=round(time.perf_counter() - t0, 1), tokens=int(windows.numel()),
                  data={**data.source().describe(), "samples": data.samples, "seq_len": data.seq_len,
                        "seed": data.seed, "parts": describe_parts(data.source())}, options=opts.to_dict())
    manifest = {k: v for k, v in manifest.items() if k != "checksums"}
    manifest["healing"] = report
    config = json.loads((Path(student.path) / "config.json").read_text())
    state = {k: v.detach().cpu() for k, v in student.model.state_dict().items()}
    for old in Path(dest).glob("*.safetensors*"):  # healing in place (--heal-steps): new files, not overwrites
        old.unlink()
    save_model_checkpoint(dest, state, config, manifest, student.tokenizer,
                          getattr(student.model, "generation_config", None))
    plot_losses(report, dest / "healing.png")
    return report


def healing_note(report: dict[str, Any]) -> str:
    """One summary line about a healing report (for the verbs with ``--heal-steps``)."""
    rows = report["layers"]
    before = sum(r["loss_before"] for r in rows) / len(rows)
    after = sum(r["loss_after"] for r in rows) / len(rows)
    return (f"healed {len(rows)} layers x {report['steps_per_layer']} steps on {report['tokens']} calibration tokens "
            f"in {report['seconds']:.0f} s: mean relative error {before:.4f} -> {after:.4f} (healing.png)")


def heal_written(folder: Path, teacher: Any, steps: int, ctx: RunContext) -> dict[str, Any]:
    """The ``--heal-steps`` option of convert-mla and ladder: heal the checkpoint just written into ``folder`` (inside
    the caller's atomic output) against the loaded source ``teacher`` with heal's defaults, ``steps`` Adam steps per
    layer, on heal's default windows of the same text; rewrites ``folder``. Returns the healing report."""
    from kvtool.models import load_model

    manifest = json.loads((Path(folder) / "kvtool.json").read_text())
    student = load_model(str(folder), strict=False)
    opts = HealOptions(teacher=teacher.source, steps=steps)
    data = dataclasses.replace(ctx.data, **Heal.windows_defaults)
    return heal_checkpoint(student, teacher, manifest, opts, dataclasses.replace(ctx, data=data), folder)


def heal_model(student: Any, teacher: Any, windows: Any, opts: HealOptions, *, device: str = "cpu",
               batch_size: int = 4, progress: bool = False, ladder: bool = False) -> dict[str, Any]:
    """Fit ``student`` (a converted model in memory) layer by layer to ``teacher`` (a LoadedModel) on ``windows``,
    then optionally distill end to end; returns the report (loss curves per layer).

    MLA (convert-mla outputs): every chosen layer's attention parameters are fitted. Ladder (``ladder=True``): only
    the rewired layers are fitted, all their parameters (attention, MLP and norms: the attention now reads the
    stream before the previous MLP, the MLP the stream before this attention), with the original model's streams
    as inputs (:class:`~kvtool.calib.teacher.TeacherVisitor` with ``streams=True``).
    """
    import torch

    from kvtool.calib.runner import run_layers
    from kvtool.calib.teacher import TeacherVisitor
    from kvtool.convert.heal import distill, fit_layer, relative_error
    from kvtool.runtime.ladder import ladder_layer_step, ladder_layers_of

    chosen = parse_layers(opts.layers, teacher.spec.num_layers)
    chosen = set(range(teacher.spec.num_layers)) if chosen is None else set(chosen)
    if ladder and opts.fit == "attention":
        raise KvtoolError("--fit attention is for convert-mla outputs: a ladder layer's MLP changes too, use --fit "
                          "layer")
    fit = opts.fit if opts.fit != "auto" else ("layer" if ladder else "attention")
    if ladder:
        chosen &= set(ladder_layers_of(student))
        if not chosen:
            raise KvtoolError(f"none of the layers chosen by --layers {opts.layers} is a ladder layer "
                              f"({ladder_layers_of(student)}): heal the rewired layers")
    student.eval()
    rotary = student.model.rotary_emb.to(device)
    rows: list[dict[str, Any]] = []

    def on_layer(index: int, batches: list) -> None:
        layer = student.model.layers[index].to(device)
        fitted = []
        for x, y, kw, stale in batches:
            positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
            kw = {**kw, "position_ids": positions, "position_embeddings": rotary(x, positions)}
            fitted.append((x, y, {**kw, "stale": stale} if ladder else kw))
        if ladder:
            params = list(layer.parameters())

            def forward(x: Any, kw: dict[str, Any]) -> Any:
                rest = {k: v for k, v in kw.items() if k != "stale"}
                return ladder_layer_step(layer, x, kw["stale"], True, rest)[0]
        elif fit == "attention":
            params = list(layer.self_attn.parameters())

            def forward(x: Any, kw: dict[str, Any]) -> Any:
                return layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0]
        else:
            params = list(layer.self_attn.parameters())

            def forward(x: Any, kw: dict[str, Any]) -> Any:
                return layer(x, **kw)
        losses = fit_layer(layer, fitted, params, steps=opts.steps, lr=opts.lr, seed=index, forward=forward)
        with torch.no_grad():
            outs = [forward(x, kw) for x, _, kw in fitted]
            after = [float(relative_error(o[0] if isinstance(o, tuple) else o, y))
                     for o, (_, y, _) in zip(outs, fitted, strict=True)]
        layer.to("cpu")
        rows.append({"layer": index, "loss_before": losses[0], "loss_after": sum(after) / len(after),
                     "curve": [round(v, 6) for v in losses]})

    visitor = TeacherVisitor(on_layer, chosen, streams=ladder, target=fit)
    run_layers(teacher, windows, [visitor], device=device,
               batch_size=batch_size, progress=progress, description="healing layers",
               num_layers=max(chosen) + 1)
    trained = "ladder layers (all parameters)" if ladder else "self_attn (all)"
    report: dict[str, Any] = {"layers": rows, "parameters": trained, "steps_per_layer": opts.steps,
                              "fit": f"relative error of the {fit} output"}
    if opts.e2e_steps:
        student.to(device)
        teacher.model.to(device)
        params = [p for i in sorted(chosen) for p in (student.model.layers[i] if ladder else
                                                      student.model.layers[i].self_attn).parameters()]
        chunks = [w.to(device) for w in windows.split(batch_size)]
        curve = distill(student, lambda ids: teacher.model(input_ids=ids, use_cache=False).logits, chunks, params,
                        steps=opts.e2e_steps, lr=opts.e2e_lr)
        report["e2e"] = {"steps": opts.e2e_steps, "kl_before": curve[0], "kl_after": curve[-1],
                         "curve": [round(v, 6) for v in curve]}
        student.to("cpu")
        teacher.model.to("cpu")
    return report


def plot_losses(report: dict[str, Any], path: Path) -> None:
    """Loss curves of every healed layer (and the end-to-end KL) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report.get("e2e") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    cmap = plt.get_cmap("viridis")
    n = max(len(report["layers"]), 1)
    for i, row in enumerate(report["layers"]):
        ax.plot(row["curve"], color=cmap(i / n), linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative output error")
    ax.set_title("layer-wise healing (colour: layer, dark = first)")
    if panels == 2:
        axes[0][1].plot(report["e2e"]["curve"])
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("KL(teacher || student) per token")
        axes[0][1].set_title("end-to-end distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
