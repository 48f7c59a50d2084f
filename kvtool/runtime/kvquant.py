"""KV-cache quantizer model and fake-quantization hooks that run a model with its KV cache quantized.

Quantizer
---------
Asymmetric uniform quantization with ``bits`` (2 or 4) and groups of ``group_size`` consecutive elements along
head_dim (default: the whole head), one scale and one zero (offset) per token, head and group. With a clip ratio
``a`` in (0, 1] the group's range [lo, hi] shrinks around its midpoint to ``[m - a*h, m + a*h]`` (m = (lo+hi)/2,
h = (hi-lo)/2), then::

    scale = 2*a*h / (2**bits - 1)     zero = m - a*h     code = clamp(floor((x - zero) / scale + 1/2), 0, 2**bits - 1)
    x_hat = fp16(zero) + fp16(scale) * code           (scale and zero are stored in fp16, as the INT2 cache does)

Methods (``--kv-quant``):

* ``int2`` / ``int4`` - per-token keys and values, no rotation;
* ``hadamard-int2`` - keys and values rotated by a randomized Hadamard matrix (seeded signs) before per-token INT2
  (QuaRot-style; rotations are orthogonal, so q·k and the value path are unchanged before quantization);
* ``kivi-int2`` - KIVI: keys per *channel* (each channel's scale/zero over chunks of ``group_size`` consecutive
  tokens, so the same number of elements share a scale as in the per-token methods), values per token;
* an OSCAR folder (``kvtool export``) - per-layer, per-KV-head rotations ``R_k``, ``R_v`` and clip ratios.

Rotations act on rows: a key ``k`` (after RoPE) is stored as ``k' = R_k k``; every query head of the group uses
``q' = R_k q`` so ``q'·k' = q·k``; values are stored as ``v' = R_v v`` and the attention output is rotated back by
``R_vᵀ`` (foldable into W_o). The emulation computes ``q · (R_kᵀ Q(R_k k))``, which equals ``q' · Q(k')``.

How decode is emulated in one prefill-style pass
------------------------------------------------
At decode step ``i`` the cache holds keys/values of positions ``0..i`` (the current token's own K/V included).
Kvtool's decode model keeps full precision for the first ``sink`` positions and for the ``residual_window``
most recent positions ``i-W+1..i``; every other position ``j`` is read from the quantized cache. With per-token
quantization the quantized value of position ``j`` does not depend on ``i`` (it was quantized once, when it left
the window), so a whole window of queries can be scored at once::

    quantized(i, j) = (j >= sink) and (i - j >= W)                          [per-token keys and values]
    KIVI keys:        quantized(i, j) also needs j's token chunk complete at step i (chunk_end(j) - 1 <= i);
                      chunks are [sink + c*g, sink + (c+1)*g)

    logits(i, j) = q_i · (K_hat[j] if quantized(i, j) else K[j])        (same for values in the output)

:func:`kv_quantization` installs this as a transformers attention implementation (registered as
``kvtool_kvquant``, with SDPA's mask builder) on a loaded model for the duration of a ``with`` block, so
``kvtool.evaluate.perplexity`` scores every held-out token exactly as a decoder with that cache would see it.
``tests/runtime/test_kvquant.py`` checks it against a token-by-token decode with a stateful quantized cache.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtool.errors import KvtoolError

IMPL_NAME = "kvtool_kvquant"
BUILTIN_METHODS = ("int2", "int4", "hadamard-int2", "kivi-int2")
SUPPORTED_BITS = (2, 4)


# ------------------------------------------------------------------------------------------------ quantizer

def check_bits_group(bits: int, group_size: int, head_dim: int) -> None:
    """Raise KvtoolError for bits other than 2/4 or a group size that does not divide head_dim."""
    if bits not in SUPPORTED_BITS:
        raise KvtoolError(f"--bits {bits} is not supported: use 2 or 4")
    if group_size <= 0 or head_dim % group_size:
        raise KvtoolError(f"--group-size {group_size} does not divide head_dim {head_dim}: "
                          f"use a divisor of {head_dim} (default: {head_dim})")


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of the last dim in groups: returns (codes [..., d] int, scale, zero [..., d/g]).

    ``clip`` broadcasts against ``x[..., :1]`` (e.g. a float or a tensor [..., 1]).
    """
    *lead, d = x.shape
    xg = x.reshape(*lead, d // group_size, group_size)
    lo, hi = xg.amin(-1), xg.amax(-1)
    clip = torch.as_tensor(clip, dtype=x.dtype, device=x.device)
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * clip
    levels = 2 ** bits - 1
    zero = mid - half
    scale = (2 * half / levels).clamp_min(torch.finfo(x.dtype).tiny ** 0.5)
    codes = torch.clamp(torch.floor((xg - zero[..., None]) / scale[..., None] + 0.5), 0, levels)
    return codes.reshape(*lead, d), scale, zero


def quantile_clip(x: torch.Tensor, quantile: float | None) -> torch.Tensor:
    """Clamp every row (last dim) of ``x`` to ``[-t, t]``, t = the ``quantile`` order statistic of ``|row|``
    (index ``min(int(quantile * d), d - 1)`` of the sorted magnitudes): OSCAR's released per-(token, head) clip.
    None or a quantile >= 1 leaves ``x`` unchanged."""
    if quantile is None or quantile >= 1.0:
        return x
    d = x.shape[-1]
    thr = x.abs().sort(dim=-1).values[..., min(int(quantile * d), d - 1)].unsqueeze(-1)
    return torch.minimum(torch.maximum(x, -thr), thr)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: ``zero + scale * code`` per group."""
    *lead, d = codes.shape
    cg = codes.reshape(*lead, d // group_size, group_size).to(scale.dtype)
    return (zero[..., None] + scale[..., None] * cg).reshape(*lead, d)


def fake_quantize(x: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize and dequantize the last dim of ``x`` in groups (per token), as the cache stores it: codes from the
    exact scale and zero, which are then kept in fp16 (the INT2 cache's and kernels' storage format)."""
    codes, scale, zero = quantize_groups(x, bits, group_size, clip)
    return dequantize_groups(codes, scale.half().to(x.dtype), zero.half().to(x.dtype), group_size)


def fake_quantize_per_channel(k: torch.Tensor, bits: int, chunk: int, start: int) -> torch.Tensor:
    """KIVI keys: quantize each channel over chunks of ``chunk`` tokens starting at ``start`` (k: [B, G, S, d]).

    Positions before ``start`` and in the trailing incomplete chunk are returned unchanged (they are never read
    quantized: see :func:`quantized_mask`).
    """
    s = k.shape[2]
    n = (s - start) // chunk if s > start else 0
    if n == 0:
        return k.clone()
    body = k[:, :, start:start + n * chunk]  # [B, G, n*chunk, d]
    b, g, _, d = body.shape
    t = body.reshape(b, g, n, chunk, d).transpose(-1, -2)  # [B, G, n, d, chunk]: quantize along tokens
    fq = fake_quantize(t, bits, chunk).transpose(-1, -2).reshape(b, g, n * chunk, d)
    out = k.clone()
    out[:, :, start:start + n * chunk] = fq
    return out


def quantized_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sink: int,
                   chunk: int | None = None, prefill: int = 0) -> torch.Tensor:
    """Bool [Lq, Lk]: True where query position i reads key/value position j from the quantized cache.

    ``chunk`` (KIVI keys) additionally requires j's token chunk (counted from ``sink``) to be complete at step i.
    ``prefill`` = P: queries i < P (a prompt prefilled in full precision) read nothing quantized.
    """
    i, j = q_pos[:, None], k_pos[None, :]
    mask = (j >= sink) & (i - j >= window) & (i >= prefill)
    if chunk is not None:
        chunk_end = sink + ((j - sink) // chunk + 1) * chunk
        mask &= chunk_end - 1 <= i
    return mask


def hadamard(d: int, seed: int = 0, signs: bool = True) -> torch.Tensor:
    """Orthonormal (randomized) Hadamard matrix [d, d] in float64: Sylvester H/sqrt(d) times seeded ±1 columns.

    For d not a power of two a seeded random orthogonal matrix (QR of a Gaussian) stands in.
    """
    gen = torch.Generator().manual_seed(seed)
    if d & (d - 1):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(d)
    if signs:
        h = h * (torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1)[None, :]
    return h


# ------------------------------------------------------------------------------------------------ method spec

@dataclass
class KVQuantSpec:
    """What to do to the KV cache: method, bits, group size, full-precision windows and per-layer tensors.

    ``k_rotation[i]``/``v_rotation[i]``: [G, d, d] (row convention ``k' = R k``) or None (identity);
    ``k_clip[i]``/``v_clip[i]``: [G] clip ratios or None (1.0). ``v_folded``: R_v already folded into W_v/W_o.
    """

    method: str
    bits: int = 2
    group_size: int | None = None
    residual_window: int = 0
    sink: int = 0
    key_granularity: str = "per-token"  # or "per-channel" (KIVI)
    k_rotation: dict[int, torch.Tensor] = field(default_factory=dict)
    v_rotation: dict[int, torch.Tensor] = field(default_factory=dict)
    k_clip: dict[int, torch.Tensor] = field(default_factory=dict)
    v_clip: dict[int, torch.Tensor] = field(default_factory=dict)
    v_folded: bool = False
    source: str | None = None
    k_quantile: float | None = None  # OSCAR as released: clamp each rotated row at this quantile of |row|
    v_quantile: float | None = None
    prefill: int = 0  # positions < prefill are a prompt prefilled in full precision (generation emulation)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (no tensors)."""
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "residual_window": self.residual_window, "sink": self.sink,
                "key_granularity": self.key_granularity, "v_folded": self.v_folded, "source": self.source,
                "k_quantile": self.k_quantile, "v_quantile": self.v_quantile}


