"""A calibration visitor that keeps a seeded sample of each layer's attention inputs (the ``attn_in`` activations).

Used by ``convert-mla --format deepseek-v3`` to fit kv_a_layernorm's weight, which needs per-token latents (a
second moment cannot give E[c²/rms(c)]). Memory: ``tokens`` x hidden_size float32 per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvtool.calib.runner import LayerVisitor


class AttnInputSampler(LayerVisitor):
    """Keeps up to ``tokens`` rows of every layer's q_proj input (seeded, in token order) in ``samples[layer]``, and
    the rows of every window's first token (where attention sinks form) in ``first[layer]``."""

    def __init__(self, tokens: int = 2048, seed: int = 0) -> None:
        self.tokens, self.seed = tokens, seed
        self.samples: dict[int, torch.Tensor] = {}
        self.first: dict[int, torch.Tensor] = {}
        self._handle: Any = None
        self._parts: list[torch.Tensor] = []
        self._first: list[torch.Tensor] = []

    def layer_start(self, index: int, layer: nn.Module) -> None:
        self._parts, self._first = [], []

        def grab(module: nn.Module, args: tuple) -> None:
            self._first.append(args[0].detach()[:, 0].float().cpu())
            self._parts.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        self._handle = layer.self_attn.q_proj.register_forward_pre_hook(grab)

    def layer_end(self, index: int, layer: nn.Module) -> None:
        self._handle.remove()
        x = torch.cat(self._parts)
        self._parts = []
        if x.shape[0] > self.tokens:
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed + index))
            x = x[pick[: self.tokens].sort().values]
        self.samples[index] = x
        self.first[index] = torch.cat(self._first)
