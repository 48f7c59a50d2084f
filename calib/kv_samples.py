"""OSCAR's calibration keys and values: post-RoPE K and V of every layer on calibration windows."""

from __future__ import annotations

import torch
from torch import nn

from kvtool.progress import progress_bar
from kvtool.runtime.kvquant import kv_quantization


@torch.no_grad()
def collect_kv_samples(model: nn.Module, windows: torch.Tensor, *, sink: int = 0, batch_size: int = 4,
                       progress: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE keys and values of every layer on calibration ``windows`` [N, L]: {layer: (k, v) [T, G, d]}.

    Positions ``< sink`` (kept in full precision at decode) are left out. Float32 on the CPU.
    """
    got: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        ks, vs = got.setdefault(module.layer_idx, ([], []))
        for src, dst in ((key, ks), (value, vs)):
            x = src[:, :, sink:].float().permute(0, 2, 1, 3)  # [B, S, G, d]
            dst.append(x.reshape(-1, x.shape[2], x.shape[3]).cpu())

    device = next(model.parameters()).device
    with kv_quantization(model, None, capture=capture), progress_bar(progress) as bar:
        task = bar.add_task("K/V samples", total=windows.shape[0])
        for start in range(0, windows.shape[0], batch_size):
            chunk = windows[start:start + batch_size].to(device)
            model(input_ids=chunk, use_cache=False)
            bar.advance(task, chunk.shape[0])
    return {i: (torch.cat(ks), torch.cat(vs)) for i, (ks, vs) in sorted(got.items())}
