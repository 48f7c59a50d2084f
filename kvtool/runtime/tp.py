"""A small tensor-parallel inference path for Llama-family decoders, with standard and ladder blocks.

Sharding (Megatron style, ``world`` ranks, rank ``r``): each rank holds ``H/world`` query heads and the
``KV/world`` KV heads they use (q/k/v rows), the matching ``o_proj`` columns, ``I/world`` MLP columns
(gate/up rows) and the matching ``down_proj`` columns. Every attention and MLP module therefore ends in a
partial sum that one ``torch.distributed`` all-reduce completes. Embeddings, norms and the LM head are
replicated (as in gpt-fast). Biases of o_proj are added on rank 0 only, before the all-reduce.

Schedule. The decoder is a sequence of modules ``j = 0 .. 2L-1`` (attention ``2i``, MLP ``2i+1``); a module of a
ladder layer reads the residual stream without the output of module ``j-1`` (see :mod:`kvtool.runtime.ladder`).
So the all-reduce of module ``j`` is issued asynchronously (``async_op=True``) exactly when module ``j+1`` is a
ladder module, and it is waited for one module later, just before module ``j+2`` needs it; otherwise it is a
plain blocking all-reduce. Before each module the outputs that have arrived are added to the residual and the
sum is normalized in one step (:func:`kvtool.kernels.ladder_norm.add_rmsnorm`, optional Triton kernel); before
the final norm up to two pending outputs (last attention and last MLP) are added: the kernel's two residual
inputs. The additions happen in the same order as in the single-process HF model, so in float32 a world-1
run reproduces the HF logits to float rounding of the attention kernel.

Decoding uses a static KV cache (``setup_cache``) indexed by a position tensor, so one decode step can be
captured in a CUDA graph (``bench/ladder_tp_speed.py``). ``comm=False`` skips every all-reduce (wrong outputs,
compute-only timing).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvtool.errors import KvtoolError
from kvtool.models import ArchSpec, arch_spec_from_config
from kvtool.runtime.rope import rms_norm, rope_tables, rotate_half


def check_tp_split(spec: ArchSpec, world: int) -> None:
    """Raise KvtoolError when the heads or MLP columns cannot be split evenly over ``world`` ranks."""
    for name, n in (("attention heads", spec.num_heads), ("KV heads", spec.num_kv_heads),
                    ("MLP columns", spec.intermediate_size)):
        if n % world:
            raise KvtoolError(f"{name} ({n}) do not split over {world} ranks: use a TP degree dividing {n}")


def spec_for_tp(config: Any) -> ArchSpec:
    """The ArchSpec of a HF config (source or ladder checkpoint) that the TP path can run."""
    spec = arch_spec_from_config(config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise KvtoolError(f"the TP path supports SiLU-gated MLPs only (got {config.hidden_act})")
    if getattr(config, "mlp_bias", False):
        raise KvtoolError("the TP path does not support MLP biases")
    return spec


class TPLayer(nn.Module):
    """One decoder layer's local shard: attention heads and MLP columns of this rank, plus its KV cache."""

    def __init__(self, shape: ArchSpec, world: int, dtype: torch.dtype, device: Any):
        super().__init__()
        d, hl, kvl = shape.head_dim, shape.num_heads // world, shape.num_kv_heads // world
        il, dm = shape.intermediate_size // world, shape.hidden_size
        self.hl, self.kvl, self.d, self.eps, self.qk_norm = hl, kvl, d, shape.rms_norm_eps, shape.qk_norm
        kw = dict(dtype=dtype, device=device)
        self.attn_norm = nn.Parameter(torch.ones(dm, **kw), requires_grad=False)
        self.mlp_norm = nn.Parameter(torch.ones(dm, **kw), requires_grad=False)
        self.wqkv = nn.Parameter(torch.empty((hl + 2 * kvl) * d, dm, **kw), requires_grad=False)
        self.bqkv = (nn.Parameter(torch.zeros((hl + 2 * kvl) * d, **kw), requires_grad=False)
                     if shape.qkv_bias else None)
        self.q_norm = nn.Parameter(torch.ones(d, **kw), requires_grad=False) if shape.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(d, **kw), requires_grad=False) if shape.qk_norm else None
        self.wo = nn.Parameter(torch.empty(dm, hl * d, **kw), requires_grad=False)
        self.bo = nn.Parameter(torch.zeros(dm, **kw), requires_grad=False) if shape.o_bias else None
        self.w13 = nn.Parameter(torch.empty(2 * il, dm, **kw), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(dm, il, **kw), requires_grad=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.ladder = False
        self.add_o_bias = True  # rank 0 only

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                  input_pos: torch.Tensor, fn: Any = None) -> torch.Tensor:
        """Partial attention output (this rank's heads through its o_proj columns), before the all-reduce."""
        bo = self.bo if self.add_o_bias else None
        return (fn or attention_core)(x, self.wqkv, self.bqkv, self.q_norm, self.k_norm, self.wo, bo, self.k_cache,
                                      self.v_cache, cos, sin, mask, input_pos, self.hl, self.kvl, self.d, self.eps)

    def mlp(self, x: torch.Tensor, fn: Any = None) -> torch.Tensor:
        """Partial MLP output (this rank's columns), before the all-reduce."""
        return (fn or mlp_core)(x, self.w13, self.w2)


