"""Export a decoupled-RoPE CARE conversion in transformers' ``DeepseekV3ForCausalLM`` layout.

Layout (per layer, ``model.layers.{i}.self_attn.``):
    ``q_proj``             [n_h*(d + d_rope), D]; per head [q_nope | q_pe], q_pe interleaved; scaled by
                           sqrt((d+d_rope)/d) so DeepSeek's softmax scale (d+d_rope)^-1/2 equals d^-1/2
    ``kv_a_proj_with_mqa`` [kv_lora_rank + d_rope, D]; rows [c_K | c_V | zero padding | k_pe (interleaved)]
    ``kv_a_layernorm``     RMSNorm over the latent; its weight is a per-channel least-squares fit on calibration
                           tokens (:func:`latent_norm_weights`)
    ``kv_b_proj``          [n_h*(d + d), kv_lora_rank]; head h: [W_UK_h on the c_K columns; its group's v_b on
                           the c_V columns] (block-diagonal: K rows read c_K only, V rows c_V only)
    ``o_proj``             unchanged
qk_nope_head_dim = v_head_dim = head_dim: a query head's nope score against the shared nope key k_b·c_K is a
bilinear form of rank ≤ head_dim (its nope query channels are a rotation of the head's own d channels), so it
factors exactly into head_dim columns (:func:`kvtool.convert.care.factor_nope`); Llama-3-8B shapes give nope
128 + rope 64, v 128.
The kept rope pairs {0, s, 2s, ...} are reproduced by DeepSeek's rotary with rope_theta' = θ^(s·rope_dim/d).
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

from kvtool.convert.care import EQUAL_WIDTH_ALLOCATIONS, MlaLayer, per_head_query
from kvtool.errors import KvtoolError
from kvtool.models import ArchSpec


def _interleave(rows: torch.Tensor) -> torch.Tensor:
    """Half-split order [a_0..a_{p-1}, b_0..b_{p-1}] -> interleaved [a_0, b_0, a_1, b_1, ...] (rows)."""
    p = rows.shape[0] // 2
    return torch.stack([rows[:p], rows[p:]], dim=1).reshape(rows.shape)


def check_exportable(spec: ArchSpec | None, rope: str, rope_select: str, rank_alloc: str = "uniform") -> None:
    """DeepSeek-V3 layout needs decoupled RoPE on pairs its rotary can express (an arithmetic progression
    {0, s, 2s, ...}: ``strided`` or ``uniform``), one latent width for every layer (``uniform`` or
    ``sensitivity-split`` allocation), no attention biases, no QK-norm, default RoPE (the architecture checks are
    skipped when ``spec`` is None)."""
    if rank_alloc not in EQUAL_WIDTH_ALLOCATIONS:
        raise KvtoolError(f"--format deepseek-v3 has one kv_lora_rank for all layers, but --rank-alloc {rank_alloc} "
                          "gives layers different widths (the export would pad them, caching more than the budget): "
                          "use --rank-alloc uniform or sensitivity-split")
    if rope != "decoupled":
        raise KvtoolError("--format deepseek-v3 needs --rope decoupled (DeepSeek has no reconstruct-then-RoPE "
                          "path): add --rope decoupled or use --format kvtool")
    if rope_select not in EXPRESSIBLE:
        raise KvtoolError("--format deepseek-v3 needs --rope-select strided or uniform (DeepSeek's rotary uses the "
                          "frequencies θ'^(-2i/rope_dim), an arithmetic progression of the source pairs): use one of "
                          "them or --format kvtool")
    if spec is None:
        return
    if spec.qkv_bias or spec.o_bias:
        raise KvtoolError(f"{spec.model_type} has attention biases, which DeepSeek-V3 (and vLLM) cannot express: "
                          "use --format kvtool")
    if spec.qk_norm:
        raise KvtoolError(f"{spec.model_type} has q_norm/k_norm, which DeepSeek-V3 cannot express: use --format kvtool")
    if spec.rope_type != "default":
        raise KvtoolError(f"RoPE scaling {spec.rope_type!r} has no DeepSeek-V3 equivalent (its frequencies are not a "
                          "geometric progression a DeepSeek rotary can reproduce, and vLLM rewrites every non-default "
                          "RoPE type to deepseek_yarn): use --format kvtool")


EXPRESSIBLE = ("strided", "uniform")
NORM_RULES = ("lsq", "rms", "mean-rms", "inv-mean-inv-rms")


def rope_stride(layers: list[MlaLayer]) -> int:
    """The common stride s of every layer's kept pairs {0, s, 2s, ...}; KvtoolError if they are not such a set."""
    first = layers[0].rope_pairs
    s = first[1] - first[0] if len(first) > 1 else 1
    want = [i * s for i in range(len(first))]
    if any(list(la.rope_pairs) != want for la in layers):
        raise KvtoolError("the kept rope pairs are not one arithmetic progression {0, s, 2s, ...} in every layer, "
                          "which DeepSeek's rotary cannot express: convert with --rope-select strided")
    return s


