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

Attention itself is the model's own (SDPA/eager) over the returned tensors, so this path saves cache memory but not
decode time; the fused decode kernel that reads the codes directly is
:func:`kvtool.kernels.int2_kv.int2_decode_attention`.
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


class Int2Layer(CacheLayerMixin):
    """One decoder layer's 2-bit cache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, spec: KVQuantSpec, layer: int):
        super().__init__()
        self.group_size = spec.group_size
        self.sink, self.window = spec.sink, spec.residual_window
        self.k_rot, self.v_rot = spec.k_rotation.get(layer), spec.v_rotation.get(layer)
        self.k_clip, self.v_clip = spec.k_clip.get(layer), spec.v_clip.get(layer)
        self.k_quantile, self.v_quantile = spec.k_quantile, spec.v_quantile
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, g, _, d = key_states.shape
        empty = lambda width, dt: torch.zeros(b, g, 0, width, dtype=dt, device=self.device)  # noqa: E731
        ng = d // self.group_size
        self.sink_k, self.sink_v = empty(d, self.dtype), empty(d, self.dtype)
        self.recent_k, self.recent_v = empty(d, self.dtype), empty(d, self.dtype)
        self.codes_k, self.codes_v = empty(d // 4, torch.uint8), empty(d // 4, torch.uint8)
        self.scale_k, self.zero_k = empty(ng, torch.float16), empty(ng, torch.float16)
        self.scale_v, self.zero_v = empty(ng, torch.float16), empty(ng, torch.float16)
        self.is_initialized = True

    def _quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (_unpack(self.codes_k, self.scale_k, self.zero_k, self.k_rot, self.dtype),
                _unpack(self.codes_v, self.scale_v, self.zero_v, self.v_rot, self.dtype))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        deq_k, deq_v = self._quantized()
        n_new = key_states.shape[-2]
        to_sink = max(0, min(self.sink - self.length, n_new))
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
        self.length += n_new
        # at the next call (first position = self.length) token j stays full precision iff self.length - j < W
        leave = max(0, self.recent_k.shape[-2] - max(self.window - 1, 0))
        if leave:
            self._append_quantized(self.recent_k[..., :leave, :], self.recent_v[..., :leave, :])
            self.recent_k, self.recent_v = self.recent_k[..., leave:, :], self.recent_v[..., leave:, :]
        return keys, values

    def _append_quantized(self, k: torch.Tensor, v: torch.Tensor) -> None:
        ck, sk, zk = _pack(k, self.k_rot, self.k_clip, self.k_quantile, self.group_size)
        cv, sv, zv = _pack(v, self.v_rot, self.v_clip, self.v_quantile, self.group_size)
        self.codes_k, self.scale_k, self.zero_k = (torch.cat([a, b], dim=-2) for a, b in
                                                   ((self.codes_k, ck), (self.scale_k, sk), (self.zero_k, zk)))
        self.codes_v, self.scale_v, self.zero_v = (torch.cat([a, b], dim=-2) for a, b in
                                                   ((self.codes_v, cv), (self.scale_v, sv), (self.zero_v, zv)))

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in ("sink_k", "sink_v", "recent_k", "recent_v", "codes_k", "codes_v", "scale_k", "zero_k",
                         "scale_v", "zero_v"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

    def nbytes(self) -> dict[str, int]:
        """Bytes held: full-precision tokens (sink + recent) and the 2-bit part (codes + scales + zeros)."""
        if not self.is_initialized:
            return {"full_precision": 0, "int2": 0}
        fp = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v))
        q = sum(t.numel() * t.element_size() for t in (self.codes_k, self.codes_v, self.scale_k, self.zero_k,
                                                       self.scale_v, self.zero_v))
        return {"full_precision": fp, "int2": q}


class Int2Cache(Cache):
    """2-bit KV cache built from a ``kvtool export`` folder (OSCAR rotations, clips, windows)."""

    def __init__(self, spec: KVQuantSpec, num_layers: int):
        if spec.bits != 2:
            raise KvtoolError(f"Int2Cache stores 2-bit codes; {spec.source} was exported with --bits {spec.bits}: "
                              "re-export with --bits 2")
        if spec.group_size % 4:
            raise KvtoolError(f"the INT2 packing needs a group size divisible by 4, the export has {spec.group_size}")
        self.spec = spec
        super().__init__(layers=[Int2Layer(spec, i) for i in range(num_layers)])

    @classmethod
    def from_export(cls, path: str | Path, model: Any = None, *, residual_window: int | None = None,
                    sink: int | None = None) -> Int2Cache:
        """The cache an export describes. With ``model`` (a loaded HF model or kvtool ``LoadedModel``) the export
        is checked against it: same shapes, and made from the same weights (kvtool.json's model hash) unless the
        model is the export's own folded checkpoint."""
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
        return cls(spec, shapes[0])

    def nbytes(self) -> dict[str, int]:
        """Bytes held by all layers: full precision and 2-bit parts."""
        out = {"full_precision": 0, "int2": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        return out


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