def attention_core(x: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None, q_norm: torch.Tensor | None,
                   k_norm: torch.Tensor | None, wo: torch.Tensor, bo: torch.Tensor | None, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   input_pos: torch.Tensor, hl: int, kvl: int, d: int, eps: float) -> torch.Tensor:
    """Attention of one rank's heads (a pure function of its tensors, so ``torch.compile`` compiles it once)."""
    b, t, _ = x.shape
    qkv = F.linear(x, wqkv, bqkv)
    q, k, v = qkv.split([hl * d, kvl * d, kvl * d], dim=-1)
    q, k, v = q.view(b, t, hl, d), k.view(b, t, kvl, d), v.view(b, t, kvl, d)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    c, s = cos[None, :, None, :].to(q.dtype), sin[None, :, None, :].to(q.dtype)
    q = (q * c + rotate_half(q) * s).transpose(1, 2)
    k = (k * c + rotate_half(k) * s).transpose(1, 2)
    k_cache.index_copy_(2, input_pos, k)
    v_cache.index_copy_(2, input_pos, v.transpose(1, 2))
    # GQA without repeating the cache: the g query heads of a KV head become g*t query rows of that head
    g = hl // kvl
    q = q.reshape(b, kvl, g * t, d)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask.repeat(1, 1, g, 1))
    y = y.view(b, kvl, g, t, d).permute(0, 3, 1, 2, 4)
    out = F.linear(y.reshape(b, t, hl * d), wo)
    if bo is not None:
        out = out + bo
    return out


