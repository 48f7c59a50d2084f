"""Healing math: fit a converted layer's parameters so its output matches the original layer's output.

Layer-wise healing (DESIGN §2.8): for a decoder layer with inputs ``x`` (the original model's hidden states entering
that layer) and targets ``y`` (the original layer's outputs on them), minimize the relative error
``‖f(x) - y‖² / ‖y‖²`` over the chosen parameters of the converted layer ``f`` with Adam, cycling through the
calibration batches. End-to-end distillation minimizes KL(teacher ‖ student) of the next-token distributions.
Pure functions of modules and tensors; the passes that produce ``x`` and ``y`` live in :mod:`kvtool.calib`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖out - target‖² / ‖target‖² (float32), the layer-wise healing loss."""
    diff = (out.float() - target.float()).pow(2).sum()
    return diff / target.float().pow(2).sum().clamp_min(1e-30)


def adam_fit(params: list[nn.Parameter], loss_at: Callable[[int], torch.Tensor], *, steps: int, lr: float,
             seed: int = 0, module: nn.Module | None = None) -> list[float]:
    """Adam on ``loss_at(step)`` for ``steps`` steps, only ``params`` trainable (the rest of ``module`` frozen, its
    flags restored after); returns the loss of every step (the first is the loss before any update)."""
    torch.manual_seed(seed)
    frozen = [p for p in module.parameters() if not any(p is q for q in params)] if module is not None else []
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                loss = loss_at(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p, flag in zip(frozen, flags, strict=True):
            p.requires_grad_(flag)
        for p in params:
            p.requires_grad_(False)
    return losses


def fit_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
              params: list[nn.Parameter], *, steps: int, lr: float, seed: int = 0,
              forward: Callable[[torch.Tensor, dict[str, Any]], Any] | None = None) -> list[float]:
    """Adam on :func:`relative_error` of ``layer(x, **kwargs)`` (or ``forward(x, kwargs)``) against ``y`` for ``steps``
    steps, batch ``step % n``; only ``params`` change. Returns the loss of every step (the first is the loss before
    any update)."""
    forward = forward or (lambda x, kwargs: layer(x, **kwargs))

    def loss_at(step: int) -> torch.Tensor:
        x, y, kwargs = batches[step % len(batches)]
        out = forward(x, kwargs)
        return relative_error(out[0] if isinstance(out, tuple) else out, y)

    return adam_fit(params, loss_at, steps=steps, lr=lr, seed=seed, module=layer)


TEACHER_CACHE_BYTES = 4 << 30  # 64 windows x 256 tokens x SmolLM2's 49152-token vocabulary in float32: 3.2 GB


def distill(student: nn.Module, teacher_logits: Callable[[torch.Tensor], torch.Tensor], windows: list[torch.Tensor],
            params: list[nn.Parameter], *, steps: int, lr: float, seed: int = 0) -> list[float]:
    """End-to-end distillation: Adam on KL(teacher ‖ student) of the next-token distributions, batch ``step % n``."""

    cache: dict[int, torch.Tensor] = {}

    def loss_at(step: int) -> torch.Tensor:
        i = step % len(windows)
        ids = windows[i]
        target = cache.get(i)
        if target is None:
            with torch.no_grad():
                target = torch.log_softmax(teacher_logits(ids).float(), -1)
            # the teacher's log-probs of every batch are kept when they fit in TEACHER_CACHE_BYTES (the batches
            # cycle, so each is computed once instead of once per visit; same numbers either way)
            if sum(w.numel() for w in windows) * target.shape[-1] * 4 <= TEACHER_CACHE_BYTES:
                cache[i] = target
        logp = torch.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1)
        return torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean") / ids.shape[1]

    return adam_fit(params, loss_at, steps=steps, lr=lr, seed=seed, module=student)