def resolve_kv_quant(value: str, *, head_dim: int, num_layers: int, num_kv_heads: int, group_size: int | None = None,
                     residual_window: int | None = None, sink: int | None = None, seed: int = 0) -> KVQuantSpec:
    """Turn a ``--kv-quant`` value (a method name or an OSCAR folder) into a :class:`KVQuantSpec`.

    For an OSCAR folder, bits/group size come from its ``quantization_config.json``; windows default to the
    folder's values unless given.
    """
    path = Path(value).expanduser()
    if value in BUILTIN_METHODS:
        bits = 4 if value == "int4" else 2
        gs = group_size or head_dim
        check_bits_group(bits, gs, head_dim)
        spec = KVQuantSpec(method=value, bits=bits, group_size=gs, residual_window=residual_window or 0,
                           sink=sink or 0, key_granularity="per-channel" if value == "kivi-int2" else "per-token")
        if value == "hadamard-int2":
            h = hadamard(head_dim, seed).to(torch.float32)
            rot = h.T.contiguous()[None].expand(num_kv_heads, -1, -1)  # rows: k' = Hᵀ k
            spec.k_rotation = {i: rot for i in range(num_layers)}
            spec.v_rotation = {i: rot for i in range(num_layers)}
        return spec
    if path.is_dir():
        return load_oscar_spec(path, head_dim=head_dim, num_layers=num_layers, num_kv_heads=num_kv_heads,
                               group_size=group_size, residual_window=residual_window, sink=sink)
    raise KvtoolError(f"--kv-quant {value!r} is neither a method ({', '.join(BUILTIN_METHODS)}) nor an existing "
                      "folder written by `kvtool export`: give one of those")


