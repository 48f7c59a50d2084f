"""Ladder residual: choose decoder layers to rewire, measure what each rewiring moves, write the ladder config.

The recurrence (Zhang et al., ICML 2025; see :mod:`kvtool.modeling.ladder`): a ladder module reads the residual
stream one module earlier, ``x_{j+1} = x_j + f_j(x_{j-1})``, so its tensor-parallel all-reduce can overlap the next
module. The weights are not changed; only the wiring of the chosen layers is.

Layer choice (``--layers``)
    ``START:END``  a Python slice over the decoder layers (``16:``, ``-8:``, ``4:12``);
    ``K``          the top K layers (the paper converts the upper part of Llama-3.1-8B);
    ``P%``         the top P percent of the layers (rounded to the nearest layer);
    ``a,b,c``      explicit indices;
    ``auto``       with ``count=K``: the K layers whose individual rewiring moves the layer output least on
                   calibration text (below).

Per-layer drift (one layer-sequential pass over calibration windows, the *original* model's activations):
for layer ``i`` with input ``h = x_{2i}`` and ``s = x_{2i-1}`` (the stream after layer ``i-1``'s attention;
``s = h`` for layer 0), the source layer gives ``out = h + A(h) + M(h + A(h))`` and the ladder layer gives
``out' = h + A(s) + M(h)``. ``drift_i = sqrt(mean_t ‖out'_t - out_t‖² / ‖out_t‖²)`` over all calibration tokens t
(per-token normalization, so the few tokens with very large residual norms do not hide the rest), computed in
float64. The attention and MLP parts (``‖A(s) - A(h)‖`` and ``‖M(h) - M(h + A(h))‖``, same normalization) are
reported too. Drift is a one-layer-at-a-time proxy: rewiring several layers compounds, which the quality
benchmark (``bench/ladder_quality.py``) measures end to end.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kvtool.errors import KvtoolError

REQUIRED_STATS: tuple[str, ...] = ()  # ladder needs no second-moment statistics; auto runs its own drift pass
_NEEDED = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@dataclass
class LayerChoice:
    """A parsed ``--layers`` value; ``resolve(num_layers)`` turns it into layer indices."""

    text: str
    mode: str  # range | count | percent | list | auto
    start: int | None = None
    end: int | None = None
    count: int | None = None
    percent: float | None = None
    indices: tuple[int, ...] = ()

    def resolve(self, num_layers: int, drift: list[dict[str, Any]] | None = None) -> list[int]:
        """The ladder layer indices for a model with ``num_layers`` decoder layers (clear errors when out of range)."""
        top = f"the model has layers 0..{num_layers - 1}"
        if self.mode == "range":
            for bound in (self.start, self.end):
                if bound is not None and not -num_layers <= bound <= num_layers:
                    raise KvtoolError(f"--layers {self.text}: index {bound} is out of range ({top}); "
                                      f"use e.g. --layers {num_layers // 2}:")
            layers = list(range(num_layers))[slice(self.start, self.end)]
            if not layers:
                raise KvtoolError(f"--layers {self.text} selects no layer ({top}): use START:END with START < END")
            return layers
        if self.mode in ("count", "auto") and self.count is not None and self.count > num_layers:
            raise KvtoolError(f"--layers {self.text}: {self.count} layers asked for but {top}: "
                              f"use a count of at most {num_layers}")
        if self.mode == "count":
            return list(range(num_layers - self.count, num_layers))
        if self.mode == "percent":
            k = int(math.floor(num_layers * self.percent / 100 + 0.5))
            return list(range(num_layers - k, num_layers))
        if self.mode == "list":
            bad = [i for i in self.indices if not 0 <= i < num_layers]
            if bad:
                raise KvtoolError(f"--layers {self.text}: layer(s) {bad} out of range ({top})")
            return sorted(set(self.indices))
        if drift is None:
            raise KvtoolError("--layers auto needs the per-layer drift (run with calibration text)")
        return choose_least_drift(drift, self.count)


def parse_layers(text: str, count: int | None = None) -> LayerChoice:
    """Parse ``--layers`` (and ``--count`` for ``auto``) without the model; syntax errors raise KvtoolError."""
    raw = text.strip()
    hint = "use START:END (e.g. 16: or -8:), a count K from the top, P%, a list a,b,c, or auto --count K"
    if count is not None and raw != "auto":
        raise KvtoolError(f"--count applies only to --layers auto (got --layers {text}): drop --count")
    if raw == "auto":
        if count is None or count < 0:
            raise KvtoolError("--layers auto needs --count K (K >= 0): how many layers to rewire")
        return LayerChoice(text, "auto", count=count)
    if ":" in raw:
        m = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", raw)
        if not m:
            raise KvtoolError(f"--layers {text} is not a valid range: {hint}")
        start = int(m.group(1)) if m.group(1) else None
        end = int(m.group(2)) if m.group(2) else None
        return LayerChoice(text, "range", start=start, end=end)
    if raw.endswith("%"):
        try:
            pct = float(raw[:-1])
        except ValueError:
            raise KvtoolError(f"--layers {text} is not a valid percentage: {hint}") from None
        if not 0 <= pct <= 100:
            raise KvtoolError(f"--layers {text}: a percentage must be in 0..100")
        return LayerChoice(text, "percent", percent=pct)
    if "," in raw:
        try:
            idx = tuple(int(p) for p in raw.split(",") if p.strip())
        except ValueError:
            raise KvtoolError(f"--layers {text} is not a list of layer indices: {hint}") from None
        return LayerChoice(text, "list", indices=idx)
    try:
        k = int(raw)
    except ValueError:
        raise KvtoolError(f"--layers {text} not understood: {hint}") from None
    if k < 0:
        raise KvtoolError(f"--layers {text}: a count must be >= 0 (for the top layers use -K: as a range)")
    return LayerChoice(text, "count", count=k)


def check_ladder_supported(model: nn.Module) -> None:
    """Raise KvtoolError unless ``model`` is a plain Llama/Qwen2/Qwen3/Mistral causal LM with pre-norm blocks."""
    from kvtool.modeling.ladder import LADDER_PREFIX, SOURCES

    model_type = getattr(model.config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith(LADDER_PREFIX):
        raise KvtoolError(f"the model is already a ladder checkpoint ({model_type}): convert its source model")
    if model_type not in SOURCES:
        raise KvtoolError(f"ladder residual is not supported for architecture {model_type!r}: it needs a plain "
                          f"{'/'.join(SOURCES)} checkpoint (pre-norm layers with separate attention and MLP "
                          "residual adds)")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise KvtoolError("the model has no model.layers: ladder residual needs a decoder-only transformer")
    for i, layer in enumerate(layers):
        missing = [n for n in _NEEDED if not hasattr(layer, n)]
        if missing:
            raise KvtoolError(f"decoder layer {i} has no {', '.join(missing)}: ladder residual needs pre-norm "
                              "layers with separate attention and MLP residual adds")


def choose_least_drift(drift: list[dict[str, Any]], count: int) -> list[int]:
    """The ``count`` layers with the smallest drift (ties broken toward the higher layer), sorted."""
    order = sorted(drift, key=lambda d: (d["drift"], -d["layer"]))
    return sorted(d["layer"] for d in order[:count])


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token ‖diff‖² / ‖ref‖² in float64, flattened over (batch, position)."""
    d = diff.double().pow(2).sum(-1).flatten()
    r = ref.double().pow(2).sum(-1).flatten().clamp_min(1e-300)
    return d / r


