"""kvtool's MLA checkpoint format (written by ``kvtool convert-mla --format kvtool``).

A converted model is its source architecture (Llama, Qwen2, Qwen3, Mistral) with each layer's attention
replaced by :class:`MlaAttention`. Config: the source's fields plus ``kvtool_source_model_type``,
``mla_kv_ranks`` ([r_K, r_V] per layer, per-layer ranks allowed), ``mla_rope`` (keep | decoupled),
``mla_rope_dim`` and ``mla_rope_pairs`` (decoupled: the source frequency pairs kept in the shared rope key).

Per-layer tensors (``model.layers.{i}.self_attn.``):
    ``kv_a_k.weight`` [r_K, D], ``kv_a_v.weight`` [r_V, D]   down-projections; their outputs are the cache
    ``k_b.weight``  keep: [g*d, r_K] (+bias); decoupled: [n_h*d, r_K] (each query head's nope key map)
    ``v_b.weight``  [g*d, r_V] (+bias)                   each query head reads its KV group's slice
    ``k_pe.weight`` decoupled only: [d_rope, D]          shared rope key, half-split order of the kept pairs
    ``q_proj``      keep: unchanged; decoupled: [n_h*(d + d_rope), D] (per head: d nope, then d_rope rope rows)

Decoupled checkpoints written before kvtool 0.3 (no ``mla_nope_head_dim`` in the config) have one shared nope key
instead: ``k_b`` [g*d - d_rope, r_K] and ``q_proj`` [n_h*g*d, D], g times the source's query path; they still load.
Decoupled attention is absorbed: each head's nope query goes through its slice of ``k_b`` into latent space, and
every head attends over the one latent row [c_K | k_pe] with values c_V (no per-head keys or values are built).
    ``o_proj``, ``q_norm``/``k_norm`` (Qwen3, keep only) unchanged.

The HF cache stores the latent: the "key" slot holds c_K (keep) or [c_K | RoPE(k_pe)] (decoupled), the "value"
slot c_V, both as one head, so generation caches r_K + r_V (+ d_rope) values per token per layer.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from kvtool.runtime.hf_cache import take_cache
from kvtool.runtime.rope import apply_rope

SOURCES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def _eager_attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, scaling: float, **_: Any) -> tuple[torch.Tensor, None]:
    """q [B, H, L, dk], k [B, G, T, dk], v [B, G, T, dv] (H a multiple of G; the latent layouts have G = 1):
    grouped products, the keys and values never repeated per head. Returns [B, L, H, dv]."""
    b, h, length, _ = q.shape
    g = k.shape[1]
    qg = q.view(b, g, h // g, length, q.shape[-1])
    w = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scaling  # [B, G, H/G, L, T]
    if mask is not None:
        w = w + mask[..., : k.shape[-2]][:, :, None]
    elif length > 1:
        causal = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - length)
        w = w.masked_fill(~causal, float("-inf"))
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v[:, :, None]).reshape(b, h, length, v.shape[-1])
    return out.transpose(1, 2).contiguous(), None


class MlaAttention(nn.Module):
    """Latent-cache attention built from a source attention module (reuses its q_proj, o_proj, norms)."""

    def __init__(self, source: nn.Module, config: Any, layer_idx: int):
        super().__init__()
        from kvtool.models import arch_spec_from_config

        spec = arch_spec_from_config(config)
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_key_value_groups = spec.group_size
        self.scaling = spec.head_dim ** -0.5
        self.is_causal = True
        self.attention_dropout = 0.0
        self.rope_mode = config.mla_rope
        r_k, r_v = config.mla_kv_ranks[layer_idx]
        d, g, hidden = spec.head_dim, spec.num_kv_heads, spec.hidden_size
        self.o_proj = source.o_proj
        self.kv_a_k = nn.Linear(hidden, r_k, bias=False)
        self.kv_a_v = nn.Linear(hidden, r_v, bias=False)
        self.v_b = nn.Linear(r_v, g * d, bias=spec.qkv_bias)
        if self.rope_mode == "keep":
            self.q_proj = source.q_proj
            self.k_b = nn.Linear(r_k, g * d, bias=spec.qkv_bias)
            if spec.qk_norm:
                self.q_norm, self.k_norm = source.q_norm, source.k_norm
            self.qk_norm = spec.qk_norm
        else:
            self.rope_dim = config.mla_rope_dim
            # per-head nope (the lean layout, kvtool >= 0.3): each query head has head_dim nope channels and its
            # own slice of k_b; shared (older checkpoints): one g*d - rope nope key read by every head
            self.per_head_nope = getattr(config, "mla_nope_head_dim", None) is not None
            self.nope_dim = config.mla_nope_head_dim if self.per_head_nope else g * d - self.rope_dim
            k_rows = spec.num_heads * self.nope_dim if self.per_head_nope else self.nope_dim
            self.q_proj = nn.Linear(hidden, spec.num_heads * (self.nope_dim + self.rope_dim), bias=False)
            self.k_b = nn.Linear(r_k, k_rows, bias=False)
            if self.per_head_nope:  # attention runs over one latent key/value head (what repeat_kv reads)
                self.num_key_value_groups = spec.num_heads
            self.k_pe = nn.Linear(hidden, self.rope_dim, bias=False)
            pairs = list(config.mla_rope_pairs[layer_idx])
            # a plain list, not a buffer: from_pretrained builds on the meta device and would leave it garbage
            self._rope_channels = pairs + [p + d // 2 for p in pairs]
        self._rotary: list[nn.Module] = []  # the model's rotary embedding (a list: not a submodule)
        # decode steps through kvtool.kernels.mla_decode: None = on a CUDA device outside autograd (the default
        # fast path), True/False = always/never (set_decode_kernel; validate compares both)
        self.use_kernel: bool | None = None
        self.kernel_supported = self.rope_mode == "decoupled" or (d >= 32 and d & (d - 1) == 0)

    @property
    def rope_index(self) -> torch.Tensor:
        """Channels of the full-width cos/sin that belong to the kept rope pairs (half-split order)."""
        device = self.k_pe.weight.device
        cached = getattr(self, "_rope_index_cache", None)
        if cached is None or cached.device != device:
            cached = torch.tensor(self._rope_channels, dtype=torch.long, device=device)
            self._rope_index_cache = cached
        return cached

    def _key_rope(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=like.device)[None]
        return self._rotary[0](like, positions)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kwargs: Any) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = self.config._attn_implementation
        fn = _eager_attention if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS.get_interface(
            impl, _eager_attention)
        out, _ = fn(self, q, k, v, mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return out

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = take_cache(kwargs)  # `cache=` (transformers >= 5.25) or `past_key_values=`
        b, length, _ = hidden_states.shape
        cos, sin = position_embeddings
        c_k, c_v = self.kv_a_k(hidden_states), self.kv_a_v(hidden_states)
        if self.rope_mode == "decoupled":
            cos_pe, sin_pe = cos[..., self.rope_index], sin[..., self.rope_index]
            k_pe = apply_rope(self.k_pe(hidden_states)[:, :, None], cos_pe, sin_pe)[:, :, 0]
            c_k = torch.cat([c_k, k_pe], dim=-1)
        lens = None
        if cache is not None:
            c_k, c_v = cache.update(c_k[:, None], c_v[:, None], self.layer_idx)
            c_k, c_v = c_k[:, 0], c_v[:, 0]
            lens = static_lengths(cache, self.layer_idx, b)
        total = c_k.shape[1]
        if length == 1 and cache is not None and self._decode_through_kernel(hidden_states):
            return self._kernel_decode(hidden_states, cos, sin, c_k, c_v, lens), None
        v = self.v_b(c_v).view(b, total, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_mode == "keep":
            q = self.q_proj(hidden_states).view(b, length, self.num_heads, self.head_dim)
            k = self.k_b(c_k).view(b, total, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            cos_k, sin_k = (cos, sin) if total == length else self._key_rope(total, hidden_states)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos_k, sin_k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        elif self.per_head_nope:  # absorbed: every head reads the one latent key [c_K | k_pe] and value c_V (MQA)
            q = self.q_proj(hidden_states).view(b, length, self.num_heads, self.nope_dim + self.rope_dim)
            q_pe = apply_rope(q[..., self.nope_dim:], cos[..., self.rope_index], sin[..., self.rope_index])
            q_lat = self._absorb_query(q[..., : self.nope_dim])
            q = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2)  # [b, n_h, L, r_K + rope]
            lat = self._attend(q, c_k[:, None], c_v[:, None], attention_mask, **kwargs)  # [b, L, n_h, r_V]
            return self.o_proj(self._value_up(lat.reshape(b, length, self.num_heads, -1)).reshape(b, length, -1)), None
        else:
            q = self.q_proj(hidden_states).view(b, length, self.num_heads, self.nope_dim + self.rope_dim)
            q_pe = apply_rope(q[..., self.nope_dim:], cos[..., self.rope_index], sin[..., self.rope_index])
            q = torch.cat([q[..., : self.nope_dim], q_pe], dim=-1).transpose(1, 2)
            k_nope = self.k_b(c_k[..., : -self.rope_dim])
            k = torch.cat([k_nope, c_k[..., -self.rope_dim:]], dim=-1)[:, None]
            k = k.expand(b, self.num_kv_heads, total, k.shape[-1])
        out = self._attend(q, k, v, attention_mask, **kwargs)
        return self.o_proj(out.reshape(b, length, -1)), None

    def _decode_through_kernel(self, x: torch.Tensor) -> bool:
        if self.use_kernel is not None:
            return self.use_kernel
        return x.is_cuda and self.kernel_supported and not torch.is_grad_enabled()

    def _kernel_decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c_k: torch.Tensor,
                       c_v: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step through the Triton kernels (keys at positions 0..S-1, values absorbed; ``lens``: the
        valid tokens of a static cache's S slots, read on the device, so the step can be captured in a CUDA graph)."""
        from kvtool.kernels.mla_decode import mla_decode_absorbed, mla_decode_keep

        b, g, d = x.shape[0], self.num_kv_heads, self.head_dim
        if self.rope_mode == "keep":
            q = self.q_proj(x).view(b, 1, self.num_heads, d)
            if self.qk_norm:
                q = self.q_norm(q)
            q = apply_rope(q, cos, sin)[:, 0]
            w_kb = self.k_b.weight.view(g, d, -1).transpose(1, 2)
            b_k = self.k_b.bias.view(g, d) if self.k_b.bias is not None else None
            norm = (self.k_norm.weight, self.k_norm.variance_epsilon) if self.qk_norm else (None, 1e-6)
            rotary = self._rotary[0]
            lat = mla_decode_keep(q, c_k, c_v, w_kb, rotary.inv_freq, self.scaling, b_k=b_k, k_norm=norm[0],
                                  eps=norm[1], rope_scale=float(rotary.attention_scaling), seq_lens=lens)
        else:
            q = self.q_proj(x).view(b, 1, self.num_heads, self.nope_dim + self.rope_dim)
            q_pe = apply_rope(q[..., self.nope_dim:], cos[..., self.rope_index], sin[..., self.rope_index])[:, 0]
            q_lat = self._absorb_query(q[:, 0, :, : self.nope_dim])  # W_kb absorbed into the query
            lat = mla_decode_absorbed(torch.cat([q_lat, q_pe], -1), c_k, c_v, self.scaling, seq_lens=lens)
        return self.o_proj(self._value_up(lat.to(self.v_b.weight.dtype)).reshape(b, 1, -1).to(x.dtype))

    def _absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """[..., n_h, nope] -> [..., n_h, r_K]: each head's nope query through its slice of k_b (decoupled)."""
        if not self.per_head_nope:
            return q_nope @ self.k_b.weight
        w = self.k_b.weight.view(self.num_heads, self.nope_dim, -1)
        return torch.einsum("...hn,hnr->...hr", q_nope, w)

    def _value_up(self, lat: torch.Tensor) -> torch.Tensor:
        """[..., n_h, r_V] latent outputs -> [..., n_h, head_dim]: each head through its KV group's v_b."""
        g, d = self.num_kv_heads, self.head_dim
        w_vb = self.v_b.weight.view(g, d, -1)
        lat = lat.unflatten(-2, (g, self.num_heads // g))
        out = torch.einsum("...gnr,gdr->...gnd", lat, w_vb)
        if self.v_b.bias is not None:
            out = out + self.v_b.bias.view(g, 1, d)
        return out.flatten(-3, -2)


def static_lengths(cache: Any, layer_idx: int, batch: int) -> torch.Tensor | None:
    """Valid tokens per row [B] of a static cache layer after its update (its ``cumulative_length`` tensor, read
    on the device); None for a cache that returns only the valid tokens (DynamicCache)."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(layers[layer_idx], "is_compileable", False):
        return None
    count = getattr(layers[layer_idx], "cumulative_length", None)
    return count.reshape(1).expand(batch) if isinstance(count, torch.Tensor) else None


def set_decode_kernel(model: nn.Module, enabled: bool | None = True) -> int:
    """Route every latent-attention layer's single-token decode steps (kvtool MLA, and DeepSeek-V3 models run by
    :mod:`kvtool.runtime.deepseek`) through the Triton kernels (True), the PyTorch path (False) or the default
    (None: the kernels on a CUDA device outside autograd); returns the layer count."""
    from kvtool.runtime.deepseek import LatentAttention

    layers = [m for m in model.modules() if isinstance(m, (MlaAttention, LatentAttention))]
    for m in layers:
        m.use_kernel = enabled
    return len(layers)


def _make_classes(source: str, prefix: str) -> tuple[type, type]:
    mod = importlib.import_module(f"transformers.models.{source}.modeling_{source}")
    cfg_mod = importlib.import_module(f"transformers.models.{source}.configuration_{source}")
    base_cfg = getattr(cfg_mod, f"{prefix}Config")
    base_model = getattr(mod, f"{prefix}ForCausalLM")
    model_type = f"kvtool_mla_{source}"
    config_cls = type(f"KvtoolMla{prefix}Config", (base_cfg,), {"model_type": model_type})

    def __init__(self: Any, config: Any) -> None:
        base_model.__init__(self, config)
        for i, layer in enumerate(self.model.layers):
            attn = MlaAttention(layer.self_attn, config, i)
            attn._rotary.append(self.model.rotary_emb)
            layer.self_attn = attn

    model_cls = type(f"KvtoolMla{prefix}ForCausalLM", (base_model,), {"config_class": config_cls,
                                                                       "__init__": __init__})
    return config_cls, model_cls


MLA_CONFIGS: dict[str, type] = {}
MLA_MODELS: dict[str, type] = {}
for _source, _prefix in SOURCES.items():
    _cfg, _model = _make_classes(_source, _prefix)
    MLA_CONFIGS[_source], MLA_MODELS[_source] = _cfg, _model
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _model, exist_ok=True)


def mla_config(source_config: Any, ranks: list[tuple[int, int]], rope: str, rope_dim: int,
               rope_pairs: list[list[int]]) -> Any:
    """The config of a converted model: the source's fields plus the MLA fields. Decoupled checkpoints are
    written in the lean per-head layout (``mla_nope_head_dim`` = head_dim); a config without that field is the
    shared-nope layout of kvtool <= 0.2, which still loads."""
    src = source_config.to_dict()
    model_type = getattr(source_config, "kvtool_source_model_type", None) or source_config.model_type
    for k in ("model_type", "architectures", "transformers_version", "quantization_config", "auto_map"):
        src.pop(k, None)
    cfg = MLA_CONFIGS[model_type](**src)
    cfg.kvtool_source_model_type = model_type
    cfg.mla_kv_ranks = [list(map(int, r)) for r in ranks]
    cfg.mla_rope = rope
    cfg.mla_rope_dim = int(rope_dim)
    cfg.mla_rope_pairs = [list(map(int, p)) for p in rope_pairs]
    if rope == "decoupled":
        from kvtool.models import arch_spec_from_config

        cfg.mla_nope_head_dim = int(arch_spec_from_config(source_config).head_dim)
    cfg.architectures = [MLA_MODELS[model_type].__name__]
    return cfg
