"""Export a decoupled-RoPE CARE conversion in transformers' ``DeepseekV3ForCausalLM`` layout.

Layout (per layer, ``model.layers.{i}.self_attn.``):
    ``q_proj``             [n_h*(d_nope + d_rope), D]; per head [q_nope | q_pe], q_pe interleaved; scaled by
                           sqrt((d_nope+d_rope)/d) so DeepSeek's softmax scale (d_nope+d_rope)^-1/2 equals d^-1/2
    ``kv_a_proj_with_mqa`` [kv_lora_rank + d_rope, D]; rows [c_K | c_V | zero padding | k_pe (interleaved)]
    ``kv_a_layernorm``     RMSNorm over the latent; its weight is set to the calibration RMS of the latent
    ``kv_b_proj``          [n_h*(d_nope + d), kv_lora_rank]; head h: [k_b on the c_K columns; its group's v_b on
                           the c_V columns] (block-diagonal: K rows read c_K only, V rows c_V only)
    ``o_proj``             unchanged
MLPs stay dense (``first_k_dense_replace = num_hidden_layers``). kv_lora_rank is global: layers with smaller
r_K + r_V are zero-padded, which costs cache width. The only approximation beyond the conversion is
``kv_a_layernorm`` (RMSNorm is applied unconditionally by DeepSeek's attention and is scale-invariant per
token): its effect is measured by ``bench/care_quality.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvtool.convert.care import MlaLayer
from kvtool.errors import KvtoolError
from kvtool.models import ArchSpec


def _interleave(rows: torch.Tensor) -> torch.Tensor:
    """Half-split order [a_0..a_{p-1}, b_0..b_{p-1}] -> interleaved [a_0, b_0, a_1, b_1, ...] (rows)."""
    p = rows.shape[0] // 2
    return torch.stack([rows[:p], rows[p:]], dim=1).reshape(rows.shape)


def check_exportable(spec: ArchSpec | None, rope: str, rope_select: str) -> None:
    """DeepSeek-V3 layout needs decoupled RoPE on native frequencies, no attention biases, no QK-norm (the
    architecture checks are skipped when ``spec`` is None)."""
    if rope != "decoupled":
        raise KvtoolError("--format deepseek-v3 needs --rope decoupled (DeepSeek has no reconstruct-then-RoPE "
                          "path): add --rope decoupled or use --format kvtool")
    if rope_select != "uniform":
        raise KvtoolError("--format deepseek-v3 needs --rope-select uniform (DeepSeek's rotary uses evenly spaced "
                          "frequencies): add --rope-select uniform or use --format kvtool")
    if spec is None:
        return
    if spec.qkv_bias or spec.o_bias:
        raise KvtoolError(f"{spec.model_type} has attention biases, which DeepSeek-V3 (and vLLM) cannot express: "
                          "use --format kvtool")
    if spec.qk_norm:
        raise KvtoolError(f"{spec.model_type} has q_norm/k_norm, which DeepSeek-V3 cannot express: use --format kvtool")
    if spec.rope_type != "default":
        raise KvtoolError(f"RoPE type {spec.rope_type!r} has no DeepSeek-V3 equivalent here (vLLM rewrites non-default "
                          "RoPE scaling to deepseek_yarn): use --format kvtool")


def deepseek_v3_checkpoint(weights: dict[str, torch.Tensor], layers: list[MlaLayer], spec: ArchSpec,
                           source_config: Any, latent_rms: list[float],
                           dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state dict, config.json dict, export report) of the DeepSeek-V3 layout.

    ``latent_rms[i]`` is the calibration RMS of layer i's padded latent (sets kv_a_layernorm's weight).
    """
    n_h, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rope_dim = layers[0].k_pe.shape[0]
    nope = g * d - rope_dim
    kv_lora_rank = max(la.k_down.shape[0] + la.v_down.shape[0] for la in layers)
    q_scale = math.sqrt((nope + rope_dim) / d)
    state = {k: v for k, v in weights.items() if ".self_attn." not in k or ".o_proj." in k}
    for i, la in enumerate(layers):
        pre = f"model.layers.{i}.self_attn."
        r_k, r_v = la.k_down.shape[0], la.v_down.shape[0]
        q = la.q_weight.to(torch.float64).view(n_h, nope + rope_dim, -1)
        q = torch.cat([q[:, :nope], torch.stack([_interleave(q[h, nope:]) for h in range(n_h)])], dim=1)
        state[pre + "q_proj.weight"] = (q * q_scale).reshape(-1, q.shape[-1])
        pad = torch.zeros(kv_lora_rank - r_k - r_v, la.k_down.shape[1], dtype=torch.float64)
        state[pre + "kv_a_proj_with_mqa.weight"] = torch.cat(
            [la.k_down.double(), la.v_down.double(), pad, _interleave(la.k_pe.double())])
        state[pre + "kv_a_layernorm.weight"] = torch.full((kv_lora_rank,), latent_rms[i], dtype=torch.float64)
        kv_b = torch.zeros(n_h, nope + d, kv_lora_rank, dtype=torch.float64)
        v_up = la.v_up.double().view(g, d, r_v)
        for h in range(n_h):
            kv_b[h, :nope, :r_k] = la.k_up.double()
            kv_b[h, nope:, r_k:r_k + r_v] = v_up[h // spec.group_size]
        state[pre + "kv_b_proj.weight"] = kv_b.reshape(-1, kv_lora_rank)
    state = {k: v.to(dtype) for k, v in state.items()}
    src = source_config
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "moe_intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": n_h, "num_key_value_heads": n_h,
        # expert counts keep transformers' defaults; unused since every layer is below first_k_dense_replace
        "first_k_dense_replace": spec.num_layers, "kv_lora_rank": kv_lora_rank, "q_lora_rank": None,
        "qk_rope_head_dim": rope_dim, "qk_nope_head_dim": nope, "v_head_dim": d, "head_dim": rope_dim,
        "rope_interleave": True, "hidden_act": getattr(src, "hidden_act", "silu"),
        "max_position_embeddings": spec.max_positions, "rms_norm_eps": src.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta}, "rope_theta": spec.rope_theta,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": bool(src.tie_word_embeddings),
        "bos_token_id": src.bos_token_id, "eos_token_id": src.eos_token_id, "pad_token_id": src.pad_token_id,
        "initializer_range": getattr(src, "initializer_range", 0.02), "use_cache": True,
    }
    padded = sum(kv_lora_rank - la.k_down.shape[0] - la.v_down.shape[0] for la in layers)
    report = {"kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope_dim,
              "padded_latent_channels": padded,
              "kv_bytes_per_token": (kv_lora_rank + rope_dim) * spec.num_layers * 2,
              "notes": ["kv_a_layernorm approximated by the calibration RMS of the latent (measured in bench)",
                        "vLLM hard-codes attention biases off and rewrites non-default RoPE scaling"]}
    return state, config, report


def latent_rms(layers: list[MlaLayer], second_moments: list[torch.Tensor]) -> list[float]:
    """Calibration RMS of each layer's latent padded to the global kv_lora_rank: sqrt(E‖c‖² / kv_lora_rank)."""
    width = max(la.k_down.shape[0] + la.v_down.shape[0] for la in layers)
    out = []
    for la, c in zip(layers, second_moments, strict=True):
        down = torch.cat([la.k_down, la.v_down]).double()
        energy = torch.einsum("rd,de,re->", down, c.double(), down)
        out.append(float((energy / width).clamp_min(1e-12).sqrt()))
    return out