@torch.no_grad()
def layer_drift(loaded: Any, windows: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 8,
                progress: bool = False) -> list[dict[str, Any]]:
    """Per-layer drift of rewiring each layer alone, in one layer-sequential pass (see the module docstring).

    Returns one dict per layer: ``layer``, ``drift`` (relative change of the layer output), ``attn_drift``,
    ``mlp_drift`` (the parts from the stale attention / MLP input), ``update`` (‖out - h‖ / ‖out‖, the size of
    the layer's own contribution, for scale).
    """
    from kvtool.calib.collect import _batches, _device_of, _layer_inputs
    from kvtool.models import LayerStreamer
    from kvtool.progress import progress_bar

    model, spec = loaded.model, loaded.spec
    check_ladder_supported(model)
    device = torch.device(device)
    pre = [model.model.embed_tokens, model.model.rotary_emb]
    homes = [_device_of(m) for m in pre]
    for m in pre:
        m.to(device)
    hidden: list[torch.Tensor] = []
    kwargs_by_size: dict[int, dict] = {}
    try:
        for batch in _batches(windows, batch_size):
            h, kw = _layer_inputs(model, spec, batch.to(device))
            hidden.append(h)
            kwargs_by_size.setdefault(batch.shape[0], kw)
    finally:
        for m, home in zip(pre, homes, strict=True):
            m.to(home)
    stale = list(hidden)  # x_{-1} := x_0
    streamer = LayerStreamer(loaded, device)
    report: list[dict[str, Any]] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("ladder drift", total=spec.num_layers)
        for i in range(spec.num_layers):
            layer = streamer.acquire(i)
            sums = {"drift": [], "attn_drift": [], "mlp_drift": [], "update": []}
            try:
                for b, (h, s) in enumerate(zip(hidden, stale, strict=True)):
                    kw = kwargs_by_size[h.shape[0]]
                    a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)
                    mid = h + a
                    m = layer.mlp(layer.post_attention_layernorm(mid))
                    out = mid + m
                    a2, _ = layer.self_attn(hidden_states=layer.input_layernorm(s), **kw)
                    m2 = layer.mlp(layer.post_attention_layernorm(h))
                    out2 = h + a2 + m2
                    sums["drift"].append(_rel(out2 - out, out))
                    sums["attn_drift"].append(_rel(a2 - a, out))
                    sums["mlp_drift"].append(_rel(m2 - m, out))
                    sums["update"].append(_rel(out - h, out))
                    hidden[b], stale[b] = out, mid
            finally:
                streamer.release(i)
            row = {"layer": i}
            for key, parts in sums.items():
                row[key] = math.sqrt(torch.cat(parts).mean().item())
            report.append(row)
            bar.advance(task)
    return report


