"""DeepSeek-V3 checkpoints (``kvtool convert-mla --format deepseek-v3``) run over their latent cache.

Transformers' ``DeepseekV3Attention`` expands the cached latent into per-head keys and values at every step (a
decode step reads and writes n_h·(d_nope + d_rope + d_v) values per cached token, and slows with context).
:class:`LatentAttention` keeps the module's parameters (same names, so the state dict is unchanged) and
decodes single tokens absorbed, through :func:`kvtool.kernels.mla_decode.mla_decode_shared`: each head's nope
query goes through its W_UK slice into latent space, every head attends over the one cached row
[c_KV | k_pe] (c_KV read once, as key and value), and the latent output goes through each head's W_UV.

The cache holds what transformers >= 5.25 stores for this model: the "key" slot the normalized latent c_KV
[B, 1, T, kv_lora_rank], the "value" slot the RoPE'd k_pe [B, 1, T, d_rope]. Prompts (more than one token) and
steps off CUDA take the expanded PyTorch path, the reference.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from kvtool.runtime.hf_cache import take_cache
from kvtool.runtime.mla import static_lengths

_MODULE_PARTS = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                 "kv_b_proj", "o_proj")


class LatentAttention(nn.Module):
    """A ``DeepseekV3Attention``'s parameters, run over the latent cache (see the module docstring)."""

    def __init__(self, source: nn.Module):
        super().__init__()
        for name in ("config", "layer_idx", "num_heads", "q_lora_rank", "qk_rope_head_dim", "kv_lora_rank",
                     "v_head_dim", "qk_nope_head_dim", "qk_head_dim", "scaling", "is_causal", "attention_dropout"):
            setattr(self, name, getattr(source, name))
        self.num_key_value_groups = 1
        for name in _MODULE_PARTS:
            setattr(self, name, getattr(source, name))
        stock = sys.modules[type(source).__module__]
        self._rope = (stock.apply_rotary_pos_emb_interleave if self.config.rope_interleave
                      else stock.apply_rotary_pos_emb)
        self._eager = stock.eager_attention_forward
        # single-token steps through the kernel: None = on a CUDA device outside autograd (the default), True/False
        # = always/never (kvtool.runtime.mla.set_decode_kernel; validation compares both)
        self.use_kernel: bool | None = None

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = take_cache(kwargs)  # `cache=` (transformers >= 5.25) or `past_key_values=`
        b, length, _ = hidden_states.shape
        q = self._query(hidden_states).view(b, length, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim],
                                 dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).view(b, 1, length, self.kv_lora_rank)
        k_pe = k_pe.view(b, 1, length, self.qk_rope_head_dim)
        cos, sin = position_embeddings
        q_pe, k_pe = self._rope(q_pe, k_pe, cos, sin)
        lens = None
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)
            lens = static_lengths(cache, self.layer_idx, b)
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
        if length == 1 and cache is not None and self._decode_through_kernel(hidden_states):
            from kvtool.kernels.mla_decode import mla_decode_shared

            q_lat = torch.einsum("bhd,hdr->bhr", q_nope[:, :, 0], w_uk)
            lat = mla_decode_shared(q_lat, q_pe[:, :, 0], c_kv[:, 0], k_pe[:, 0], self.scaling, seq_lens=lens)
            out = torch.einsum("bhr,hvr->bhv", lat.to(w_uv.dtype), w_uv)
            return self.o_proj(out.reshape(b, 1, -1).to(hidden_states.dtype)), None
        total = c_kv.shape[2]
        kv = self.kv_b_proj(c_kv[:, 0]).view(b, total, self.num_heads, -1).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(b, self.num_heads, total, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = self.config._attn_implementation
        fn = self._eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS.get_interface(impl, self._eager)
        out, _ = fn(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(b, length, -1)), None

    def _decode_through_kernel(self, x: torch.Tensor) -> bool:
        if self.use_kernel is not None:
            return self.use_kernel
        return x.is_cuda and not torch.is_grad_enabled()


def use_latent_attention(model: nn.Module) -> int:
    """Swap every ``DeepseekV3Attention`` of ``model`` for :class:`LatentAttention` (in place, parameters shared;
    idempotent); returns the number of layers it runs."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LatentAttention):
                count += 1
            elif type(child).__name__ == "DeepseekV3Attention":
                setattr(module, name, LatentAttention(child))
                count += 1
    return count

