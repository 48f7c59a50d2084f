"""The one layer-by-layer pass over the source model that every calibration visitor rides on.

Embed all calibration windows once; then for each decoder layer: put it on the compute device, run every batch
of windows through it, show each (inputs, outputs) pair to the visitors, pass the outputs on as the next layer's
inputs, and take the layer off the device again. Every layer therefore sees the outputs of the *original*
previous layers. Peak memory is one decoder layer plus the hidden states of the windows (kept on the CPU with
``offload=True``). Visitors: second moments (:mod:`kvtool.calib.collect`), Ladder drift
(:mod:`kvtool.calib.drift`), teacher activations for healing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvtool.models import ArchSpec, LayerStreamer, LoadedModel
from kvtool.progress import progress_bar
from kvtool.runtime.hf_cache import CACHE_NAMES


class LayerVisitor:
    """Hooks into :func:`run_layers`; override what you need. All calls happen under ``torch.no_grad()``."""

    def layer_start(self, index: int, layer: nn.Module) -> None:
        """Before the first batch of layer ``index`` (the layer is on the compute device)."""

    def batch(self, index: int, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor,
              layer_kwargs: dict[str, Any]) -> None:
        """After one batch: ``inputs``/``outputs`` [B, L, D] of the original layer, the kwargs it was called with
        (``position_embeddings`` = (cos, sin), ``attention_mask``, ...)."""

    def layer_end(self, index: int, layer: nn.Module) -> None:
        """After the last batch of layer ``index``."""


class _Caught(Exception):
    pass


def layer_inputs(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model's embedding/mask/rotary preamble and return layer 0's (hidden_states, kwargs)."""
    captured: dict[str, Any] = {}

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in (*CACHE_NAMES, "hidden_states")}
        raise _Caught

    handle = spec.layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model.model(input_ids=input_ids, use_cache=False)
    except _Caught:
        pass
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    return captured["hidden"], kwargs


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU when it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive slices of ``batch_size`` windows."""
    return [windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def run_layers(loaded: LoadedModel, windows: torch.Tensor, visitors: list[LayerVisitor], *,
               device: str | torch.device = "cpu", batch_size: int = 8, offload: bool = False,
               num_layers: int | None = None, progress: bool = False,
               description: str = "calibrating layers") -> None:
    """Run ``windows`` [N, L] through the first ``num_layers`` decoder layers (all by default), layer by layer."""
    spec, model = loaded.spec, loaded.model
    device = torch.device(device)
    keep = torch.device("cpu") if offload else device
    count = spec.num_layers if num_layers is None else num_layers
    pre_modules = [model.model.embed_tokens, model.model.rotary_emb]
    homes = [device_of(m) for m in pre_modules]
    for m in pre_modules:
        m.to(device)
    hidden, kwargs_by_size = [], {}
    try:
        for batch in batches(windows, batch_size):
            h, kw = layer_inputs(model, spec, batch.to(device))
            hidden.append(h.to(keep))
            kwargs_by_size.setdefault(batch.shape[0], kw)
    finally:
        for m, home in zip(pre_modules, homes, strict=True):
            m.to(home)
    streamer = LayerStreamer(loaded, device)
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=count)
        for i in range(count):
            layer = streamer.acquire(i)
            try:
                for v in visitors:
                    v.layer_start(i, layer)
                for b, h in enumerate(hidden):
                    x = h.to(device)
                    kw = kwargs_by_size[h.shape[0]]
                    out = layer(x, **kw)
                    out = out[0] if isinstance(out, tuple) else out
                    for v in visitors:
                        v.batch(i, layer, x, out, kw)
                    hidden[b] = out.to(keep)
                if i + 1 < count:
                    streamer.prefetch(i + 1)  # its copy overlaps this layer's queued work
                for v in visitors:
                    v.layer_end(i, layer)
            except BaseException:
                streamer.close()
                raise
            finally:
                streamer.release(i)
            bar.advance(task)