def ladder_convert(state: dict[str, torch.Tensor], config: Any, ladder_layers: list[int],
                   drift: list[dict[str, Any]] | None = None,
                   choice: LayerChoice | None = None) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """The transform: (weights, per-layer drift, options) -> (weights, ladder config, report).

    The weights pass through unchanged; the returned config is the source config plus ``ladder_layers``
    (a ``kvtool_ladder_<arch>`` config that kvtool's registered model class runs).
    """
    from kvtool.modeling.ladder import ladder_config

    num_layers = int(config.num_hidden_layers)
    bad = [i for i in ladder_layers if not 0 <= i < num_layers]
    if bad:
        raise KvtoolError(f"ladder layer(s) {bad} out of range: the model has layers 0..{num_layers - 1}")
    new_config = ladder_config(config, ladder_layers)
    layers = new_config.ladder_layers
    modules = [j for i in range(num_layers) for j in (2 * i, 2 * i + 1)]
    ladder_modules = {2 * i for i in layers} | {2 * i + 1 for i in layers}
    # module j's all-reduce can be waited one module later iff module j+1 is a ladder module
    overlapped = sum(1 for j in modules if j + 1 in ladder_modules)
    report: dict[str, Any] = {
        "ladder_layers": layers,
        "num_layers": num_layers,
        "fraction": len(layers) / num_layers,
        "selection": asdict(choice) if choice is not None else None,
        "overlappable_allreduces": overlapped,
        "allreduces": 2 * num_layers,
        "weights_changed": False,
    }
    if drift is not None:
        report["drift"] = drift
        chosen = [d["drift"] for d in drift if d["layer"] in layers]
        report["drift_chosen_sum"] = float(sum(chosen))
        report["drift_chosen_max"] = float(max(chosen)) if chosen else 0.0
    return state, new_config, report