def deepseek_v3_checkpoint(weights: dict[str, torch.Tensor], layers: list[MlaLayer], spec: ArchSpec,
                           source_config: Any, norm_weights: list[torch.Tensor], dtype: torch.dtype,
                           q_lora: str = "none") -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state dict, config.json dict, export report) of the DeepSeek-V3 layout.

    ``norm_weights[i]`` is kv_a_layernorm's weight of layer i ([kv_lora_rank], see :func:`latent_norm_weights`).
    Per head: qk_nope_head_dim = v_head_dim = head_dim (:func:`kvtool.convert.care.per_head_query`),
    qk_rope_head_dim = the rope width.
    """
    n_h, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rope_dim = layers[0].k_pe.shape[0]
    kv_lora_rank = max(la.k_down.shape[0] + la.v_down.shape[0] for la in layers)
    stride = rope_stride(layers)
    q_scale = math.sqrt((d + rope_dim) / d)
    state = {k: v for k, v in weights.items() if ".self_attn." not in k or ".o_proj." in k}
    worst = 0.0
    for i, la in enumerate(layers):
        pre = f"model.layers.{i}.self_attn."
        r_k, r_v = la.k_down.shape[0], la.v_down.shape[0]
        q_lean, k_lean, resid = per_head_query(la.q_weight, la.k_up, n_h, d, rope_dim)
        worst = max(worst, resid)
        q_lean = q_lean.view(n_h, d + rope_dim, -1)
        q_heads = [torch.cat([q_lean[h, :d], _interleave(q_lean[h, d:])]) for h in range(n_h)]
        kv_b = torch.zeros(n_h, 2 * d, kv_lora_rank, dtype=torch.float64)
        kv_b[:, :d, :r_k] = k_lean.view(n_h, d, r_k)
        kv_b[:, d:, r_k:r_k + r_v] = la.v_up.double().view(g, d, r_v).repeat_interleave(spec.group_size, 0)
        state[pre + "q_proj.weight"] = torch.cat(q_heads) * q_scale
        pad = torch.zeros(kv_lora_rank - r_k - r_v, la.k_down.shape[1], dtype=torch.float64)
        state[pre + "kv_a_proj_with_mqa.weight"] = torch.cat(
            [la.k_down.double(), la.v_down.double(), pad, _interleave(la.k_pe.double())])
        state[pre + "kv_a_layernorm.weight"] = norm_weights[i].to(torch.float64)
        state[pre + "kv_b_proj.weight"] = kv_b.reshape(-1, kv_lora_rank)
    if q_lora == "identity":
        fold_input_norm_into_q_lora(state, spec)
    state = {k: v.to(dtype) for k, v in state.items()}
    src = source_config
    # DeepSeek's rotary of width rope_dim has inv_freq_i = θ'^(-2i/rope_dim); the kept pairs are i·stride of the
    # source's θ^(-2f/d): θ' = θ^(stride·rope_dim/d) makes them equal
    theta = float(spec.rope_theta) ** (stride * rope_dim / d)
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "moe_intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": n_h, "num_key_value_heads": n_h,
        # dense MLPs everywhere: every layer is below first_k_dense_replace (transformers and vLLM build an MoE
        # block only at layer_idx >= first_k_dense_replace); expert counts keep transformers' defaults, unused
        "first_k_dense_replace": spec.num_layers,
        "kv_lora_rank": kv_lora_rank, "q_lora_rank": spec.hidden_size if q_lora == "identity" else None,
        "qk_rope_head_dim": rope_dim, "qk_nope_head_dim": d, "v_head_dim": d, "head_dim": rope_dim,
        "rope_interleave": True, "hidden_act": getattr(src, "hidden_act", "silu"),
        "max_position_embeddings": spec.max_positions, "rms_norm_eps": src.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": bool(src.tie_word_embeddings),
        "bos_token_id": src.bos_token_id, "eos_token_id": src.eos_token_id, "pad_token_id": src.pad_token_id,
        "initializer_range": getattr(src, "initializer_range", 0.02), "use_cache": True,
    }
    padded = sum(kv_lora_rank - la.k_down.shape[0] - la.v_down.shape[0] for la in layers)
    report = {"kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": d, "qk_rope_head_dim": rope_dim, "v_head_dim": d,
              "rope_stride": stride, "rope_theta": theta, "padded_latent_channels": padded,
              "nope_factor_residual": worst,
              "kv_bytes_per_token": (kv_lora_rank + rope_dim) * spec.num_layers * 2,
              "notes": ["kv_a_layernorm (applied by DeepSeek to the latent, scale-invariant per token) is the only "
                        "approximation; its weight is a per-channel least-squares fit (bench/care_quality.py)",
                        "vLLM hard-codes attention biases off and rewrites non-default RoPE scaling"]}
    return state, config, report


def fold_input_norm_into_q_lora(state: dict[str, torch.Tensor], spec: ArchSpec) -> None:
    """The exact q_lora path (in place): q_a_proj = I (q_lora_rank = hidden size), q_a_layernorm weight 1, q_b_proj
    = q_proj·diag(g) and kv_a_proj_with_mqa·diag(g) with g the input norm's weight, which becomes 1.

    The input norm then hands the attention unit-RMS rows x = h/rms(h), so q_a_layernorm(x) = x up to its eps
    (rms(x)² = m/(m + eps), m the mean square of h): q_b_proj(x) is the old q_proj(g·x) and the latent is unchanged.
    """
    hidden = spec.hidden_size
    for i in range(spec.num_layers):
        pre = f"model.layers.{i}."
        g = state[pre + "input_layernorm.weight"].to(torch.float64)
        attn = pre + "self_attn."
        state[attn + "q_b_proj.weight"] = state.pop(attn + "q_proj.weight").to(torch.float64) * g[None]
        state[attn + "q_a_proj.weight"] = torch.eye(hidden, dtype=torch.float64)
        state[attn + "q_a_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        kv_a = attn + "kv_a_proj_with_mqa.weight"
        state[kv_a] = state[kv_a].to(torch.float64) * g[None]
        state[pre + "input_layernorm.weight"] = torch.ones_like(g)


def add_ballast(layers: list[MlaLayer], samples: list[torch.Tensor], first: list[torch.Tensor] | None = None,
                dominance: float = 30.0, ridge: float = 1e-3) -> tuple[list[MlaLayer], list[float]]:
    """Make kv_a_layernorm's per-token scale nearly constant with one "ballast" latent channel per layer.

    DeepSeek normalizes the latent by its per-token RMS, which varies from token to token. The ballast channel is
    b = α·u·x, with u the ridge regression of the constant 1 on the attention inputs x (``samples``, plus the
    windows' first tokens ``first`` weighted like all other tokens together, since attention sinks form there and
    their activations are outliers): the direction whose projection is most nearly constant. α makes b dominate
    the latent's norm (mean |b| = ``dominance``·RMS‖c‖), so rms(latent) ≈ |b|/sqrt(kv_lora_rank) varies only as
    u·x does, and kv_a_layernorm's fitted weight undoes the near-constant scale. The channel takes the slot of the
    last (smallest) V latent channel and its kv_b_proj column is zero: the cache width is unchanged. Returns
    (layers, per-layer max relative deviation of u·x from its mean over samples and first tokens).
    """
    out, spread = [], []
    for i, (la, x) in enumerate(zip(layers, samples, strict=True)):
        x = x.double()
        parts = [(x, 1.0 / x.shape[0])]
        if first is not None and first[i].numel():
            parts.append((first[i].double(), 1.0 / first[i].shape[0]))
        gram = sum(w * z.T @ z for z, w in parts)
        rhs = sum(w * z.sum(0) for z, w in parts)
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        u = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, rhs)
        proj = torch.cat([z @ u for z, _ in parts])
        down = torch.cat([la.k_down, la.v_down]).double()
        scale = float((x @ down.T).pow(2).sum(-1).mean().sqrt())
        alpha = dominance * scale / float(proj.abs().mean().clamp_min(1e-300))
        v_down, v_up = la.v_down.double().clone(), la.v_up.double().clone()
        v_down[-1] = alpha * u
        v_up[:, -1] = 0
        out.append(MlaLayer(k_down=la.k_down, k_up=la.k_up, v_down=v_down, v_up=v_up, q_weight=la.q_weight,
                            k_pe=la.k_pe, rope_pairs=la.rope_pairs))
        spread.append(float((proj / proj.mean() - 1).abs().max()))
    return out, spread


def latent_norm_weights(layers: list[MlaLayer], samples: list[torch.Tensor] | None,
                        second_moments: list[torch.Tensor], eps: float, rule: str = "lsq") -> list[torch.Tensor]:
    """kv_a_layernorm weights [kv_lora_rank] per layer so that w ⊙ c/rms(c) approximates the latent c.

    ``samples[i]`` are calibration inputs of layer i's attention (tokens x D); c = [k_down; v_down; 0 padding]·x
    and rms(c) = sqrt(mean(c²) + eps) over the kv_lora_rank channels, as DeepSeek's RMSNorm computes it. Rules:
    ``lsq``: per channel w_j = E[c_j²/rms] / E[c_j²/rms²], the least-squares minimizer of E‖w⊙c/rms - c‖²;
    ``mean-rms``: E[rms(c)]; ``inv-mean-inv-rms``: 1/E[1/rms(c)]; ``rms``: sqrt(E‖c‖²/kv_lora_rank) from the
    second moment alone (needs no samples).
    """
    width = max(la.k_down.shape[0] + la.v_down.shape[0] for la in layers)
    out = []
    for i, la in enumerate(layers):
        down = torch.cat([la.k_down, la.v_down]).double()
        if rule == "rms":
            energy = torch.einsum("rd,de,re->", down, second_moments[i].double(), down)
            w = torch.full((width,), float((energy / width).clamp_min(1e-12).sqrt()), dtype=torch.float64)
        else:
            if samples is None:
                raise KvtoolError(f"kv_a_layernorm rule {rule!r} needs calibration samples")
            c = samples[i].double() @ down.T
            rms = ((c ** 2).sum(-1) / width + eps).sqrt()
            if rule == "lsq":
                num, den = (c ** 2 / rms[:, None]).mean(0), (c ** 2 / rms[:, None] ** 2).mean(0)
                w = torch.ones(width, dtype=torch.float64)
                w[:c.shape[1]] = torch.where(den > 0, num / den.clamp_min(1e-300), rms.mean())
            elif rule == "mean-rms":
                w = torch.full((width,), float(rms.mean()), dtype=torch.float64)
            elif rule == "inv-mean-inv-rms":
                w = torch.full((width,), float(1 / (1 / rms).mean()), dtype=torch.float64)
            else:
                raise KvtoolError(f"unknown kv_a_layernorm rule {rule!r}: use {', '.join(NORM_RULES)}")
        out.append(w)
    return out
