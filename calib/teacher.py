"""Teacher activations for healing: each layer's inputs and outputs in the original model, one layer at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvtool.calib.runner import LayerVisitor

# (inputs, outputs, layer kwargs, stream after the previous layer's attention or None) of one batch of windows
Batches = list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor | None]]


class TeacherVisitor(LayerVisitor):
    """Collects (inputs, outputs, layer kwargs, stale stream) of every batch of a layer, then hands them to
    ``on_layer(index, batches)`` (e.g. to fit the converted layer); memory: one layer's activations of all windows.

    With ``streams=True`` the fourth entry is the original model's residual stream after the *previous* layer's
    attention (``x_{2i-1}`` in Ladder-residual notation; layer 0: its inputs), which a Ladder layer's attention
    reads; otherwise it is None. With ``target="attention"`` the outputs are the original attention block's
    outputs (before the residual add) instead of the layer's.
    """

    def __init__(self, on_layer: Callable[[int, Batches], None], layers: set[int] | None = None,
                 streams: bool = False, target: str = "layer"):
        self.on_layer, self.layers, self.streams, self.target = on_layer, layers, streams, target
        self.batches: Batches = []
        self._previous: list[torch.Tensor] = []  # x_{2i-1} of each batch, from the layer before
        self._current: list[torch.Tensor] = []

    def layer_start(self, index: int, layer: nn.Module) -> None:
        self._current = []

    def batch(self, index: int, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor,
              layer_kwargs: dict[str, Any]) -> None:
        stale, attn = None, None
        wanted = self.layers is None or index in self.layers
        if self.streams or (wanted and self.target == "attention"):
            attn = layer.self_attn(hidden_states=layer.input_layernorm(inputs), **layer_kwargs)[0]
        if self.streams:
            stale = self._previous[len(self._current)] if index > 0 else inputs
            self._current.append(inputs + attn)
        if wanted:
            self.batches.append((inputs, attn if self.target == "attention" else outputs, layer_kwargs, stale))

    def layer_end(self, index: int, layer: nn.Module) -> None:
        self._previous, self._current = self._current, []
        if self.batches:
            batches, self.batches = self.batches, []
            self.on_layer(index, batches)
