"""CARE: GQA -> MLA conversion with activation-aware factorization and adjusted rank allocation.

Notation: x (tokens x D) is the input of k/v_proj; a projection W (out x D, HF layout) maps it to
out = g*d channels (g KV heads of width d); C = E[xᵀx] is the ``attn_in`` second moment.

Factorization (per layer, K and V separately)
    ``care``:  C_λ = C + λ·mean(diag C)·I (λ = ``damping``), S = C_λ^{1/2} by a float64 eigendecomposition.
               SVD S·Wᵀ = U Σ Vᵀ; keep rank r:  down = (S⁻¹ U_r Σ_r)ᵀ  (r x D, its output is cached),
               up = V_r (out x r).  This minimizes E‖x(W - Ŵ)ᵀ‖² (with the ridge λ); without damping, up's
               columns are the top-r eigenvectors of W C Wᵀ (PCA of the projection's outputs).
    ``svd``:   weight-only baseline: SVD Wᵀ = U Σ Vᵀ, down = (U_r Σ_r)ᵀ, up = V_r.

Rank allocation under a fixed budget (the per-layer KV cache width R = r_K + r_V [+ d_rope]):
    ``uniform``: r_K = r_V = (R - d_rope)/2 in every layer.
    ``care``:    greedy water-filling over layers (K and V pools separately, each with budget L·r_uniform):
                 start at ``rank_min``; repeatedly give one rank to the layer maximizing
                 σ²_{l,r+1} / Σ_{m>r} σ²_{l,m} (σ: singular values of S·Wᵀ), up to ``rank_max``.
    ``energy``:  same greedy, maximizing σ²_{l,r+1} (minimizes the total activation-weighted residual energy).
    ``sensitivity``: one pool for K and V of all layers (budget L·(r_K + r_V) uniform), greedy on α_b·σ²_{b,r+1},
                 where α_b is the measured calibration-loss cost per unit of residual energy of block b
                 (:func:`kvtool.calib.sensitivity.kv_sensitivity`): minimizes the predicted loss increase
                 Σ_b α_b·Σ_{m>r_b} σ²_{b,m}. Layers keep their own r_K + r_V (per-layer widths may differ).
    ``sensitivity-split``: the same greedy, but within each layer only: every layer keeps the uniform width
                 r_K + r_V and only its split between K and V follows α·σ² (one kv_lora_rank for all layers, which
                 is what ``--format deepseek-v3`` can express).

KV-parity mapping: the cache holds c = [x·downᵀ_K | x·downᵀ_V] (width r_K + r_V per token per layer, the GQA
cache being 2·g·d); the up-projections are block-diagonal per KV group (K reads c_K only, V reads c_V only)
and each query head reads its group's slice. At r_K = r_V = g·d the conversion is exact.

RoPE
    ``keep``:      keys are reconstructed from c_K, then (k_norm and) RoPE are applied: exact in the cached form,
                   not absorbable (decode reconstructs keys).
    ``decoupled``: DeepSeek-style. Per RoPE frequency pair f, the keys of the g KV heads are rotated by the
                   eigenvectors U_f of their cross-head Gram G_f[h,h'] = E[k_{h,f}·k_{h',f}] (computed exactly from
                   C and W_K: a common rotation per pair preserves dot products, so G_f is RoPE-invariant);
                   this commutes with RoPE (TransMLA's RoRoPE). The top component at the ``rope_dim/2`` frequency
                   pairs with the largest ‖q‖·‖k‖ score (``rope_select=norm``, MHA2MLA's 2-norm rule) or at every
                   (d/rope_dim)-th pair (``uniform``, what a native DeepSeek rotary reproduces) becomes the single
                   shared rope key k_pe; all other rotated key channels lose RoPE (the approximation) and are
                   compressed into c_K with the chosen factorization. Queries are rotated to match, so the layout
                   is absorbable. Needs no q/k biases and no QK-norm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvtool.errors import KvtoolError
from kvtool.models import ArchSpec

REQUIRED_STATS = ("attn_in",)
METHODS = ("care", "svd")
ALLOCATIONS = ("uniform", "care", "energy", "sensitivity", "sensitivity-split")
SENSITIVITY_ALLOCATIONS = ("sensitivity", "sensitivity-split")  # need the measured K/V sensitivities
EQUAL_WIDTH_ALLOCATIONS = ("uniform", "sensitivity-split")  # every layer keeps the same r_K + r_V
ROPE_MODES = ("keep", "decoupled")
ROPE_SELECTS = ("norm", "strided", "uniform")


@dataclass
class CareOptions:
    """Options of the CARE conversion (see the module docstring)."""

    method: str = "care"
    rank_alloc: str = "uniform"
    kv_rank: int | None = None  # per layer cache width K+V (+ rope dims); overrides kv_ratio
    kv_ratio: float = 0.5  # fraction of the GQA cache width 2*g*d
    rank_min: int | None = None  # per K or V; default half the uniform rank
    rank_max: int | None = None  # per K or V; default min(2 * uniform rank, available)
    damping: float = 0.01
    rope: str = "keep"
    rope_dim: int | None = None  # decoupled: width of the shared rope key (default: default_rope_dim)
    rope_select: str = "norm"
    rope_fold: int = 0  # decoupled: FreqFold group span in adjacent pairs; 0 = auto (the stride, or 2 for norm)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MlaLayer:
    """Converted attention weights of one layer (HF Linear layout: out x in)."""

    k_down: torch.Tensor
    k_up: torch.Tensor
    v_down: torch.Tensor
    v_up: torch.Tensor
    q_weight: torch.Tensor | None = None  # decoupled: n_h*(d_nope + d_rope) x D
    k_pe: torch.Tensor | None = None  # decoupled: d_rope x D
    rope_pairs: list[int] = field(default_factory=list)  # decoupled: original frequency-pair indices of k_pe


# ---------------------------------------------------------------------------------------------- factorization

def damped_sqrt(c: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with S = (C + damping·mean(diag C)·I)^{1/2}, symmetric, float64."""
    c = c.to(torch.float64)
    c = (c + c.T) / 2
    ridge = damping * c.diagonal().mean().clamp_min(1e-12)
    evals, evecs = torch.linalg.eigh(c + ridge * torch.eye(c.shape[0], dtype=torch.float64, device=c.device))
    evals = evals.clamp_min(ridge.item() * 1e-6 if damping > 0 else 1e-12)
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def spectrum(weight: torch.Tensor, sqrt_c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of S·Wᵀ (activation-aware) or of Wᵀ (weight-only, ``sqrt_c`` None), float64."""
    m = weight.to(torch.float64).T
    if sqrt_c is not None:
        m = sqrt_c @ m
    return torch.linalg.svd(m, full_matrices=False)


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, c: torch.Tensor) -> float:
    """Relative activation-weighted error E‖x(W-Ŵ)ᵀ‖² / E‖xWᵀ‖² = tr(ΔCΔᵀ)/tr(WCWᵀ) (undamped C)."""
    w, d = weight.to(torch.float64), (weight.to(torch.float64) - approx.to(torch.float64))
    den = torch.einsum("od,de,oe->", w, c, w)
    return float(torch.einsum("od,de,oe->", d, c, d) / den.clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------- allocation

def allocate_ranks(energies: list[torch.Tensor], budget: int, rank_min: int, rank_max: int | list[int],
                   rule: str) -> list[int]:
    """Greedy water-filling of ``budget`` ranks over blocks with squared singular values ``energies``.

    Every block starts at ``rank_min``; each step gives one rank to the block with the highest score
    (``care``: σ²_{r+1}/Σ_{m>r}σ²_m; ``energy``: σ²_{r+1}), never above ``rank_max`` or the block's size.
    """
    n = len(energies)
    maxes = rank_max if isinstance(rank_max, list) else [rank_max] * n
    caps = [min(m, e.numel()) for m, e in zip(maxes, energies, strict=True)]
    if any(rank_min > cap for cap in caps):
        raise KvtoolError(f"rank floor {rank_min} exceeds a layer's available rank {min(caps)}: lower --rank-min")
    if budget < n * rank_min:
        raise KvtoolError(f"KV budget of {budget} ranks is below the floor of {n} layers x {rank_min}: "
                          "raise --kv-rank/--kv-ratio or lower --rank-min")
    if budget > sum(caps):
        raise KvtoolError(f"KV budget of {budget} ranks exceeds what {n} layers can hold ({sum(caps)}): "
                          "lower --kv-rank/--kv-ratio or raise --rank-max")
    tails = [torch.flip(torch.cumsum(torch.flip(e.double(), [0]), 0), [0]) for e in energies]
    ranks = [rank_min] * n

    def score(i: int) -> float:
        r = ranks[i]
        if r >= caps[i]:
            return -math.inf
        nxt = float(energies[i][r])
        if rule in ("energy", "sensitivity"):
            return nxt
        return nxt / max(float(tails[i][r]), 1e-300)

    for _ in range(budget - n * rank_min):
        best = max(range(n), key=lambda i: (score(i), -i))
        ranks[best] += 1
    return ranks


# ---------------------------------------------------------------------------------------------- budget

def layer_budget(spec: ArchSpec, opts: CareOptions) -> tuple[int, int]:
    """(per-layer cache width R incl. rope dims, rope dims) from kv_rank or kv_ratio."""
    full = 2 * spec.kv_width
    if opts.kv_rank is not None:
        total = opts.kv_rank
    else:
        if not 0 < opts.kv_ratio <= 1:
            raise KvtoolError(f"--kv-ratio {opts.kv_ratio} must be in (0, 1]")
        total = int(round(opts.kv_ratio * full))
    if total > full:
        raise KvtoolError(f"--kv-rank {total} exceeds the GQA cache width 2*g*d = {full}: use at most {full}")
    rope_dim = resolve_rope_dim(spec, opts, total) if opts.rope == "decoupled" else 0
    if total - rope_dim < 2:
        raise KvtoolError(f"KV width {total} leaves no room for latent ranks after {rope_dim} rope dims: "
                          "raise --kv-rank/--kv-ratio or lower --rope-dim")
    return total, rope_dim


def allocation_bounds(spec: ArchSpec, opts: CareOptions) -> dict[str, tuple[int, int, int]]:
    """Per K and V: (uniform rank, floor, ceiling), checked against the budget before any work."""
    total, rope_dim = layer_budget(spec, opts)
    avail = {"k": spec.kv_width - rope_dim, "v": spec.kv_width}
    uniform = split_latent(total - rope_dim, avail["k"], avail["v"])
    bounds = {}
    for name in ("k", "v"):
        u = uniform[name]
        if opts.rank_alloc == "uniform" or u in (0, avail[name]):
            bounds[name] = (u, u, u)
            continue
        lo = opts.rank_min if opts.rank_min is not None else max(1, u // 2)
        hi = min(opts.rank_max if opts.rank_max is not None else 2 * u, avail[name])
        if lo > u:
            raise KvtoolError(f"{name.upper()} budget of {u} ranks per layer is below the floor --rank-min {lo}: "
                              "raise --kv-rank/--kv-ratio or lower --rank-min")
        if hi < u:
            raise KvtoolError(f"{name.upper()} budget of {u} ranks per layer exceeds the ceiling {hi}: "
                              "raise --rank-max or lower --kv-rank/--kv-ratio")
        bounds[name] = (u, lo, hi)
    return bounds


def split_latent(latent: int, avail_k: int, avail_v: int) -> dict[str, int]:
    """Uniform split of a layer's latent width between K and V (half each, within what each can hold)."""
    if latent > avail_k + avail_v:
        raise KvtoolError(f"latent width {latent} exceeds the K+V channels {avail_k + avail_v}: "
                          "lower --kv-rank/--kv-ratio")
    r_v = min(latent - min((latent + 1) // 2, avail_k), avail_v)
    return {"k": latent - r_v, "v": r_v}


ROPE_SHARE = 3  # default rope width: at most a third of the layer's cache width (docs/benchmarks.md ablation)


def default_rope_dim(spec: ArchSpec, total: int, rope_select: str | None = None) -> int:
    """The rope key width a conversion uses unless told: min(64, head_dim) (DeepSeek's and FlashMLA's 64), but at
    most a third of the layer's cache width ``total``, rounded down to a multiple of 8 (even below 8), and for
    ``uniform`` pairs one whose pair count divides head_dim/2. Measured on the embedded model at KV ratio 0.25
    (budget 96): rope 64 healed to 4.22x the original perplexity, 32 (this rule) to 2.25x, 16 to 5.64x."""
    d = spec.head_dim
    cap = min(64, d, total // ROPE_SHARE)
    width = cap - cap % 8 if cap >= 8 else cap - cap % 2
    if rope_select == "uniform":
        while width > 2 and (d // 2) % (width // 2):
            width -= 2
    return max(width, 2)


def resolve_rope_dim(spec: ArchSpec, opts: CareOptions, total: int) -> int:
    d = spec.head_dim
    rope_dim = opts.rope_dim if opts.rope_dim is not None else default_rope_dim(spec, total, opts.rope_select)
    if rope_dim < 2 or rope_dim % 2 or rope_dim > d:
        raise KvtoolError(f"--rope-dim {rope_dim} must be even and between 2 and head_dim ({d})")
    if opts.rope_select == "uniform" and (d // 2) % (rope_dim // 2):
        raise KvtoolError(f"--rope-select uniform needs rope-dim/2 to divide head_dim/2 ({d // 2}): pick another "
                          "--rope-dim")
    return rope_dim


# ---------------------------------------------------------------------------------------------- decoupled RoPE

def rope_grams(w_q: torch.Tensor, w_k: torch.Tensor, c: torch.Tensor, spec: ArchSpec) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Calibration Grams of the keys (W_K C W_Kᵀ, [g*d, g*d]) and of each query head (W_q,h C W_q,hᵀ,
    [n_h, d, d]), float64: every RoRoPE quantity below is read from them."""
    c = c.to(torch.float64)
    wk = w_k.to(torch.float64)
    wq = w_q.to(torch.float64).view(spec.num_heads, spec.head_dim, -1)
    return wk @ c @ wk.T, torch.einsum("hdD,DE,heE->hde", wq, c, wq)


def pair_scores(grams: tuple[torch.Tensor, torch.Tensor], spec: ArchSpec) -> torch.Tensor:
    """Per RoPE frequency pair f: ‖q'_{0,f}‖·‖k'_{0,f}‖ (RMS over calibration tokens) of the top RoRoPE component
    of the pair alone (the 2-norm score of MHA2MLA, taken after the cross-head rotation)."""
    return torch.stack([_group_rotation(grams, spec, [f])[2] for f in range(spec.head_dim // 2)])


def _group_rotation(grams: tuple[torch.Tensor, torch.Tensor], spec: ArchSpec,
                    group: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint PCA of the keys of all KV heads at the frequency pairs ``group`` (TransMLA's RoRoPE; FreqFold when
    the group has several pairs). Channels are (head, pair) in head-major order; one rotation U acts on the real
    and the imaginary part of every pair alike (a common rotation commutes with RoPE at one frequency).

    Returns (U [m, m] columns by descending energy, channel index into the g*half layout [m],
    score ‖q'_0‖·‖k'_0‖ of the top component, its energy share).
    """
    gk, gq = grams
    g, d = spec.num_kv_heads, spec.head_dim
    half = d // 2
    m = len(group)
    chan = torch.tensor([h * half + f for h in range(g) for f in group], dtype=torch.long)
    rows_a = torch.tensor([h * d + f for h in range(g) for f in group], dtype=torch.long)
    rows_b = rows_a + half
    evals, evecs = torch.linalg.eigh(gk[rows_a][:, rows_a] + gk[rows_b][:, rows_b])
    u, evals = evecs.flip(-1), evals.flip(-1).clamp_min(0)
    ga = torch.tensor(group, dtype=torch.long)
    gb = ga + half
    # query component 0 of head h: Σ_f U[(group(h), f), 0]·q_{h,f} (real and imaginary parts)
    q_energy = torch.zeros((), dtype=torch.float64, device=gq.device)
    for j in range(g):
        coef = u[j * m:(j + 1) * m, 0]
        heads = gq[j * spec.group_size:(j + 1) * spec.group_size]
        q_energy = q_energy + torch.einsum("f,hfe,e->", coef, heads[:, ga][:, :, ga] + heads[:, gb][:, :, gb], coef)
    score = q_energy.clamp_min(0).sqrt() * evals[0].sqrt()
    return u, chan, score, evals[0] / evals.sum().clamp_min(1e-300)


def rope_groups(chosen: list[int], half: int, fold: int) -> list[list[int]]:
    """FreqFold groups: each kept pair f takes the following pairs f+1..f+fold-1 that are not kept themselves."""
    kept = set(chosen)
    return [[f] + [e for e in range(f + 1, min(f + fold, half)) if e not in kept] for f in chosen]


def select_rope_pairs(scores: torch.Tensor, pairs: int, select: str) -> tuple[list[int], int]:
    """(kept pairs, stride) by the rule ``select``:

    ``norm``:    the ``pairs`` pairs with the largest score (any set; kvtool format);
    ``uniform``: every (half/pairs)-th pair {0, s, 2s, ...} (DeepSeek's rotary with the source rope_theta);
    ``strided``: the arithmetic progression {0, s, 2s, ...} of ``pairs`` pairs with the largest summed score over
                 every stride s that fits; DeepSeek's rotary reproduces it with rope_theta' = θ^(s·rope_dim/d).
    The stride is 0 for ``norm``.
    """
    half = scores.numel()
    if select == "norm":
        return sorted(torch.topk(scores, pairs).indices.tolist()), 0
    if select == "uniform":
        s = half // pairs
        return list(range(0, half, s))[:pairs], s
    if select == "strided":
        top = (half - 1) // max(pairs - 1, 1) if pairs > 1 else 1
        best = max(range(1, top + 1), key=lambda s: (float(scores[[i * s for i in range(pairs)]].sum()), -s))
        return [i * best for i in range(pairs)], best
    raise KvtoolError(f"unknown --rope-select {select!r}: use norm, strided or uniform")


def decouple_rope(w_q: torch.Tensor, w_k: torch.Tensor, c: torch.Tensor, spec: ArchSpec, rope_dim: int,
                  select: str, fold: int = 0,
                  chosen: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], dict]:
    """RoRoPE (+FreqFold) rotation, then keep RoPE on the top component of each kept pair's group.

    Returns (new q weight [n_h*(d_nope+d_rope), D], k_nope weight [d_nope, D], k_pe weight [d_rope, D],
    kept pair indices, info). Each head's q channels are ordered [nope (matching k_nope's rows) | rope]; k_pe is in
    half-split order [a-parts | b-parts] of the kept pairs, rotated at the kept pairs' frequencies. With fold 1 and
    all pairs kept the layout is exact; otherwise the channels that lose RoPE (and, with fold > 1, the frequency
    mismatch of the folded pairs) are the approximation.
    """
    g, d, n_h = spec.num_kv_heads, spec.head_dim, spec.num_heads
    half = d // 2
    pairs = rope_dim // 2
    grams = rope_grams(w_q, w_k, c, spec)
    scores = pair_scores(grams, spec)
    if chosen is None:
        chosen, stride = select_rope_pairs(scores, pairs, select)
    else:
        stride = chosen[1] - chosen[0] if len(chosen) > 1 else 1
    if fold == 0:  # auto: groups partition the pairs for a progression (TransMLA's freqfold = collapse), else 2
        fold = stride if stride > 0 else 2
    wk = w_k.to(torch.float64).view(g, d, -1)
    wq = w_q.to(torch.float64).view(n_h, d, -1)
    # channel layout: (head, pair) -> h*half + f, for the real (a) and imaginary (b) parts
    k_a = torch.cat([wk[h, :half] for h in range(g)])
    k_b = torch.cat([wk[h, half:] for h in range(g)])
    q_a = torch.zeros(n_h, g * half, wq.shape[-1], dtype=torch.float64, device=wq.device)
    q_b = torch.zeros_like(q_a)
    for h in range(n_h):
        j = h // spec.group_size
        q_a[h, j * half:(j + 1) * half] = wq[h, :half]
        q_b[h, j * half:(j + 1) * half] = wq[h, half:]
    pe_slots, shares = [], []
    group_score = 0.0
    for grp in rope_groups(chosen, half, fold):
        u, chan, score, share = _group_rotation(grams, spec, grp)
        k_a[chan], k_b[chan] = u.T @ k_a[chan], u.T @ k_b[chan]
        q_a[:, chan] = torch.einsum("sj,hsD->hjD", u, q_a[:, chan])
        q_b[:, chan] = torch.einsum("sj,hsD->hjD", u, q_b[:, chan])
        pe_slots.append(int(chan[0]))
        shares.append(float(share))
        group_score += float(score)
    keep = torch.ones(g * half, dtype=torch.bool)
    keep[pe_slots] = False
    k_nope = torch.cat([k_a[keep], k_b[keep]])
    k_pe = torch.cat([k_a[pe_slots], k_b[pe_slots]])
    q_new = torch.cat([q_a[:, keep], q_b[:, keep], q_a[:, pe_slots], q_b[:, pe_slots]], dim=1)
    info = {"stride": stride, "fold": fold, "share": sum(shares) / len(shares), "score": group_score,
            "score_share": group_score / max(float(scores.sum()), 1e-300)}
    return q_new.reshape(-1, q_new.shape[-1]), k_nope, k_pe, chosen, info


# ---------------------------------------------------------------------------------------------- the transform

def convert_layers(weights: dict[str, torch.Tensor], stats: Any, spec: ArchSpec, opts: CareOptions,
                   device: str | torch.device = "cpu",
                   sensitivity: dict[str, list[float]] | None = None) -> tuple[list[MlaLayer], dict[str, Any]]:
    """Factor every layer's K and V (and rotate q/k for decoupled RoPE); returns layers and a report.

    ``weights`` is the source model's state dict (HF names); ``stats`` must hold ``attn_in`` for every layer.
    Factorizations run in float64 on ``device``. ``sensitivity`` ({"k": [α per layer], "v": [...]}) is needed by
    the ``sensitivity`` allocation.
    """
    check_options(spec, opts)
    stats.require(REQUIRED_STATS, spec.num_layers)
    total, rope_dim = layer_budget(spec, opts)
    n = spec.num_layers
    aware = opts.method == "care"
    blocks: dict[str, list[dict[str, Any]]] = {"k": [], "v": []}
    extra: list[dict[str, Any]] = []
    chosen_all = None
    if opts.rope == "decoupled" and opts.rope_select == "strided":
        chosen_all = global_stride_pairs(weights, stats, spec, rope_dim, device)
    for i in range(n):
        pre = f"model.layers.{i}.self_attn."
        c = stats.second_moment(i, "attn_in").to(device)
        s, s_inv = damped_sqrt(c, opts.damping)
        w_k, w_v = (weights[pre + f"{p}_proj.weight"].to(device) for p in ("k", "v"))
        info: dict[str, Any] = {}
        if opts.rope == "decoupled":
            q_new, w_k, k_pe, chosen, rinfo = decouple_rope(weights[pre + "q_proj.weight"].to(device), w_k, c, spec,
                                                            rope_dim, opts.rope_select, opts.rope_fold,
                                                            chosen_all)
            info.update(q_new=q_new.cpu(), k_pe=k_pe.cpu(), pairs=chosen, share=rinfo["share"],
                        stride=rinfo["stride"], fold=rinfo["fold"], score_share=rinfo["score_share"])
        extra.append(info)
        for name, w in (("k", w_k), ("v", w_v)):
            u, sv, vh = spectrum(w, s if aware else None)
            left = (s_inv @ (u * sv)) if aware else u * sv  # down for rank r = left[:, :r].T
            energy = sv ** 2 if aware else torch.linalg.svdvals(s @ w.to(torch.float64).T) ** 2
            blocks[name].append({"w": w.cpu(), "left": left.cpu(), "vh": vh.cpu(), "energy": energy.cpu()})
    ranks: dict[str, list[int]] = {"k": [], "v": []}
    bounds = allocation_bounds(spec, opts)
    if opts.rank_alloc in SENSITIVITY_ALLOCATIONS and all(lo < hi for _, lo, hi in bounds.values()):
        if sensitivity is None:
            raise KvtoolError(f"--rank-alloc {opts.rank_alloc} needs the measured K/V sensitivities")
        floor = min(bounds["k"][1], bounds["v"][1])
        width = bounds["k"][0] + bounds["v"][0]
        if opts.rank_alloc == "sensitivity":  # one pool over K and V of all layers
            energies = [b["energy"] * sensitivity[name][i] for name in ("k", "v") for i, b in enumerate(blocks[name])]
            caps = [bounds[name][2] for name in ("k", "v") for _ in range(n)]
            joint = allocate_ranks(energies, n * width, floor, caps, "sensitivity")
            ranks = {"k": joint[:n], "v": joint[n:]}
        else:  # sensitivity-split: one pool per layer (its K and V), every layer the same width
            for i in range(n):
                r_k, r_v = allocate_ranks([blocks[name][i]["energy"] * sensitivity[name][i] for name in ("k", "v")],
                                          width, floor, [bounds["k"][2], bounds["v"][2]], "sensitivity")
                ranks["k"].append(r_k)
                ranks["v"].append(r_v)
        bounds = {}
    for name, (uniform, lo, hi) in bounds.items():
        if opts.rank_alloc == "uniform" or lo == hi:
            ranks[name] = [uniform] * n
        else:
            ranks[name] = allocate_ranks([b["energy"] for b in blocks[name]], uniform * n, lo, hi, opts.rank_alloc)
    layers, per_layer = [], []
    for i in range(n):
        info = extra[i]
        c = stats.second_moment(i, "attn_in")
        out: dict[str, torch.Tensor] = {}
        errs = {}
        for name in ("k", "v"):
            b, r = blocks[name][i], ranks[name][i]
            down, up = b["left"][:, :r].T.contiguous(), b["vh"][:r].T.contiguous()
            out[f"{name}_down"], out[f"{name}_up"] = down, up
            errs[name] = weighted_error(b["w"], up @ down, c)
        layer = MlaLayer(k_down=out["k_down"], k_up=out["k_up"], v_down=out["v_down"], v_up=out["v_up"])
        row = {"layer": i, "r_k": ranks["k"][i], "r_v": ranks["v"][i], "err_k": errs["k"], "err_v": errs["v"]}
        if opts.rope == "decoupled":
            layer.q_weight, layer.k_pe, layer.rope_pairs = info["q_new"], info["k_pe"], info["pairs"]
            row["rope_pairs"] = info["pairs"]
            row["rope_energy_share"] = info["share"]
            row["rope_score_share"] = info["score_share"]
            row["rope_stride"] = info["stride"]
            row["rope_fold"] = info["fold"]
        layers.append(layer)
        per_layer.append(row)
    elem = 2  # bytes per cached value in bf16/fp16 serving
    gqa_width = 2 * spec.kv_width
    widths = [r["r_k"] + r["r_v"] + rope_dim for r in per_layer]
    report = {
        "method": opts.method, "rank_alloc": opts.rank_alloc, "rope": opts.rope, "rope_dim": rope_dim,
        "damping": opts.damping, "layer_width": total,
        "layer_widths": [r["r_k"] + r["r_v"] + rope_dim for r in per_layer],
        "kv_bytes_per_token_before": gqa_width * n * elem, "kv_bytes_per_token_after": sum(widths) * elem,
        "kv_ratio": sum(widths) / (gqa_width * n),
        "mean_err_k": sum(r["err_k"] for r in per_layer) / n, "mean_err_v": sum(r["err_v"] for r in per_layer) / n,
        "layers": per_layer,
    }
    return layers, report


def global_stride_pairs(weights: dict[str, torch.Tensor], stats: Any, spec: ArchSpec, rope_dim: int,
                        device: str | torch.device = "cpu") -> list[int]:
    """The rope pairs {0, s, 2s, ...} (one stride s for every layer: DeepSeek has one rotary) with the largest
    2-norm score summed over layers, each layer's scores normalized to sum 1."""
    total = None
    for i in range(spec.num_layers):
        pre = f"model.layers.{i}.self_attn."
        grams = rope_grams(weights[pre + "q_proj.weight"].to(device), weights[pre + "k_proj.weight"].to(device),
                           stats.second_moment(i, "attn_in").to(device), spec)
        sc = pair_scores(grams, spec).cpu()
        sc = sc / sc.sum().clamp_min(1e-300)
        total = sc if total is None else total + sc
    return select_rope_pairs(total, rope_dim // 2, "strided")[0]


def check_options(spec: ArchSpec, opts: CareOptions) -> None:
    """Reject option/architecture combinations the conversion cannot express (and budgets that cannot work)."""
    if opts.method not in METHODS:
        raise KvtoolError(f"unknown --method {opts.method!r}: use {' or '.join(METHODS)}")
    if opts.rank_alloc not in ALLOCATIONS:
        raise KvtoolError(f"unknown --rank-alloc {opts.rank_alloc!r}: use {', '.join(ALLOCATIONS)}")
    if opts.rope not in ROPE_MODES:
        raise KvtoolError(f"unknown --rope {opts.rope!r}: use keep or decoupled")
    if opts.rope_select not in ROPE_SELECTS:
        raise KvtoolError(f"unknown --rope-select {opts.rope_select!r}: use {', '.join(ROPE_SELECTS)}")
    if opts.rope_fold < 0 or opts.rope_fold > spec.head_dim // 2:
        raise KvtoolError(f"--rope-fold {opts.rope_fold} must be between 1 and head_dim/2 ({spec.head_dim // 2})")
    if opts.damping < 0:
        raise KvtoolError(f"--damping {opts.damping} must be >= 0")
    if opts.rope == "decoupled":
        if spec.qk_norm:
            raise KvtoolError(f"--rope decoupled cannot absorb the per-head q_norm/k_norm of {spec.model_type}: "
                              "use --rope keep")
        if spec.qkv_bias:
            raise KvtoolError(f"--rope decoupled cannot express the q/k biases of {spec.model_type}: use --rope keep")
    allocation_bounds(spec, opts)


def factor_nope(q_nope: torch.Tensor, k_up: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factor one query head's nope bilinear form q_nopeᵀ·k_up (rank ≤ head_dim) into head_dim columns.

    ``q_nope`` [m, D] (m = g*d - rope rows, rank ≤ head_dim because they are a rotation of the head's own d query
    channels), ``k_up`` [m, r_K]. Returns (q [head_dim, D], w_uk [head_dim, r_K], relative residual of the dropped
    singular values) with qᵀ·w_uk = q_nopeᵀ·k_up; the singular values are split evenly between the two factors.
    """
    u, sv, vh = torch.linalg.svd(q_nope.to(torch.float64), full_matrices=False)
    k = min(head_dim, sv.numel())
    root = sv[:k].sqrt()
    q = torch.zeros(head_dim, q_nope.shape[1], dtype=torch.float64)
    w = torch.zeros(head_dim, k_up.shape[1], dtype=torch.float64)
    q[:k] = root[:, None] * vh[:k]
    w[:k] = (root[:, None] * u[:, :k].T) @ k_up.to(torch.float64)
    resid = float(sv[k:].norm() / sv.norm().clamp_min(1e-300))
    return q, w, resid


def per_head_query(q_weight: torch.Tensor, k_up: torch.Tensor, num_heads: int, head_dim: int,
                   rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The lean decoupled query path: (q_proj [n_h*(head_dim + rope), D], k_b [n_h*head_dim, r_K], worst relative
    residual) from the shared form (``q_weight`` [n_h*(g*d - rope + rope), D] reading one shared nope key
    ``k_up`` [g*d - rope, r_K]). Each head's bilinear form q_nopeᵀ·k_up has rank ≤ head_dim (:func:`factor_nope`), so
    the scores are unchanged and q_proj no longer grows g-fold."""
    nope_src = k_up.shape[0]
    q = q_weight.to(torch.float64).view(num_heads, nope_src + rope_dim, -1)
    q_rows, k_rows, worst = [], [], 0.0
    for h in range(num_heads):
        q_nope, w_uk, resid = factor_nope(q[h, :nope_src], k_up, head_dim)
        worst = max(worst, resid)
        q_rows.append(torch.cat([q_nope, q[h, nope_src:]]))
        k_rows.append(w_uk)
    return torch.cat(q_rows), torch.cat(k_rows), worst


def mla_state_dict(weights: dict[str, torch.Tensor], layers: list[MlaLayer], spec: ArchSpec,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kvtool MLA checkpoint tensors: source weights with k/v_proj (and q_proj for decoupled) replaced."""
    out = {k: v for k, v in weights.items()
           if not any(f".self_attn.{p}_proj." in k for p in ("k", "v"))}
    for i, layer in enumerate(layers):
        pre = f"model.layers.{i}.self_attn."
        out[pre + "kv_a_k.weight"] = layer.k_down
        out[pre + "kv_a_v.weight"] = layer.v_down
        out[pre + "k_b.weight"] = layer.k_up
        out[pre + "v_b.weight"] = layer.v_up
        for p in ("k", "v"):
            if pre + f"{p}_proj.bias" in weights:
                out[pre + f"{p}_b.bias"] = weights[pre + f"{p}_proj.bias"]
        if layer.q_weight is not None:  # decoupled: the lean per-head query path
            q_lean, k_lean, _ = per_head_query(layer.q_weight, layer.k_up, spec.num_heads, spec.head_dim,
                                               layer.k_pe.shape[0])
            out[pre + "q_proj.weight"], out[pre + "k_b.weight"] = q_lean, k_lean
            out[pre + "k_pe.weight"] = layer.k_pe
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}
