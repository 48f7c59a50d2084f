"""Ladder residual: choose decoder layers to rewire, measure what each rewiring moves, write the ladder config.

The recurrence (Zhang et al., ICML 2025; see :mod:`kvtool.runtime.ladder`): a ladder module reads the residual
stream one module earlier, ``x_{j+1} = x_j + f_j(x_{j-1})``, so its tensor-parallel all-reduce can overlap the next
module. The weights are not changed; only the wiring of the chosen layers is.

Layer choice (``--layers``): kvtool's one layer grammar (``0-7,12``, ``16-`` = layer 16 to the top, ``50%`` = the
top half; the paper converts the upper part of Llama-3.1-8B), ``none``, or ``auto`` with ``count=K``: the K layers
whose individual rewiring moves the layer output least on calibration text, by the per-layer drift of
:mod:`kvtool.calib.drift` (a one-layer-at-a-time proxy: rewiring several layers compounds, which the quality
benchmark ``bench/ladder_quality.py`` measures end to end).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kvtool.errors import KvtoolError
from kvtool.options import parse_layers as parse_layer_list

REQUIRED_STATS: tuple[str, ...] = ()  # ladder needs no second-moment statistics; auto runs its own drift pass
_NEEDED = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@dataclass
class LayerChoice:
    """A parsed ``--layers`` value; ``resolve(num_layers)`` turns it into layer indices."""

    text: str
    mode: str  # layers | none | auto
    count: int | None = None

    def resolve(self, num_layers: int, drift: list[dict[str, Any]] | None = None) -> list[int]:
        """The ladder layer indices for a model with ``num_layers`` decoder layers (clear errors when out of range)."""
        if self.mode == "none":
            return []
        if self.mode == "layers":
            layers = parse_layer_list(self.text, num_layers)
            return list(range(num_layers)) if layers is None else layers
        if self.count is not None and self.count > num_layers:
            raise KvtoolError(f"--layers auto --count {self.count}: the model has only {num_layers} layers: "
                              f"use a count of at most {num_layers}")
        if drift is None:
            raise KvtoolError("--layers auto needs the per-layer drift (run with calibration text)")
        return choose_least_drift(drift, self.count)


def parse_layers(text: str, count: int | None = None) -> LayerChoice:
    """Parse ``--layers`` (kvtool's one layer grammar, plus ``none`` and ``auto`` with ``--count``) without the
    model; syntax errors raise KvtoolError."""
    raw = str(text).strip()
    if count is not None and raw != "auto":
        raise KvtoolError(f"--count applies only to --layers auto (got --layers {text}): drop --count")
    if raw == "none":
        return LayerChoice(text, "none")
    if raw == "auto":
        if count is None:
            raise KvtoolError("--layers auto needs --count K (K >= 0): how many layers to rewire")
        return LayerChoice(text, "auto", count=count)
    parse_layer_list(raw)  # syntax
    return LayerChoice(text, "layers")


def check_ladder_supported(model: nn.Module) -> None:
    """Raise KvtoolError unless ``model`` is a plain Llama/Qwen2/Qwen3/Mistral causal LM with pre-norm blocks."""
    from kvtool.runtime.ladder import LADDER_PREFIX, SOURCES

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


def ladder_convert(state: dict[str, torch.Tensor], config: Any, ladder_layers: list[int],
                   drift: list[dict[str, Any]] | None = None,
                   choice: LayerChoice | None = None) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """The transform: (weights, per-layer drift, options) -> (weights, ladder config, report).

    The weights pass through unchanged; the returned config is the source config plus ``ladder_layers``
    (a ``kvtool_ladder_<arch>`` config that kvtool's registered model class runs).
    """
    from kvtool.runtime.ladder import ladder_config

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
