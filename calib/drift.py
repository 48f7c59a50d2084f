"""Ladder drift: what rewiring each decoder layer alone to Ladder residual moves, from one runner pass.

For layer ``i`` with input ``h = x_{2i}`` and ``s = x_{2i-1}`` (the stream after layer ``i-1``'s attention;
``s = h`` for layer 0), the source layer gives ``out = h + A(h) + M(h + A(h))`` and the ladder layer gives
``out' = h + A(s) + M(h)``. ``drift_i = sqrt(mean_t ‖out'_t - out_t‖² / ‖out_t‖²)`` over all calibration tokens t
(per-token normalization), in float64; the attention and MLP parts (``‖A(s) - A(h)‖`` and ``‖M(h) - M(h + A(h))‖``,
same normalization) and the layer's own update ``‖out - h‖`` are reported too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kvtool.calib.runner import LayerVisitor, run_layers
from kvtool.models import LoadedModel


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token ‖diff‖² / ‖ref‖² in float64, flattened over (batch, position)."""
    d = diff.double().pow(2).sum(-1).flatten()
    r = ref.double().pow(2).sum(-1).flatten().clamp_min(1e-300)
    return d / r


class DriftVisitor(LayerVisitor):
    """Measures each layer's ladder drift; keeps, per batch, the stream after the previous layer's attention."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.stale: list[torch.Tensor] = []
        self.b = 0
        self.parts: dict[str, list[torch.Tensor]] = {}

    def layer_start(self, index: int, layer: nn.Module) -> None:
        self.b = 0
        self.parts = {"drift": [], "attn_drift": [], "mlp_drift": [], "update": []}

    def batch(self, index: int, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor,
              layer_kwargs: dict[str, Any]) -> None:
        h = inputs
        s = self.stale[self.b] if index > 0 else h  # x_{-1} := x_0
        a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), **layer_kwargs)
        mid = h + a
        m = layer.mlp(layer.post_attention_layernorm(mid))
        out = mid + m
        a2, _ = layer.self_attn(hidden_states=layer.input_layernorm(s.to(h.device)), **layer_kwargs)
        m2 = layer.mlp(layer.post_attention_layernorm(h))
        out2 = h + a2 + m2
        self.parts["drift"].append(_rel(out2 - out, out))
        self.parts["attn_drift"].append(_rel(a2 - a, out))
        self.parts["mlp_drift"].append(_rel(m2 - m, out))
        self.parts["update"].append(_rel(out - h, out))
        if index == 0:
            self.stale.append(mid)
        else:
            self.stale[self.b] = mid
        self.b += 1

    def layer_end(self, index: int, layer: nn.Module) -> None:
        row: dict[str, Any] = {"layer": index}
        for key, parts in self.parts.items():
            row[key] = math.sqrt(torch.cat(parts).mean().item())
        self.rows.append(row)


def layer_drift(loaded: LoadedModel, windows: torch.Tensor, *, device: str | torch.device = "cpu",
                batch_size: int = 8, progress: bool = False) -> list[dict[str, Any]]:
    """Per-layer drift of rewiring each layer alone: one dict per layer with ``layer``, ``drift``, ``attn_drift``,
    ``mlp_drift``, ``update`` (see the module docstring)."""
    visitor = DriftVisitor()
    run_layers(loaded, windows, [visitor], device=device, batch_size=batch_size, progress=progress,
               description="ladder drift")
    return visitor.rows