def flat_oscar_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields kvtool reads from an export's ``quantization_config.json`` (format 2, with ``kv_cache_scheme``;
    format 1, flat, as kvtool 0.2 wrote it): bits, group_size, sink, residual_window, v_rotation_folded, quantiles."""
    if "kv_cache_scheme" not in cfg:
        return cfg
    scheme, clip = cfg["kv_cache_scheme"], cfg.get("clipping") or {}
    fp, rot = cfg.get("full_precision") or {}, cfg.get("rotations") or {}
    return {"bits": scheme["num_bits"], "group_size": scheme["group_size"], "sink": fp.get("sink", 0),
            "residual_window": fp.get("residual_window", 0), "v_rotation_folded": rot.get("value_folded", False),
            "k_quantile": clip.get("key_quantile"), "v_quantile": clip.get("value_quantile")}


def load_oscar_spec(path: Path, *, head_dim: int, num_layers: int, num_kv_heads: int, group_size: int | None = None,
                    residual_window: int | None = None, sink: int | None = None) -> KVQuantSpec:
    """Read an OSCAR export folder (``oscar.safetensors`` + ``quantization_config.json``)."""
    from safetensors.torch import load_file

    cfg_file, tensors_file = path / "quantization_config.json", path / "oscar.safetensors"
    if not cfg_file.is_file() or not tensors_file.is_file():
        raise KvtoolError(f"{path} has no quantization_config.json/oscar.safetensors: give a folder written by "
                          "`kvtool export`")
    cfg = flat_oscar_config(json.loads(cfg_file.read_text()))
    if group_size is not None and group_size != cfg["group_size"]:
        raise KvtoolError(f"--group-size {group_size} differs from the export's group size {cfg['group_size']}: "
                          "drop --group-size or re-export with it")
    tensors = load_file(str(tensors_file))
    spec = KVQuantSpec(method="oscar", bits=int(cfg["bits"]), group_size=int(cfg["group_size"]),
                       residual_window=cfg.get("residual_window", 0) if residual_window is None else residual_window,
                       sink=cfg.get("sink", 0) if sink is None else sink, v_folded=bool(cfg.get("v_rotation_folded")),
                       source=str(path), k_quantile=cfg.get("k_quantile"), v_quantile=cfg.get("v_quantile"))
    check_bits_group(spec.bits, spec.group_size, head_dim)
    for i in range(num_layers):
        key = f"layers.{i}.k_rotation"
        if key not in tensors:
            raise KvtoolError(f"{tensors_file} lacks {key}: the export was made for another model; re-export it")
        if tensors[key].shape != (num_kv_heads, head_dim, head_dim):
            raise KvtoolError(f"{key} has shape {tuple(tensors[key].shape)}, expected "
                              f"{(num_kv_heads, head_dim, head_dim)}: the export was made for another model")
        spec.k_rotation[i] = tensors[key].float()
        spec.k_clip[i] = tensors[f"layers.{i}.k_clip"].float()
        spec.v_clip[i] = tensors[f"layers.{i}.v_clip"].float()
        if not spec.v_folded:
            spec.v_rotation[i] = tensors[f"layers.{i}.v_rotation"].float()
    return spec


# ------------------------------------------------------------------------------------------------ emulation

def rotate_rows(x: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
    """x [B, G, S, d] -> rows rotated per KV head: x @ R[g]ᵀ, in ``x``'s dtype.

    Computed in float64 and rounded once: a rotated value then does not depend on how many rows are rotated together
    (a matrix product's blocking changes float32 sums in the last bit, which flips INT2 codes at rounding ties), so the
    2-bit cache, rotating tokens as they leave the recent window, and the perplexity emulation, rotating a whole
    window, quantize the same values to the same codes."""
    return x if rot is None else torch.einsum("bgsd,ged->bgse", x.double(), rot.double()).to(x.dtype)


def _unrotate(x: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
    return x if rot is None else torch.einsum("bgse,ged->bgsd", x, rot.to(x))


def quantize_kv(spec: KVQuantSpec, layer: int, key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized, back-rotated keys and values [B, G, S, d] as read from the quantized cache (float32)."""
    gs = spec.group_size or key.shape[-1]
    key, value = key.float(), value.float()
    k_rot, v_rot = spec.k_rotation.get(layer), spec.v_rotation.get(layer)
    k_clip = spec.k_clip.get(layer)
    v_clip = spec.v_clip.get(layer)
    kc = 1.0 if k_clip is None else k_clip.to(key)[None, :, None, None]
    vc = 1.0 if v_clip is None else v_clip.to(key)[None, :, None, None]
    if spec.key_granularity == "per-channel":
        k_hat = fake_quantize_per_channel(key, spec.bits, gs, spec.sink)
    else:
        k_hat = _unrotate(fake_quantize(quantile_clip(rotate_rows(key, k_rot), spec.k_quantile), spec.bits, gs, kc),
                          k_rot)
    v_hat = _unrotate(fake_quantize(quantile_clip(rotate_rows(value, v_rot), spec.v_quantile), spec.bits, gs, vc),
                      v_rot)
    return k_hat, v_hat


def kvquant_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention with a quantized KV cache (transformers attention-interface signature).

    query [B, H, L, d]; key/value [B, G, S, d] (after RoPE); returns [B, L, H, d]. Keys/values outside the
    full-precision sink/residual window of each query are read dequantized (see the module docstring).
    """
    spec: KVQuantSpec | None = getattr(module, "_kvtool_kvquant", None)
    capture = getattr(module, "_kvtool_capture", None)
    if capture is not None:
        capture(module, query, key, value)
    b, h, lq, d = query.shape
    g, s = key.shape[1], key.shape[2]
    rep = h // g
    scaling = scaling if scaling is not None else d ** -0.5
    q = query.float().reshape(b, g, rep, lq, d)
    q_pos = torch.arange(s - lq, s, device=query.device)
    k_pos = torch.arange(s, device=query.device)
    logits = torch.einsum("bgrld,bgsd->bgrls", q, key.float())
    vals = value.float()
    if spec is not None:
        k_hat, v_hat = quantize_kv(spec, module.layer_idx, key, value)
        gs = spec.group_size or d
        mk = quantized_mask(q_pos, k_pos, spec.residual_window, spec.sink,
                            gs if spec.key_granularity == "per-channel" else None, spec.prefill)
        mv = quantized_mask(q_pos, k_pos, spec.residual_window, spec.sink, prefill=spec.prefill)
        logits = torch.where(mk, torch.einsum("bgrld,bgsd->bgrls", q, k_hat), logits)
    logits = logits * scaling
    causal = k_pos[None, :] <= q_pos[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    if attention_mask is not None:
        am = attention_mask[:, :, -lq:, :s]
        am = am.reshape(am.shape[0], -1, 1, lq, s) if am.shape[1] > 1 else am[:, :, None]
        if am.dtype == torch.bool:
            logits = logits.masked_fill(~am, float("-inf"))
        else:
            logits = logits + am.float()
    probs = torch.softmax(logits, dim=-1)
    if spec is None:
        out = torch.einsum("bgrls,bgsd->bgrld", probs, vals)
    else:
        pq = probs * mv
        out = torch.einsum("bgrls,bgsd->bgrld", probs - pq, vals) + torch.einsum("bgrls,bgsd->bgrld", pq, v_hat)
    out = out.reshape(b, h, lq, d).transpose(1, 2).contiguous().to(query.dtype)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, kvquant_attention)
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


@contextlib.contextmanager
def kv_quantization(model: nn.Module, spec: KVQuantSpec | None, capture: Any = None) -> Iterator[nn.Module]:
    """Within the block, ``model`` attends through :func:`kvquant_attention` with ``spec`` (None: exact attention).

    ``capture(module, query, key, value)``, if given, is called with every layer's post-RoPE queries, keys and
    values ([B, heads, L, d]).
    """
    _register()
    config = model.config
    previous = config._attn_implementation
    modules = _attention_modules(model)
    for m in modules:
        m._kvtool_kvquant = spec
        m._kvtool_capture = capture
    config._attn_implementation_internal = IMPL_NAME
    try:
        yield model
    finally:
        config._attn_implementation_internal = previous
        for m in modules:
            del m._kvtool_kvquant
            del m._kvtool_capture


def with_windows(spec: KVQuantSpec, residual_window: int | None, sink: int | None) -> KVQuantSpec:
    """A copy of ``spec`` with windows replaced where given."""
    return replace(spec, residual_window=spec.residual_window if residual_window is None else residual_window,
                   sink=spec.sink if sink is None else sink)


def kv_bits_per_element(spec: KVQuantSpec, head_dim: int) -> float:
    """Storage bits per cached K/V element in the quantized part: code bits + fp16 scale and zero per group."""
    gs = spec.group_size or head_dim
    return spec.bits + 32 / gs


def perplexity_with_kv_quant(loaded: Any, tokens: torch.Tensor, spec: KVQuantSpec | None, *, seq_len: int = 512,
                             stride: int | None = None, batch_size: int = 4, progress: bool = False
                             ) -> dict[str, Any]:
    """Held-out perplexity of a loaded model with its KV cache quantized per ``spec`` (None: exact)."""
    from kvtool.evaluate import perplexity

    with kv_quantization(loaded.model, spec):
        result = perplexity(loaded.model, tokens, seq_len, stride, batch_size, progress=progress)
    if spec is not None:
        result["kv_quant"] = spec.describe()
        result["kv_bits_per_element"] = kv_bits_per_element(spec, loaded.spec.head_dim)
    return result


@torch.no_grad()
def eval_kv_quant(loaded: Any, tokens: torch.Tensor, kv_quant: str, group_size: int | None,
                  residual_window: int | None, sink: int | None, **kwargs: Any) -> dict[str, Any]:
    """``kvtool eval --kv-quant``: resolve the method for the loaded model and score ``tokens`` with it."""
    spec = loaded.spec
    if spec is None:
        raise KvtoolError(f"--kv-quant needs a Llama/Qwen2/Qwen3/Mistral model; {loaded.source} is not one: "
                          "drop --kv-quant")
    if (residual_window is not None and residual_window < 0) or (sink is not None and sink < 0):
        raise KvtoolError("--residual-window and --sink must be >= 0")
    if Path(kv_quant).expanduser().is_dir() and (Path(kv_quant).expanduser() / "quantization_config.json").is_file():
        from kvtool.runtime.int2_cache import check_export_matches

        check_export_matches(Path(kv_quant).expanduser(), loaded)  # shapes, and the weights it was exported from
    qspec = resolve_kv_quant(kv_quant, head_dim=spec.head_dim, num_layers=spec.num_layers,
                             num_kv_heads=spec.num_kv_heads, group_size=group_size, residual_window=residual_window,
                             sink=sink)
    result = perplexity_with_kv_quant(loaded, tokens, qspec, **kwargs)
    label = "oscar" if qspec.method == "oscar" else qspec.method
    result["kv_quant"]["label"] = (f"{label} g{qspec.group_size} sink {qspec.sink} recent {qspec.residual_window}"
                                   f" ({result['kv_bits_per_element']:.2f} bits/elem)")
    return result
