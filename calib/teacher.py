"""Teacher activations for healing: each layer's inputs and outputs in the original model, one layer at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvtool.calib.runner import LayerVisitor

Batches = list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


class TeacherVisitor(LayerVisitor):
    """Collects (inputs, outputs, layer kwargs) of every batch of a layer, then hands them to ``on_layer(index,
    batches)`` (e.g. to fit the converted layer); memory: one layer's activations of all windows."""

    def __init__(self, on_layer: Callable[[int, Batches], None], layers: set[int] | None = None):
        self.on_layer, self.layers = on_layer, layers
        self.batches: Batches = []

    def batch(self, index: int, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor,
              layer_kwargs: dict[str, Any]) -> None:
        if self.layers is None or index in self.layers:
            self.batches.append((inputs, outputs, layer_kwargs))

    def layer_end(self, index: int, layer: nn.Module) -> None:
        if self.batches:
            batches, self.batches = self.batches, []
            self.on_layer(index, batches)
