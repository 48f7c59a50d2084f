"""Layer-sequential statistics collection.

Embed all calibration windows once; then for each decoder layer: put it on the compute device, run it on
every window batch with hooks that accumulate the requested statistics, pass its outputs on as the next
layer's inputs, and take it off the device again. Peak memory is one decoder layer plus the hidden states
of the calibration windows (kept on the CPU with ``offload=True``). Because every layer sees the outputs
of the *original* previous layers, the result equals collecting with hooks during full forward passes
(:func:`collect_statistics_full_forward`, used by the tests).

Under torch.distributed each rank processes ``windows[rank::world]`` and the sums are all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvtool.calib.stats import StatsStore, parse_stats
from kvtool.models import ArchSpec, LayerStreamer, LoadedModel
from kvtool.progress import progress_bar


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's RoPE helper: (x1, x2) -> (-x2, x1) over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x of shape (B, L, heads, d) with cos/sin of shape (B or 1, L, d), HF's half-split convention."""
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class _StatHooks:
    """Forward hooks on one decoder layer that accumulate the requested statistics into a StatsStore."""

    def __init__(self, layer: nn.Module, index: int, spec: ArchSpec, stats: tuple[str, ...], store: StatsStore):
        self.index, self.spec, self.stats, self.store = index, spec, stats, store
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.handles = [attn.register_forward_pre_hook(self._grab_rope, with_kwargs=True)]
        pre = {"attn_in": attn.q_proj, "o_in": attn.o_proj, "mlp_in": mlp.gate_proj, "down_in": mlp.down_proj}
        for name, module in pre.items():
            if name in stats:
                self.handles.append(module.register_forward_pre_hook(self._input_hook(name)))
        post = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
        for name, module in post.items():
            if name in stats:
                self.handles.append(module.register_forward_hook(self._head_hook(name)))

    def _grab_rope(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.rope = kwargs.get("position_embeddings")

    def _input_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.store.add(self.index, name, args[0])
        return hook

    def _head_hook(self, name: str) -> Callable:
        spec = self.spec

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            b, length = out.shape[:2]
            x = out.view(b, length, -1, spec.head_dim)
            if name in ("q", "k"):
                if spec.qk_norm:
                    x = getattr(self.attn, f"{name}_norm")(x)
                cos, sin = self.rope
                x = apply_rope(x, cos, sin)
            x = x.reshape(b * length, spec.num_kv_heads, -1, spec.head_dim).to(torch.float64)
            gram = torch.einsum("nghd,nghe->gde", x, x)  # sums the query heads of each group for q
            self.store.add_gram(self.index, name, gram, b * length)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Caught(Exception):
    pass


def _layer_inputs(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model's embedding/mask/rotary preamble and return layer 0's (hidden_states, kwargs)."""
    captured: dict[str, Any] = {}

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "hidden_states")}
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


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def collect_statistics(loaded: LoadedModel, windows: torch.Tensor, stats: tuple[str, ...] | str | None = None, *,
                       device: str | torch.device = "cpu", batch_size: int = 8, offload: bool = False,
                       layers: list[int] | None = None, progress: bool = False,
                       distributed: bool = True) -> StatsStore:
    """Collect second-moment statistics layer by layer.

    Args:
        loaded: the model (possibly lazily loaded: layers stream from disk).
        windows: int64 token windows, (samples, seq_len).
        stats: statistic names (see :mod:`kvtool.calib.stats`); None -> the default set.
        device: compute device for the layers.
        batch_size: windows per forward call.
        offload: keep the hidden states of all windows on the CPU between layers.
        layers: only accumulate statistics for these layer indices (layers above the last one are skipped).
        progress: show a rich progress bar per layer.
        distributed: when torch.distributed is initialized, take this rank's share of the windows and
            all-reduce the sums at the end.
    """
    import torch.distributed as dist

    stats = parse_stats(stats)
    spec, model = loaded.spec, loaded.model
    device = torch.device(device)
    if distributed and dist.is_available() and dist.is_initialized():
        windows = windows[dist.get_rank()::dist.get_world_size()]
    store = StatsStore()
    wanted = sorted(set(range(spec.num_layers)) if layers is None else set(layers))
    keep = torch.device("cpu") if offload else device

    pre_modules = [model.model.embed_tokens, model.model.rotary_emb]
    homes = [_device_of(m) for m in pre_modules]
    for m in pre_modules:
        m.to(device)
    hidden, kwargs_by_size = [], {}
    for batch in _batches(windows, batch_size):
        h, kw = _layer_inputs(model, spec, batch.to(device))
        hidden.append(h.to(keep))
        kwargs_by_size.setdefault(batch.shape[0], kw)
    for m, home in zip(pre_modules, homes, strict=True):
        m.to(home)

    streamer = LayerStreamer(loaded, device)
    with progress_bar(progress) as bar:
        task = bar.add_task("calibrating layers", total=(max(wanted) + 1) if wanted else 0)
        for i in range(max(wanted) + 1 if wanted else 0):
            layer = streamer.acquire(i)
            hooks = _StatHooks(layer, i, spec, stats, store) if i in wanted else None
            try:
                for b, h in enumerate(hidden):
                    out = layer(h.to(device), **kwargs_by_size[h.shape[0]])
                    hidden[b] = (out[0] if isinstance(out, tuple) else out).to(keep)
            finally:
                if hooks is not None:
                    hooks.remove()
                    store.offload(i)
                streamer.release(i)
            bar.advance(task)
    if distributed:
        store.all_reduce()
    return store


@torch.no_grad()
def collect_statistics_full_forward(loaded: LoadedModel, windows: torch.Tensor,
                                    stats: tuple[str, ...] | str | None = None, *,
                                    batch_size: int = 8) -> StatsStore:
    """Reference path: hooks on every layer at once during ordinary full forward passes (whole model in memory)."""
    stats = parse_stats(stats)
    spec, model = loaded.spec, loaded.model
    store = StatsStore()
    hooks = [_StatHooks(layer, i, spec, stats, store) for i, layer in enumerate(spec.layers(model))]
    try:
        for batch in _batches(windows, batch_size):
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    store.offload()
    return store
