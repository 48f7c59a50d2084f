"""A transformers ``Cache`` that stores keys and values in 2 bits: generate with a ``kvtool export``.

    from kvtool.runtime import Int2Cache
    cache = Int2Cache.from_export("out/oscar", model)      # checks the export was made for this model
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)

What one layer holds (per sequence, per KV head):

* the first ``sink`` tokens and the ``residual_window`` most recent ones in the model's dtype;
* every other token as INT2 codes of its rotated key/value (``R_k k`` after RoPE, ``R_v v``), packed four to a
  byte, with one fp16 scale and zero per group of ``group_size`` elements: the byte layout of the paged Triton cache
  (:mod:`kvtool.kernels.int2_kv`), written by its PyTorch reference ``quantize_pack_reference``. OSCAR's released
  per-row quantile clip, when the export uses it, is applied to the rotated row before packing.

A token is quantized once, when it leaves the recent window (it is never re-quantized). What attention reads at a
call whose first new token is at position ``a``: the sink and every token ``j > a - residual_window`` in full
precision, older tokens dequantized and rotated back (``R_kᵀ``, ``R_vᵀ``). The first call (the prompt) reads its
own tokens in full precision; later calls read their own tokens in full precision when ``residual_window >= 1``
and from the 2-bit cache when it is 0 (written, then read). For one-token decode steps this is exactly the rule
the perplexity emulation scores (:func:`kvtool.runtime.kvquant.quantized_mask` with ``prefill`` = the prompt
length).

The codes live in a paged pool (blocks of 16 tokens, the layout of :mod:`kvtool.kernels.int2_kv`). Bound to a model
(``from_export(path, model)`` or :meth:`Int2Cache.bind`), a one-token decode step on a CUDA device runs the fused
kernel :func:`kvtool.kernels.int2_kv.int2_decode_attention` over the packed history plus the 16-bit sink, recent window
and new token, so the history is never expanded to 16 bits. Otherwise (the prompt, the CPU, ``fused=False``) the
history is dequantized and rotated back for the model's own attention: the reference path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvtool.errors import KvtoolError
from kvtool.runtime.kvquant import KVQuantSpec, load_oscar_spec, quantile_clip, rotate_rows


def _pack(x: torch.Tensor, rot: torch.Tensor | None, clip: torch.Tensor | None, quantile: float | None,
          group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, G, T, d] -> (codes uint8 [B, G, T, d/4], scale fp16 [B, G, T, d/gs], zero fp16) of the rotated rows."""
    from kvtool.kernels.int2_kv import quantize_pack_reference

    b, g, t, d = x.shape
    y = quantile_clip(rotate_rows(x.float(), None if rot is None else rot.to(x.device)), quantile)
    rows = y.permute(0, 2, 1, 3).reshape(b * t, g, d)  # [B*T, G, d]
    packed, scale, zero = quantize_pack_reference(rows, None, None if clip is None else clip.to(x.device), group_size)
    back = lambda z: z.reshape(b, t, g, -1).permute(0, 2, 1, 3).contiguous()  # noqa: E731
    return back(packed), back(scale), back(zero)