def mlp_core(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP of one rank's columns."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def add_norm_core(r: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, w: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r' = (r + a) + b`` in r's dtype, then RMSNorm (HF convention); returns (r', normalized)."""
    if a is not None:
        r = r + a
    if b is not None:
        r = r + b
    return r, rms_norm(r, w, eps)


class TPDecoder(nn.Module):
    """Tensor-parallel decoder with static KV cache; ``set_ladder`` chooses the ladder layers.

    Args:
        shape: global shapes.
        rank, world: this process's rank and the TP degree (``world=1`` runs without torch.distributed).
        group: process group for the all-reduces (default group when None).
        dtype, device: parameter dtype and device.
        fused_norm: use the Triton add+RMSNorm kernel (needs CUDA, or ``TRITON_INTERPRET=1`` on the CPU).
    """

    def __init__(self, shape: ArchSpec, rank: int = 0, world: int = 1, group: Any = None,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu", fused_norm: bool = False):
        super().__init__()
        check_tp_split(shape, world)
        self.shape, self.rank, self.world, self.group = shape, rank, world, group
        self.dtype, self.device = dtype, torch.device(device)
        self.fused_norm = fused_norm
        self.comm = True
        kw = dict(dtype=dtype, device=device)
        self.embed = nn.Parameter(torch.empty(shape.vocab_size, shape.hidden_size, **kw), requires_grad=False)
        self.final_norm = nn.Parameter(torch.ones(shape.hidden_size, **kw), requires_grad=False)
        self.lm_head = nn.Parameter(torch.empty(shape.vocab_size, shape.hidden_size, **kw), requires_grad=False)
        self.layers = nn.ModuleList(TPLayer(shape, world, dtype, device) for _ in range(shape.num_layers))
        for layer in self.layers:
            layer.add_o_bias = rank == 0
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.causal: torch.Tensor | None = None
        self._rope_override: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fns: dict[str, Any] = {}
        self.disable_compile()

    # ------------------------------------------------------------------------------------------ set-up
    def set_ladder(self, layers: list[int] | tuple[int, ...] | set[int]) -> TPDecoder:
        """Make ``layers`` ladder layers (all others standard)."""
        chosen = set(int(i) for i in layers)
        bad = sorted(i for i in chosen if not 0 <= i < len(self.layers))
        if bad:
            raise KvtoolError(f"ladder layer(s) {bad} out of range: the model has layers 0..{len(self.layers) - 1}")
        for i, layer in enumerate(self.layers):
            layer.ladder = i in chosen
        return self

    def ladder_layers(self) -> list[int]:
        """Indices of the ladder layers."""
        return [i for i, layer in enumerate(self.layers) if layer.ladder]

    def setup_cache(self, batch_size: int, max_len: int) -> None:
        """Allocate the static KV cache (batch_size x max_len) and the RoPE/causal-mask tables."""
        kvl, d = self.shape.num_kv_heads // self.world, self.shape.head_dim
        for layer in self.layers:
            layer.k_cache = torch.zeros(batch_size, kvl, max_len, d, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros_like(layer.k_cache)
        if self._rope_override is not None and self._rope_override[0].shape[0] >= max_len:
            cos, sin = self._rope_override
            self.cos, self.sin = cos[:max_len].to(self.device), sin[:max_len].to(self.device)
        else:
            self.cos, self.sin = rope_tables(d, max_len, self.shape.rope_theta, self.device)
        self.causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=self.device))

    @torch.no_grad()
    def random_init(self, seed: int = 0, std: float = 0.02) -> TPDecoder:
        """Random weights (benchmarks): each rank draws its own shards; replicated tensors share the seed."""
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        self.embed.normal_(0, 1.0, generator=g)
        self.lm_head.normal_(0, std, generator=g)
        g.manual_seed(seed * 1000003 + 7919 * (self.rank + 1))
        for layer in self.layers:
            for p in (layer.wqkv, layer.wo, layer.w13, layer.w2):
                p.normal_(0, std, generator=g)
        return self

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: nn.Module, rank: int = 0, world: int = 1, group: Any = None, *,
                device: Any = None, dtype: torch.dtype | None = None, fused_norm: bool = False,
                max_len: int | None = None) -> TPDecoder:
        """This rank's shard of a HF Llama/Qwen2/Qwen3/Mistral model (or a kvtool ladder checkpoint of one).

        The ladder layers are those installed in ``model`` (a ladder checkpoint's ``config.ladder_layers``, or
        :func:`kvtool.runtime.ladder.install_ladder` on a source model). RoPE tables come from
        the model's own rotary embedding (so scaled RoPE variants match).
        """
        config = model.config
        shape = spec_for_tp(config)
        check_tp_split(shape, world)
        sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if sliding and max_len and max_len > sliding:
            raise KvtoolError(f"the TP path has no sliding-window attention: keep sequences <= {sliding} tokens")
        src_dtype = next(model.parameters()).dtype
        dtype = dtype or src_dtype
        device = torch.device(device) if device is not None else next(model.parameters()).device
        tp = cls(shape, rank, world, group, dtype, device, fused_norm)
        hm = model.model
        d = shape.head_dim
        hl, kvl = shape.num_heads // world, shape.num_kv_heads // world
        il = shape.intermediate_size // world

        def rows(t: torch.Tensor, n: int) -> torch.Tensor:
            return t[rank * n:(rank + 1) * n]

        def put(dst: torch.Tensor, src: torch.Tensor) -> None:
            dst.copy_(src.to(device=device, dtype=dtype))

        put(tp.embed, hm.embed_tokens.weight)
        put(tp.final_norm, hm.norm.weight)
        put(tp.lm_head, model.lm_head.weight)
        for src, dst in zip(hm.layers, tp.layers, strict=True):
            at, mlp = src.self_attn, src.mlp
            put(dst.attn_norm, src.input_layernorm.weight)
            put(dst.mlp_norm, src.post_attention_layernorm.weight)
            put(dst.wqkv, torch.cat([rows(at.q_proj.weight, hl * d), rows(at.k_proj.weight, kvl * d),
                                     rows(at.v_proj.weight, kvl * d)]))
            if dst.bqkv is not None:
                put(dst.bqkv, torch.cat([rows(at.q_proj.bias, hl * d), rows(at.k_proj.bias, kvl * d),
                                         rows(at.v_proj.bias, kvl * d)]))
            if dst.q_norm is not None:
                put(dst.q_norm, at.q_norm.weight)
                put(dst.k_norm, at.k_norm.weight)
            put(dst.wo, at.o_proj.weight[:, rank * hl * d:(rank + 1) * hl * d])
            if dst.bo is not None:
                put(dst.bo, at.o_proj.bias)
            put(dst.w13, torch.cat([rows(mlp.gate_proj.weight, il), rows(mlp.up_proj.weight, il)]))
            put(dst.w2, mlp.down_proj.weight[:, rank * il:(rank + 1) * il])
        from kvtool.runtime.ladder import ladder_layers_of

        tp.set_ladder(ladder_layers_of(model))
        n = max_len or int(getattr(config, "max_position_embeddings", 0) or 2048)
        ids = torch.arange(n, device=device)[None]
        cos, sin = hm.rotary_emb(torch.zeros(1, dtype=torch.float32, device=device), position_ids=ids)
        tp._rope_override = (cos[0].float(), sin[0].float())
        return tp

    # ------------------------------------------------------------------------------------------ forward
    def _add_norm(self, r: torch.Tensor, adds: list[torch.Tensor],
                  w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = adds[0] if adds else None
        b = adds[1] if len(adds) > 1 else None
        if self.fused_norm:
            from kvtool.kernels.ladder_norm import add_rmsnorm

            return add_rmsnorm(r, a, b, w, self.shape.rms_norm_eps)
        return self._fns["add_norm"](r, a, b, w, self.shape.rms_norm_eps)

    def enable_compile(self, **compile_kwargs: Any) -> TPDecoder:
        """``torch.compile`` the per-module compute (attention, MLP, add+norm), not the all-reduces between them.

        Each is a pure function of its tensors, compiled once and reused by every layer (the ladder paper's
        "semi-compiled" model). CUDA-graph capture of the whole step stays possible.
        """
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit"):  # one entry per (shape, None-pattern): allow many
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        opts = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self._fns = {name: torch.compile(fn, **opts) for name, fn in
                     (("attention", attention_core), ("mlp", mlp_core), ("add_norm", add_norm_core))}
        return self

    def disable_compile(self) -> TPDecoder:
        """Back to eager per-module compute."""
        self._fns = {"attention": attention_core, "mlp": mlp_core, "add_norm": add_norm_core}
        return self

    def _module_flags(self) -> list[bool]:
        return [layer.ladder for layer in self.layers for _ in range(2)] + [False]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens ``input_ids`` (B, T) at positions ``input_pos`` (T,), filling the cache."""
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        mask = self.causal[input_pos][None, None]
        flags = self._module_flags()
        communicate = self.comm and self.world > 1
        r = x
        pending: list[tuple[torch.Tensor, Any]] = []
        for j in range(2 * len(self.layers)):
            layer = self.layers[j // 2]
            keep = 1 if flags[j] and pending else 0  # a ladder module does not wait for module j-1
            flush, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
            adds = []
            for t, work in flush:
                if work is not None:
                    work.wait()
                adds.append(t)
            if j % 2 == 0:
                r, h = self._add_norm(r, adds, layer.attn_norm)
                out = layer.attention(h, cos, sin, mask, input_pos, self._fns["attention"])
            else:
                r, h = self._add_norm(r, adds, layer.mlp_norm)
                out = layer.mlp(h, self._fns["mlp"])
            work = None
            if communicate:
                if flags[j + 1]:
                    work = dist.all_reduce(out, group=self.group, async_op=True)
                else:
                    dist.all_reduce(out, group=self.group)
            pending.append((out, work))
        adds = []
        for t, work in pending:
            if work is not None:
                work.wait()
            adds.append(t)
        _, h = self._add_norm(r, adds, self.final_norm)
        return F.linear(h, self.lm_head)

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prefill ``prompt`` (B, T) then decode ``steps`` greedy tokens one at a time (KV cache).

        Returns (generated tokens (B, steps), logits of the prefill's last position and of each decode step).
        """
        b, t = prompt.shape
        if self.causal is None or self.causal.shape[0] < t + steps or self.layers[0].k_cache.shape[0] != b:
            self.setup_cache(b, t + steps)
        pos = torch.arange(t, device=self.device)
        logits = [self.forward(prompt.to(self.device), pos)[:, -1]]
        tokens = []
        for s in range(steps):
            nxt = logits[-1].argmax(-1)
            tokens.append(nxt)
            logits.append(self.forward(nxt[:, None], torch.tensor([t + s], device=self.device))[:, -1])
        return torch.stack(tokens, dim=1), logits


def describe_schedule(ladder_layers: list[int], num_layers: int) -> dict[str, int]:
    """How many of the 2L all-reduces are overlapped (issued async, waited one module later)."""
    flags = [i in set(ladder_layers) for i in range(num_layers) for _ in range(2)] + [False]
    overlapped = sum(1 for j in range(2 * num_layers) if flags[j + 1])
    return {"allreduces": 2 * num_layers, "overlapped": overlapped, "blocking": 2 * num_layers - overlapped}

