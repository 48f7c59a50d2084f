"""Second-moment statistics: a visitor of the layer-by-layer runner (:mod:`kvtool.calib.runner`).

Hooks on each decoder layer accumulate the requested statistics while the runner passes the calibration windows
through it. Because every layer sees the outputs of the *original* previous layers, the result equals collecting
with hooks during full forward passes (:func:`collect_statistics_full_forward`, used by the tests).

Under torch.distributed each rank processes ``windows[rank::world]``; each layer's sums are summed onto rank 0 as the
layer completes (the other ranks keep only the token counts) and rank 0 writes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtool.calib.runner import LayerVisitor, batches, run_layers
from kvtool.calib.stats import ALL_STATS, StatsStore, gram_fp32, parse_stats
from kvtool.data import TextSource, calibration_windows
from kvtool.errors import KvtoolError
from kvtool.models import ArchSpec, LoadedModel
from kvtool.runtime.rope import apply_rope


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
            x = x.reshape(b * length, spec.num_kv_heads, -1, spec.head_dim)
            if not self.store.exact and x.dtype in (torch.bfloat16, torch.float16):
                # [G, n*heads, d]: the group's query heads are summed by stacking their rows
                gram = gram_fp32(x.permute(1, 0, 2, 3).reshape(spec.num_kv_heads, -1, spec.head_dim))
            else:
                x = x.to(torch.float64)
                gram = torch.einsum("nghd,nghe->gde", x, x)  # sums the query heads of each group for q
            self.store.add_gram(self.index, name, gram, b * length)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def stat_shape(spec: ArchSpec, model: nn.Module, layer: int, name: str) -> tuple[int, ...]:
    """Shape of one statistic's sum: q, k and v per KV-head group [G, head_dim, head_dim], the others square over
    their linear's input (down_in from the layer's own down_proj, read without loading its weight)."""
    if name in ("q", "k", "v"):
        return (spec.num_kv_heads, spec.head_dim, spec.head_dim)
    if name == "down_in":
        width = spec.layers(model)[layer].mlp.down_proj.in_features
    elif name == "o_in":
        width = spec.num_heads * spec.head_dim
    else:
        width = spec.hidden_size
    return (width, width)


class StatsVisitor(LayerVisitor):
    """Accumulates the requested statistics of the chosen layers into ``store``."""

    def __init__(self, spec: ArchSpec, stats: tuple[str, ...], store: StatsStore, layers: set[int]):
        self.spec, self.stats, self.store, self.layers = spec, stats, store, layers
        self.hooks: _StatHooks | None = None

    def layer_start(self, index: int, layer: nn.Module) -> None:
        if index in self.layers:
            self.hooks = _StatHooks(layer, index, self.spec, self.stats, self.store)

    def layer_end(self, index: int, layer: nn.Module) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
            self.store.offload(index)


@torch.no_grad()
def collect_statistics(loaded: LoadedModel, windows: torch.Tensor, stats: tuple[str, ...] | str | None = None, *,
                       device: str | torch.device = "cpu", batch_size: int = 8, offload: bool = False,
                       layers: list[int] | None = None, progress: bool = False,
                       distributed: bool = True, visitors: list[LayerVisitor] = (), exact: bool = False,
                       write_to: str | Path | None = None) -> StatsStore:
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
        visitors: more visitors riding the same pass (e.g. Ladder drift); they see every layer.
        exact: float64 Gram products for every batch; by default bf16/fp16 activations (a GPU model) use float32
            products on tensor cores (exact products, float32 accumulation within a batch, float64 across batches;
            relative difference <~ sqrt(rows per batch) * 2^-24, far below what the transforms resolve).
        distributed: when torch.distributed is initialized, take this rank's share of the windows and sum each
            layer's sums onto rank 0 when the layer completes (other ranks return only counts).
        write_to: a folder: each layer's sums go into its statistics file as the layer completes and leave memory
            (finish with ``store.save(write_to)``); single process only.
    """
    import torch.distributed as dist

    stats = parse_stats(stats)
    spec = loaded.spec
    if distributed and dist.is_available() and dist.is_initialized():
        windows = windows[dist.get_rank()::dist.get_world_size()]
    store = StatsStore(exact=exact)
    store.reduce_each_layer = bool(distributed and dist.is_available() and dist.is_initialized()
                                   and dist.get_world_size() > 1)
    wanted = set(range(spec.num_layers)) if layers is None else set(layers)
    if write_to is not None:
        if store.reduce_each_layer or (distributed and dist.is_available() and dist.is_initialized()
                                       and dist.get_world_size() > 1):
            raise KvtoolError("internal error: statistics cannot be written layer by layer under torch.distributed")
        store.write_to(write_to, [(i, name, stat_shape(spec, loaded.model, i, name)) for i in sorted(wanted)
                                  for name in ALL_STATS if name in stats])
    visitor = StatsVisitor(spec, stats, store, wanted)
    try:
        count = spec.num_layers if visitors else (max(wanted) + 1 if wanted else 0)
        run_layers(loaded, windows, [visitor, *visitors], device=device, batch_size=batch_size, offload=offload,
                   num_layers=count, progress=progress)
    finally:
        if visitor.hooks is not None:
            visitor.hooks.remove()
    store.synchronize()
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
        for batch in batches(windows, batch_size):
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    store.offload()
    return store


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of the token ids of the calibration windows: identifies text, tokenizer, samples, length and seed."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def dataset_identity(dataset: str) -> str:
    """A local dataset as its absolute path (the same file named two ways is one dataset); other names as given."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.exists() else dataset


def mixture_parts(source: TextSource) -> dict[str, Any]:
    """``{"parts": ...}`` for a mixture (each part's weight; a suite domain's origin and text digest), else ``{}``."""
    from kvtool.data import describe_parts, mixture

    return {"parts": describe_parts(source)} if mixture(source.dataset) is not None else {}


def calibrate(loaded: LoadedModel, source: TextSource, stats: tuple[str, ...] | str | None = None, *,
              samples: int = 32, seq_len: int = 512, seed: int = 0, device: str | torch.device = "cpu",
              batch_size: int = 8, offload: bool = False, progress: bool = False,
              visitors: list[LayerVisitor] = (), windows: torch.Tensor | None = None,
              exact: bool = False, write_to: str | Path | None = None) -> StatsStore:
    """Choose calibration windows of ``source``, collect ``stats`` on them (``visitors`` ride the same pass), and
    stamp the store's metadata (the one place statistics metadata is written: model, spec, dataset, tokens).
    ``write_to``: see :func:`collect_statistics`."""
    import torch.distributed as dist

    from kvtool import __version__

    if windows is None:
        windows = calibration_windows(loaded.tokenizer, source, samples, seq_len, seed, loaded.spec.max_positions)
    store = collect_statistics(loaded, windows, stats, device=device, batch_size=batch_size, offload=offload,
                               progress=progress, visitors=visitors, exact=exact, write_to=write_to)
    store.meta = {
        "kvtool_version": __version__,
        "model": loaded.identity(),
        "spec": loaded.spec.to_dict(),
        "dataset": {**source.describe(), "dataset": dataset_identity(source.dataset), "samples": samples,
                    "seq_len": seq_len, "seed": seed, **mixture_parts(source)},
        "tokens": int(windows.numel()),
        "windows_sha256": windows_digest(windows),
        "exact": exact,
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
    }
    return store