def _unpack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, rot: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_pack` up to quantization: dequantized rows rotated back, [B, G, T, d] in ``dtype``."""
    from kvtool.kernels.int2_kv import unpack_dequantize

    y = unpack_dequantize(codes, scale, zero)
    if rot is not None:
        y = torch.einsum("bgte,ged->bgtd", y, rot.to(y.device, torch.float32))
    return y.to(dtype)


BLOCK = 16  # tokens per block of the paged 2-bit pool (the layout the fused decode kernel reads)
FUSED_IMPL = "kvtool_int2"  # the attention implementation a bound model decodes through


class Int2Layer(CacheLayerMixin):
    """One decoder layer's 2-bit cache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, spec: KVQuantSpec, layer: int, fused: bool | None = None):
        super().__init__()
        self.group_size = spec.group_size
        self.sink, self.window = spec.sink, spec.residual_window
        self.k_rot, self.v_rot = spec.k_rotation.get(layer), spec.v_rotation.get(layer)
        self.k_clip, self.v_clip = spec.k_clip.get(layer), spec.v_clip.get(layer)
        self.k_quantile, self.v_quantile = spec.k_quantile, spec.v_quantile
        self.length = 0
        self.fused_option = fused
        self.bound = False  # set by Int2Cache.bind: the model's attention reads this layer (fused decode)
        self.pending: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from kvtool.kernels.int2_kv import shapes_supported

        self.dtype, self.device = key_states.dtype, key_states.device
        b, g, _, d = key_states.shape
        empty = lambda width, dt: torch.zeros(b, g, 0, width, dtype=dt, device=self.device)  # noqa: E731
        self.sink_k, self.sink_v = empty(d, self.dtype), empty(d, self.dtype)
        self.recent_k, self.recent_v = empty(d, self.dtype), empty(d, self.dtype)
        self.shape = (b, g, d)
        self.n_quantized, self.max_blocks = 0, 0
        self.pool: dict[str, tuple[torch.Tensor, ...]] = {}
        self._grow(BLOCK)
        fused = self.fused_option
        if fused is None:  # the default: the fused kernel on a CUDA device
            fused = self.device.type == "cuda"
        self.fused = bool(fused) and shapes_supported(d, self.group_size) and self.window >= 1
        self._rotations_to_device()
        # fused: the sink and recent tokens also kept rotated (float32), as the kernel reads them, so a decode step
        # rotates only its new token
        self.rot_sink = (empty(d, torch.float32), empty(d, torch.float32))
        self.rot_recent = (empty(d, torch.float32), empty(d, torch.float32))
        self.is_initialized = True

    def _rotations_to_device(self) -> None:
        """Rotations and clips on the cache's device (float32) once, not at every token's packing."""
        self.k_rot, self.v_rot, self.k_clip, self.v_clip = (
            None if t is None else t.to(self.device, torch.float32)
            for t in (self.k_rot, self.v_rot, self.k_clip, self.v_clip))

    # the 2-bit pool: [B, blocks, G, BLOCK, width] per tensor; row b's block j is block b*blocks + j of the paged
    # view [B*blocks, G, BLOCK, width] (the layout of kvtool.kernels.int2_kv), its table self.block_table
    def _grow(self, tokens: int) -> None:
        need = -(-tokens // BLOCK)
        if need <= self.max_blocks:
            return
        new = max(need, 2 * self.max_blocks)
        b, g, d = self.shape
        ng = d // self.group_size
        for kind in ("k", "v"):
            fresh = (torch.zeros(b, new, g, BLOCK, d // 4, dtype=torch.uint8, device=self.device),
                     torch.zeros(b, new, g, BLOCK, ng, dtype=torch.float16, device=self.device),
                     torch.zeros(b, new, g, BLOCK, ng, dtype=torch.float16, device=self.device))
            for dst, src in zip(fresh, self.pool.get(kind, ()), strict=False):
                dst[:, : self.max_blocks] = src
            self.pool[kind] = fresh
        self.max_blocks = new
        self.block_table = (torch.arange(b, device=self.device)[:, None] * new
                            + torch.arange(new, device=self.device)[None]).int()

    def paged(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(data, scale, zero) of the K or V pool as the paged cache the fused kernel reads."""
        b, g, _ = self.shape
        return tuple(t.view(b * self.max_blocks, g, BLOCK, t.shape[-1]) for t in self.pool[kind])

    def _history(self, kind: str) -> tuple[torch.Tensor, ...]:
        """(codes, scale, zero) [B, G, n_quantized, width] of the 2-bit history, in token order."""
        b, g, _ = self.shape
        nb = -(-self.n_quantized // BLOCK)
        return tuple(t[:, :nb].permute(0, 2, 1, 3, 4).reshape(b, g, nb * BLOCK, t.shape[-1])[:, :, : self.n_quantized]
                     for t in self.pool[kind])

    def _quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (_unpack(*self._history("k"), self.k_rot, self.dtype),
                _unpack(*self._history("v"), self.v_rot, self.dtype))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        to_sink = max(0, min(self.sink - self.length, n_new))
        rot_new = None
        if self.fused:
            rot_new = (rotate_rows(key_states.float(), self.k_rot), rotate_rows(value_states.float(), self.v_rot))
        if self.bound and self.fused and n_new == 1 and self.length:
            # fused decode: the attention reads the packed history from the pool and, in 16 bits, the sink, the
            # recent window and the new token (rotated, as the kernel wants them); nothing is dequantized
            self.pending = tuple(torch.cat([s, r, n], dim=-2) for s, r, n in
                                 zip(self.rot_sink, self.rot_recent, rot_new, strict=True)) + (self.n_quantized,)
            keys, values = key_states, value_states  # not read by the fused attention
        else:
            deq_k, deq_v = self._quantized()
            read_k, read_v = key_states, value_states
            if self.length and self.window == 0 and to_sink < n_new:
                # no recent window: after the prompt a token is written, then read back from the 2-bit cache
                rk = _unpack(*_pack(key_states[..., to_sink:, :], self.k_rot, self.k_clip, self.k_quantile,
                                    self.group_size), self.k_rot, self.dtype)
                rv = _unpack(*_pack(value_states[..., to_sink:, :], self.v_rot, self.v_clip, self.v_quantile,
                                    self.group_size), self.v_rot, self.dtype)
                read_k = torch.cat([key_states[..., :to_sink, :], rk], dim=-2)
                read_v = torch.cat([value_states[..., :to_sink, :], rv], dim=-2)
            keys = torch.cat([self.sink_k, deq_k, self.recent_k, read_k], dim=-2)
            values = torch.cat([self.sink_v, deq_v, self.recent_v, read_v], dim=-2)
        # file the new tokens: sink first, then the recent window; tokens that will be older than the window at
        # the next call leave it now, quantized once
        if to_sink:
            self.sink_k = torch.cat([self.sink_k, key_states[..., :to_sink, :]], dim=-2)
            self.sink_v = torch.cat([self.sink_v, value_states[..., :to_sink, :]], dim=-2)
        self.recent_k = torch.cat([self.recent_k, key_states[..., to_sink:, :]], dim=-2)
        self.recent_v = torch.cat([self.recent_v, value_states[..., to_sink:, :]], dim=-2)
        if rot_new is not None:
            if to_sink:
                self.rot_sink = tuple(torch.cat([a, n[..., :to_sink, :]], dim=-2)
                                      for a, n in zip(self.rot_sink, rot_new, strict=True))
            self.rot_recent = tuple(torch.cat([a, n[..., to_sink:, :]], dim=-2)
                                    for a, n in zip(self.rot_recent, rot_new, strict=True))
        self.length += n_new
        # at the next call (first position = self.length) token j stays full precision iff self.length - j < W
        leave = max(0, self.recent_k.shape[-2] - max(self.window - 1, 0))
        if leave:
            self._append_quantized(self.recent_k[..., :leave, :], self.recent_v[..., :leave, :])
            self.recent_k, self.recent_v = self.recent_k[..., leave:, :], self.recent_v[..., leave:, :]
            self.rot_recent = tuple(a[..., leave:, :] for a in self.rot_recent)
        return keys, values

    def attend(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """The fused decode step the last update prepared: query [B, H, 1, d] -> [B, 1, H, d] through
        :func:`kvtool.kernels.int2_kv.int2_decode_attention` (INT2 history from the pool + the 16-bit segment)."""
        from kvtool.kernels.int2_kv import int2_decode_attention

        fk, fv, n_q = self.pending
        self.pending = None
        b = query.shape[0]
        lens = torch.full((b,), n_q, dtype=torch.int32, device=query.device)
        fp_lens = torch.full((b,), fk.shape[2], dtype=torch.int32, device=query.device)
        out = int2_decode_attention(query[:, :, 0], self.paged("k"), self.paged("v"), self.block_table, lens,
                                    self.k_rot, self.v_rot, scaling, max_seq_len=n_q,
                                    fp_segment=(fk, fv), fp_lens=fp_lens)
        return out[:, None].to(query.dtype)

    def _append_quantized(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[-2]
        self._grow(self.n_quantized + n)
        t = torch.arange(self.n_quantized, self.n_quantized + n, device=self.device)
        block, offset = t // BLOCK, t % BLOCK
        for kind, x, rot, clip, quantile in (("k", k, self.k_rot, self.k_clip, self.k_quantile),
                                             ("v", v, self.v_rot, self.v_clip, self.v_quantile)):
            for store, val in zip(self.pool[kind], _pack(x, rot, clip, quantile, self.group_size), strict=True):
                store[:, block, :, offset] = val.permute(2, 0, 1, 3)  # [n, B, G, width]
        self.n_quantized += n

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.length = 0
        self.pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            for name in ("sink_k", "sink_v", "recent_k", "recent_v"):
                setattr(self, name, getattr(self, name).index_select(0, idx))
            self.rot_sink = tuple(t.index_select(0, idx) for t in self.rot_sink)
            self.rot_recent = tuple(t.index_select(0, idx) for t in self.rot_recent)
            self.pool = {kind: tuple(t.index_select(0, idx) for t in ts) for kind, ts in self.pool.items()}

    def nbytes(self) -> dict[str, int]:
        """Bytes held: full-precision tokens (sink + recent), the 2-bit tokens (codes + scales + zeros) and the
        2-bit pool as allocated (it grows by doubling, in blocks of 16 tokens)."""
        if not self.is_initialized:
            return {"full_precision": 0, "int2": 0, "int2_allocated": 0}
        fp = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v))
        q = sum(t.numel() * t.element_size() for kind in ("k", "v") for t in self._history(kind))
        alloc = sum(t.numel() * t.element_size() for ts in self.pool.values() for t in ts)
        return {"full_precision": fp, "int2": q, "int2_allocated": alloc}


class Int2StaticLayer(Int2Layer):
    """A fixed-shape 2-bit layer (``Int2Cache(..., max_cache_len=N)``): every buffer is allocated once for ``N``
    tokens and the step's bookkeeping (position, 2-bit and 16-bit counts, where the new token goes, which token
    leaves the recent window) lives in device tensors, so a one-token decode step can be captured in a CUDA graph
    and replayed. The 16-bit sink and recent tokens sit rotated (float32) in one [B, G, sink + window, d] segment,
    the recent window as a ring (attention does not depend on the order of its tokens: RoPE is in the keys); the
    token that will leave the window at the next step is packed at this one, with the same reference packing as
    :class:`Int2Layer`, into its pool slot (a scratch block when none leaves). The prompt is filed in one call;
    after it, one token per call. Decode attention is always the fused kernel (CUDA, or Triton's interpreter)."""

    def __init__(self, spec: KVQuantSpec, layer: int, max_cache_len: int):
        super().__init__(spec, layer, fused=True)
        self.max_cache_len = int(max_cache_len)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from kvtool.kernels.int2_kv import shapes_supported

        self.dtype, self.device = key_states.dtype, key_states.device
        b, g, _, d = key_states.shape
        if not shapes_supported(d, self.group_size) or self.window < 1:
            raise KvtoolError(f"a static Int2Cache decodes through the fused kernel, which needs a power-of-two "
                              f"head_dim >= 64, a power-of-two group dividing it and a recent window >= 1 (here "
                              f"head_dim {d}, group {self.group_size}, window {self.window}): drop max_cache_len")
        self.shape = (b, g, d)
        self.fused = True
        self._rotations_to_device()
        self.n_quantized, self.max_blocks, self.pool = 0, 0, {}
        self._grow(max(0, self.max_cache_len - self.sink) + BLOCK)  # the last block: scratch for "none leaves"
        self.scratch = (self.max_blocks - 1) * BLOCK
        width = self.sink + self.window
        self.segment = tuple(torch.zeros(b, g, width, d, dtype=torch.float32, device=self.device) for _ in "kv")
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # of the next token
        self.quantized_lens = torch.zeros(b, dtype=torch.int32, device=self.device)
        self.segment_lens = torch.zeros(b, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def _file_quantized(self, x: tuple[torch.Tensor, torch.Tensor], slot: torch.Tensor) -> None:
        """Pack rotated rows x = (k, v) [B, G, n, d] into pool slots ``slot`` [n] (device tensor)."""
        block, offset = slot // BLOCK, slot % BLOCK
        for kind, rows, clip, quantile in (("k", x[0], self.k_clip, self.k_quantile),
                                           ("v", x[1], self.v_clip, self.v_quantile)):
            for store, val in zip(self.pool[kind], _pack(rows, None, clip, quantile, self.group_size), strict=True):
                store[:, block, :, offset] = val.permute(2, 0, 1, 3)  # [n, B, G, width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        if self.length + n_new > self.max_cache_len:
            raise KvtoolError(f"the static Int2Cache holds {self.max_cache_len} tokens; this call would make "
                              f"{self.length + n_new}: build it with a larger max_cache_len")
        rot = (rotate_rows(key_states.float(), self.k_rot), rotate_rows(value_states.float(), self.v_rot))
        sink, window = self.sink, self.window
        if self.length == 0:  # the prompt: attends over itself in 16 bits (as Int2Layer's first call)
            head = min(sink, n_new)
            ring = list(range(max(sink, n_new - window), n_new))
            # packed: up to the token that leaves at the first decode step (position n_new - window, still in the
            # ring until that step overwrites its slot)
            old = list(range(sink, max(sink, n_new - window + 1)))
            for seg, r in zip(self.segment, rot, strict=True):
                seg[:, :, :head] = r[:, :, :head]
                if ring:
                    seg[:, :, [sink + (j - sink) % window for j in ring]] = r[:, :, ring]
            if old:
                self._file_quantized(tuple(r[:, :, old] for r in rot),
                                     torch.arange(len(old), device=self.device))
            self.position.fill_(n_new)
            self.length = n_new
            self.n_quantized = max(0, n_new - window - sink)
            return key_states, value_states
        if n_new != 1:
            raise KvtoolError("a static Int2Cache takes the prompt in one call, then one token per call: decode "
                              "one token at a time, or drop max_cache_len")
        if not self.bound:
            raise KvtoolError("a static Int2Cache decodes through the model's fused attention: bind it first "
                              "(Int2Cache.bind(model) or Int2Cache.from_export(path, model))")
        p = self.position
        # the new token's slot: a sink slot, or its ring slot (which held token p - window, packed a step ago)
        slot = torch.where(p < sink, p, sink + (p - sink) % window)
        for seg, r in zip(self.segment, rot, strict=True):
            seg.index_copy_(2, slot, r)
        self.quantized_lens.copy_((p - window - sink + 1).clamp_min(0).to(torch.int32).expand_as(self.quantized_lens))
        self.segment_lens.copy_((p + 1).clamp_max(sink + window).to(torch.int32).expand_as(self.segment_lens))
        # the token that leaves the window at the next step (position p + 1 - window) is packed now, from its ring
        # slot, which this step did not write: replaying a step from the same position is idempotent
        leaving = p + 1 - window
        leaves = leaving >= sink
        src = torch.where(leaves, sink + (leaving - sink).clamp_min(0) % window, torch.zeros_like(p))
        pool_slot = torch.where(leaves, leaving - sink, torch.full_like(p, self.scratch))
        self._file_quantized(tuple(seg.index_select(2, src) for seg in self.segment), pool_slot)
        p.add_(1)
        self.length += 1
        self.n_quantized = max(0, self.length - window - sink)
        self.pending = (*self.segment, self.quantized_lens)
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """The fused decode step over the pool (``quantized_lens`` tokens, read on the device) and the 16-bit
        segment (``segment_lens``); its launch is sized for ``max_cache_len``, so it is the same at every step."""
        from kvtool.kernels.int2_kv import int2_decode_attention

        fk, fv, lens = self.pending
        self.pending = None
        out = int2_decode_attention(query[:, :, 0], self.paged("k"), self.paged("v"), self.block_table, lens,
                                    self.k_rot, self.v_rot, scaling, max_seq_len=self.scratch,
                                    fp_segment=(fk, fv), fp_lens=self.segment_lens)
        return out[:, None].to(query.dtype)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self.segment = tuple(t.index_select(0, idx) for t in self.segment)
            self.pool = {kind: tuple(t.index_select(0, idx) for t in ts) for kind, ts in self.pool.items()}

    def set_length(self, length: int) -> None:
        """Put the write position back at ``length`` tokens (device ops only: can run inside a captured graph, so
        each replay decodes the same step; a benchmark's reset)."""
        self.position.fill_(length)
        self.length = length

    def nbytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"full_precision": 0, "int2": 0, "int2_allocated": 0}
        b, g, d = self.shape
        per_token = sum(t.shape[-1] * t.element_size() for ts in self.pool.values() for t in ts)
        fp = sum(t.numel() * t.element_size() for t in self.segment)
        alloc = sum(t.numel() * t.element_size() for ts in self.pool.values() for t in ts)
        return {"full_precision": fp, "int2": per_token * b * g * self.n_quantized, "int2_allocated": alloc}


class Int2Cache(Cache):
    """2-bit KV cache built from a ``kvtool export`` folder (OSCAR rotations, clips, windows).

    ``fused``: decode steps through the fused INT2 kernel once the cache is bound to a model (:meth:`bind`;
    :meth:`from_export` binds the model it is given): True, False, or None = on a CUDA device (the default fast
    path; the PyTorch path, which dequantizes the history for the model's own attention, stays the CPU's and the
    reference). ``max_cache_len``: fixed shapes for that many tokens (:class:`Int2StaticLayer`): a decode step can be
    captured in a CUDA graph (:func:`kvtool.runtime.graphs.capture_graph`).
    """

    def __init__(self, spec: KVQuantSpec, num_layers: int, fused: bool | None = None,
                 max_cache_len: int | None = None):
        if spec.bits != 2:
            raise KvtoolError(f"Int2Cache stores 2-bit codes; {spec.source} was exported with --bits {spec.bits}: "
                              "re-export with --bits 2")
        if spec.group_size % 4:
            raise KvtoolError(f"the INT2 packing needs a group size divisible by 4, the export has {spec.group_size}")
        self.spec = spec
        if max_cache_len is not None:  # fixed shapes: decode steps capturable in a CUDA graph (Int2StaticLayer)
            if fused is False:
                raise KvtoolError("a static Int2Cache (max_cache_len) decodes through the fused kernel: drop "
                                  "fused=False or max_cache_len")
            layers: list[Int2Layer] = [Int2StaticLayer(spec, i, max_cache_len) for i in range(num_layers)]
        else:
            layers = [Int2Layer(spec, i, fused) for i in range(num_layers)]
        super().__init__(layers=layers)

    @classmethod
    def from_export(cls, path: str | Path, model: Any = None, *, residual_window: int | None = None,
                    sink: int | None = None, fused: bool | None = None,
                    max_cache_len: int | None = None) -> Int2Cache:
        """The cache an export describes. With ``model`` (a loaded HF model or kvtool ``LoadedModel``) the export
        is checked against it (same shapes, and made from the same weights — kvtool.json's model hash — unless the
        model is the export's own folded checkpoint) and the cache is bound to it (:meth:`bind`)."""
        path = Path(path).expanduser()
        cfg_file = path / "quantization_config.json"
        if not cfg_file.is_file():
            raise KvtoolError(f"{path} has no quantization_config.json: give a folder written by `kvtool export`")
        raw = json.loads(cfg_file.read_text())
        shapes = (raw.get("num_layers"), raw.get("num_kv_heads"), raw.get("head_dim"))
        if model is not None:
            check_export_matches(path, model)
        spec = load_oscar_spec(path, head_dim=shapes[2], num_layers=shapes[0], num_kv_heads=shapes[1],
                               residual_window=residual_window, sink=sink)
        cache = cls(spec, shapes[0], fused, max_cache_len)
        if model is not None:
            cache.bind(model.model if hasattr(model, "model_hash") else model)
        return cache

    def bind(self, model: Any) -> Int2Cache:
        """Let ``model``'s attention decode through this cache's fused kernel: each attention module reads its
        layer, and the model's attention implementation becomes :func:`int2_attention` (which runs the model's
        previous implementation for everything but a fused decode step). Returns the cache."""
        _register()
        config = model.config
        previous = config._attn_implementation
        for layer, attn in zip(self.layers, (block.self_attn for block in model.model.layers), strict=True):
            if previous != FUSED_IMPL:
                attn._kvtool_int2_fallback = previous
            attn._kvtool_int2_layer = layer
            layer.bound = True
        config._attn_implementation_internal = FUSED_IMPL
        return self

    def nbytes(self) -> dict[str, int]:
        """Bytes held by all layers: full precision, the 2-bit tokens, and the 2-bit pool as allocated."""
        out = {"full_precision": 0, "int2": 0, "int2_allocated": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        return out


def int2_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any
                   ) -> tuple[torch.Tensor, None]:
    """transformers attention interface: a decode step the bound Int2Cache prepared runs the fused INT2 kernel;
    anything else (prefill, an unbound cache, another cache) runs the model's previous implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layer = getattr(module, "_kvtool_int2_layer", None)
    if layer is not None and layer.pending is not None:
        return layer.attend(query, scaling), None
    previous = getattr(module, "_kvtool_int2_fallback", "sdpa")
    fn = ALL_ATTENTION_FUNCTIONS.get(previous) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    return fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FUSED_IMPL, int2_attention)
    AttentionMaskInterface.register(FUSED_IMPL, sdpa_mask)


def check_export_matches(export: Path, model: Any) -> None:
    """Raise KvtoolError unless the export at ``export`` was made for ``model``: same shapes always; same weights
    (kvtool.json's model hash) when ``model`` is a kvtool ``LoadedModel`` (a bare HF module has no file hash),
    unless it is the export's own folded checkpoint."""
    from kvtool.models import arch_spec_from_config

    hf = model.model if hasattr(model, "model_hash") else model
    spec = getattr(model, "spec", None) or arch_spec_from_config(hf.config)
    raw = json.loads((export / "quantization_config.json").read_text())
    want = (raw.get("num_layers"), raw.get("num_kv_heads"), raw.get("head_dim"))
    have = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if want != have:
        raise KvtoolError(f"{export} was exported for a model with (layers, kv heads, head_dim) = {want}, this model "
                          f"has {have}: export it for this model")
    own = getattr(model, "model_hash", None)
    manifest_file = export / "kvtool.json"
    if own is None or not manifest_file.is_file():
        return
    source_hash = (json.loads(manifest_file.read_text()).get("model") or {}).get("hash")
    path = getattr(model, "path", None)
    folded_here = path is not None and Path(path).expanduser().resolve() == export.resolve()
    if source_hash and own != source_hash and not folded_here:
        raise KvtoolError(f"{export} was exported from other weights ({source_hash[:19]}...) than this model "
                          f"({own[:19]}...): export it for this model")
