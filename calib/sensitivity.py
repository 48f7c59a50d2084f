"""Measured sensitivity of the calibration loss to each layer's K and V projections (for rank allocation).

One forward and backward pass of the source model over the calibration windows (next-token cross-entropy); the
weights stay frozen, only the k_proj/v_proj outputs carry gradients. For a small change δ of a projection's
output, the loss changes by about ½·E[(g·δ)²] (the Fisher approximation, g = ∂loss/∂output); taking g and δ as
uncorrelated in direction gives ½·E‖g‖²/n·E‖δ‖², so a layer's loss cost per unit of activation-weighted residual
energy is α = E‖g‖²/n (n = the projection's output width). Needs the whole model on the device (no streaming).
"""

from __future__ import annotations

import torch
from torch import nn

from kvtool.errors import KvtoolError
from kvtool.models import LoadedModel
from kvtool.progress import progress_bar


def kv_sensitivity(loaded: LoadedModel, windows: torch.Tensor, *, device: str | torch.device = "cpu",
                   batch_size: int = 4, progress: bool = False) -> dict[str, list[float]]:
    """{"k": [α per layer], "v": [...]}: mean squared loss gradient per output channel of k_proj / v_proj."""
    model, spec = loaded.model, loaded.spec
    if any(p.is_meta for p in model.parameters()):
        raise KvtoolError("--rank-alloc sensitivity needs the whole model in memory (a lazily loaded model cannot "
                          "run backward): load it eagerly or use --rank-alloc uniform")
    home = next(model.parameters()).device
    model.to(device)
    sums = {"k": [0.0] * spec.num_layers, "v": [0.0] * spec.num_layers}
    outs: list[tuple[str, int, torch.Tensor]] = []
    handles = []

    def hook(kind: str, i: int):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            out = out.detach().requires_grad_(True)
            outs.append((kind, i, out))
            return out
        return fn

    for i, layer in enumerate(spec.layers(model)):
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook("k", i)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook("v", i)))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = 0
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("measuring K/V sensitivity", total=windows.shape[0])
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start:start + batch_size].to(device)
                outs.clear()
                logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="sum")
                grads = torch.autograd.grad(loss, [o for _, _, o in outs])
                for (kind, i, o), g in zip(outs, grads, strict=True):
                    sums[kind][i] += float(g.double().pow(2).sum()) / o.shape[-1]
                tokens += ids.numel()
                bar.advance(task, ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.to(home)
    return {k: [x / tokens for x in v] for k, v in sums.items()}
