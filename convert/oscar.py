"""OSCAR-style attention-aware rotations and clipping ratios for 2-bit KV caches (``kvtool export``).

Per decoder layer and KV head ``g`` (head_dim ``d``, the query heads ``h`` of the group):

Error that matters
    Keys: a query reads a key only through the logit ``q·k``, so a key error ``Δk`` costs
    ``E_q[(q·Δk)²] = Δkᵀ C_Q Δk`` with ``C_Q = Σ_h E[q_h q_hᵀ]`` (the ``q`` statistic: after RoPE, summed over the
    group's query heads). Values: the output sees ``Σ_h W_o^h Σ_j p_hj Δv_j`` (``W_o^h``: the d columns of o_proj
    for head h). Treating the errors of different tokens and heads as uncorrelated, token j costs
    ``Σ_h p_hj² Δv_jᵀ W_o^hᵀ W_o^h Δv_j``; the attention weights are a common factor, so the value weight is
    ``M_V = Σ_h W_o^hᵀ W_o^h``. The per-token, per-head cost is ``e_K = Δkᵀ C_Q Δk`` and ``e_V = Δvᵀ M_V Δv``.

Rotation (row convention ``k' = R k``; R orthogonal, so ``(Rq)·(Rk) = q·k`` and ``R_v`` folds into W_v, W_o)
    With per-token asymmetric quantization of a group, the error of every element is set by one step
    ``scale = range / (2^b - 1)``: after a rotation that spreads energy evenly (Hadamard) the error is nearly
    isotropic, ``E[Δk Δkᵀ] ≈ σ² I`` with ``σ² ∝ E[range(Rk)²]``, and the cost is ``σ² tr(C_Q)``. So for a fixed
    weight the rotation should make the rotated vectors as *flat* as possible. Two facts give the rotation:

    1. The per-token zero point absorbs any component along the constant vector ``1/√d`` exactly. The Sylvester
       Hadamard matrix ``H`` has a constant first column, so ``R = H Uᵀ`` maps the first column ``u₁`` of an
       orthonormal basis ``U`` onto the constant vector: the key's component along ``u₁`` costs nothing, and
       ``H`` spreads the rest evenly. Taking ``U`` = eigenvectors (descending) of a second moment puts its
       dominant direction there; LLM keys and values have a large, stable dominant direction (a mean/bias-like
       component and RoPE's slow channels), which otherwise sets the range of every token.
    2. Which second moment: the key's own ``C_K`` (removes the most range) or the query's ``C_Q`` (the direction the
       logits are most sensitive to); for values ``C_V`` or ``M_V``. Both candidates are evaluated on calibration
       keys/values with the attention-aware cost and the better one is kept per layer and head (recorded in
       the report). This is the ``cov-hadamard`` mode (default).

    Ablations (``--rotation``): ``none`` (R = I), ``hadamard`` (randomized Hadamard, seeded signs: the
    QuaRot-style baseline), ``cov`` (R = Uᵀ with U the eigenvectors of the attention-aware target ``C_Q`` for keys
    and ``M_V`` for values: the covariance rotation alone), ``cov-hadamard`` (above).

Clipping
    For each layer, head and K/V, the clip ratio ``a`` (range shrunk around its midpoint, see
    :mod:`kvtool.kvquant`) is chosen from a grid (default 1.00, 0.95, ..., 0.50) to minimize the mean
    attention-aware cost over calibration keys/values; ``--no-clip`` keeps ``a = 1``.

OSCAR as released (``--rotation released``; FutureMLS-Lab/OSCAR ``rotation/compute_kv_rotation.py``, method
``qqt_sst``, composition ``r_h_pbr``): one rotation per layer, shared by its KV heads.

    Σ_K = (1/G) Σ_g mean over the group's query rows of ``q qᵀ`` (post-RoPE queries: the ``q`` statistic / rep);
    Σ_V = (1/G) Σ_g Vᵀ diag(w) V / n with ``w_t = k_t Σ_Q,g k_tᵀ`` normalised to mean 1 (tokens whose keys draw
    attention weigh more); for each, ``U`` = eigenvectors (ascending, as ``eigh`` returns them), ``H`` the
    Sylvester Hadamard matrix, ``P`` the bit-reversal permutation of the eigenvalue-sorted directions; the released
    code rotates rows as ``x @ (U H P)``, so in kvtool's row convention ``R = (U H P)ᵀ``. Clipping is not searched:
    each rotated (token, head) row is clamped at a fixed quantile of ``|row|`` (0.96 keys, 0.92 values;
    :func:`kvtool.runtime.kvquant.quantile_clip`). Needs head_dim a power of two (Hadamard, bit reversal).

Numerics: float64; eigendecompositions of ``C + δI`` with ``δ = 1e-9 · tr(C)/d`` (damping only breaks exact
ties); deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvtool.errors import KvtoolError
from kvtool.runtime.kvquant import check_bits_group, fake_quantize, hadamard, quantile_clip

ROTATIONS = ("none", "hadamard", "cov", "cov-hadamard", "released")
CLIPS = ("search", "quantile", "none")
DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


@dataclass
class OscarOptions:
    """Options of the OSCAR transform."""

    bits: int = 2
    group_size: int | None = None
    rotation: str = "cov-hadamard"
    clip: str = "search"
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID
    k_quantile: float = 0.96
    v_quantile: float = 0.92
    residual_window: int = 0
    sink: int = 0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, head_dim: int) -> None:
        """Raise KvtoolError on bad options."""
        if self.rotation not in ROTATIONS:
            raise KvtoolError(f"--rotation {self.rotation!r} is unknown: use one of {', '.join(ROTATIONS)}")
        if self.clip not in CLIPS:
            raise KvtoolError(f"--clip {self.clip!r} is unknown: use one of {', '.join(CLIPS)}")
        if self.rotation == "released" and head_dim & (head_dim - 1):
            raise KvtoolError(f"--rotation released needs a power-of-two head_dim (Hadamard, bit reversal), the "
                              f"model has {head_dim}: use --rotation cov-hadamard")
        if not (0 < self.k_quantile <= 1 and 0 < self.v_quantile <= 1):
            raise KvtoolError("--k-quantile and --v-quantile must lie in (0, 1]")
        check_bits_group(self.bits, self.group_size or head_dim, head_dim)
        if self.residual_window < 0 or self.sink < 0:
            raise KvtoolError("--residual-window and --sink must be >= 0")
        if not self.clip_grid or any(not 0 < a <= 1 for a in self.clip_grid):
            raise KvtoolError("clip grid values must lie in (0, 1]")


def eigenbasis(c: torch.Tensor) -> torch.Tensor:
    """Orthonormal eigenvectors of a symmetric PSD matrix as columns, eigenvalues descending (float64, damped)."""
    c = c.to(torch.float64)
    c = (c + c.T) / 2
    d = c.shape[0]
    c = c + torch.eye(d, dtype=torch.float64) * (1e-9 * torch.trace(c).clamp_min(1e-30) / d)
    _, vecs = torch.linalg.eigh(c)
    vecs = vecs.flip(-1)
    signs = torch.sign(vecs[vecs.abs().argmax(0), torch.arange(d)])  # deterministic sign per eigenvector
    return vecs * signs[None, :]


def spread_matrix(d: int) -> torch.Tensor:
    """Orthonormal [d, d] whose first column is the constant vector 1/√d (Sylvester Hadamard for powers of two)."""
    if d & (d - 1) == 0:
        return hadamard(d, signs=False)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a[:, 0] = 1.0
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def bit_reversal_permutation(eigenvalues: torch.Tensor) -> torch.Tensor:
    """P_br [d, d]: column ``br(i)`` of P selects the i-th largest eigen-direction (d a power of two)."""
    d = eigenvalues.numel()
    bits = d.bit_length() - 1
    order = torch.argsort(eigenvalues, descending=True)
    perm = torch.empty(d, dtype=torch.long)
    for i in range(d):
        perm[int(format(i, f"0{bits}b")[::-1], 2) if bits else 0] = order[i]
    return torch.eye(d, dtype=torch.float64)[:, perm]


def released_rotation(c: torch.Tensor) -> torch.Tensor:
    """OSCAR's released rotation of a second moment ``c`` [d, d], in kvtool's row convention: ``(U H P_br)ᵀ``."""
    c = c.to(torch.float64)
    d = c.shape[0]
    c = (c + c.T) / 2 + torch.eye(d, dtype=torch.float64) * (1e-9 * torch.trace(c).clamp_min(1e-30) / d)
    vals, vecs = torch.linalg.eigh(c)
    return (vecs @ hadamard(c.shape[0], signs=False) @ bit_reversal_permutation(vals)).T.contiguous()


def released_moments(c_q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, rep: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_K and Σ_V of one layer as the released code computes them (float64).

    ``c_q`` [G, d, d]: the ``q`` statistic (sum over each group's query heads of E[q qᵀ]); ``ks``, ``vs`` [N, G, d]:
    calibration keys/values of the same layer.
    """
    qtq = c_q.to(torch.float64) / rep  # mean over the group's query rows
    sigma_k = qtq.mean(0)
    sigma_v = torch.zeros_like(sigma_k)
    for g in range(qtq.shape[0]):
        k, v = ks[:, g].to(torch.float64), vs[:, g].to(torch.float64)
        w = ((k @ qtq[g]) * k).sum(-1)
        w = w / w.sum().clamp_min(1e-12) * k.shape[0]
        sigma_v += (v * w[:, None]).T @ v / k.shape[0]
    return sigma_k, sigma_v / qtq.shape[0]


def weighted_error(x: torch.Tensor, rot: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int,
                   clip: float) -> float:
    """Mean attention-aware cost ``Δxᵀ W Δx`` of quantizing rows of x [N, d] after rotation ``rot`` (k' = R k)."""
    y = x @ rot.T
    dx = (fake_quantize(y, bits, group_size, clip) - y) @ rot
    return float(((dx @ weight) * dx).sum(-1).mean())


def search_clip(x: torch.Tensor, rot: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int,
                grid: tuple[float, ...]) -> tuple[float, float]:
    """The grid clip ratio with the smallest weighted error, and that error (ties: the larger ratio)."""
    grid = sorted(grid, reverse=True)
    y = x @ rot.T
    clips = torch.tensor(grid, dtype=y.dtype)[:, None, None]
    ya = y[None].expand(len(grid), -1, -1)
    dx = (fake_quantize(ya, bits, group_size, clips) - ya) @ rot  # [A, N, d]
    errs = ((dx @ weight) * dx).sum(-1).mean(-1)
    best = int(torch.argmin(errs))  # first minimum = the largest ratio among ties
    return grid[best], float(errs[best])


def value_weights(w_o: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """M_V [G, d, d] = Σ_{h in group} W_o^hᵀ W_o^h from o_proj.weight [D, H*d] (float64)."""
    w = w_o.to(torch.float64).reshape(w_o.shape[0], num_heads, head_dim)
    per_head = torch.einsum("ohd,ohe->hde", w, w)
    return per_head.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, head_dim).sum(1)


def _candidates(mode: str, own: torch.Tensor, target: torch.Tensor, seed: int,
                released: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    d = own.shape[0]
    if mode == "released":
        return {"released": released}
    if mode == "none":
        return {"identity": torch.eye(d, dtype=torch.float64)}
    if mode == "hadamard":
        return {"hadamard": hadamard(d, seed).T.contiguous()}
    if mode == "cov":
        return {"target-eigenbasis": eigenbasis(target).T.contiguous()}
    h = spread_matrix(d)
    return {"hadamard*own-eigenbasis": h @ eigenbasis(own).T, "hadamard*target-eigenbasis": h @ eigenbasis(target).T}


def _fit(x: torch.Tensor, own: torch.Tensor, target: torch.Tensor, opts: OscarOptions, gs: int,
         released: torch.Tensor | None = None, quantile: float | None = None
         ) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """Best (rotation, clip) for samples x [N, d] under weight ``target``; returns rotation, clip, report.

    With ``opts.clip == "quantile"`` the clip ratio is 1 and rows are clamped at ``quantile`` instead (the error
    reported includes that clamp)."""
    signal = float(((x @ target) * x).sum(-1).mean())
    grid = opts.clip_grid if opts.clip == "search" else (1.0,)
    best: tuple[str, torch.Tensor, float, float] | None = None
    for name, rot in _candidates(opts.rotation, own, target, opts.seed, released).items():
        if opts.clip == "quantile":
            y = x @ rot.T
            dx = (fake_quantize(quantile_clip(y, quantile), opts.bits, gs) - y) @ rot
            clip, err = 1.0, float(((dx @ target) * dx).sum(-1).mean())
        else:
            clip, err = search_clip(x, rot, target, opts.bits, gs, grid)
        if best is None or err < best[3]:
            best = (name, rot, clip, err)
    name, rot, clip, err = best
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    plain = weighted_error(x, eye, target, opts.bits, gs, 1.0)
    return rot, clip, {"rotation": name, "clip": clip, "rel_error": err / max(signal, 1e-30),
                       "rel_error_plain": plain / max(signal, 1e-30)}


def oscar_transform(w_o: dict[int, torch.Tensor], stats: Any, samples: dict[int, tuple[torch.Tensor, torch.Tensor]],
                    spec: Any, options: OscarOptions, progress: Any = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Rotations and clip ratios per layer and KV head.

    ``w_o``: o_proj weights per layer [D, H*d]; ``stats``: a StatsStore with ``q``, ``k``, ``v``; ``samples``:
    per layer post-RoPE keys and values [N, G, d] from calibration text (positions inside the sink excluded);
    ``spec``: the model's ArchSpec. Returns (tensors for ``oscar.safetensors``, report with per-layer errors).
    ``progress(i)`` is called after each layer.
    """
    d, g_heads = spec.head_dim, spec.num_kv_heads
    options.check(d)
    gs = options.group_size or d
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    for i in sorted(samples):
        c_q, c_k, c_v = (stats.second_moment(i, n) for n in ("q", "k", "v"))
        m_v = value_weights(w_o[i], spec.num_heads, g_heads, d)
        m_v = m_v / m_v.diagonal(dim1=-2, dim2=-1).sum(-1).mean()  # scale-free weight (errors are relative)
        ks, vs = samples[i]
        released = (None, None)
        if options.rotation == "released":
            sigma_k, sigma_v = released_moments(c_q, ks, vs, spec.num_heads // g_heads)
            released = (released_rotation(sigma_k), released_rotation(sigma_v))
        rots = {"k": [], "v": []}
        clips = {"k": [], "v": []}
        heads = []
        for g in range(g_heads):
            rk, ak, rep_k = _fit(ks[:, g].to(torch.float64), c_k[g], c_q[g], options, gs, released[0],
                                 options.k_quantile)
            rv, av, rep_v = _fit(vs[:, g].to(torch.float64), c_v[g], m_v[g], options, gs, released[1],
                                 options.v_quantile)
            rots["k"].append(rk)
            rots["v"].append(rv)
            clips["k"].append(ak)
            clips["v"].append(av)
            heads.append({"k": rep_k, "v": rep_v})
        tensors[f"layers.{i}.k_rotation"] = torch.stack(rots["k"]).float()
        tensors[f"layers.{i}.v_rotation"] = torch.stack(rots["v"]).float()
        tensors[f"layers.{i}.k_clip"] = torch.tensor(clips["k"], dtype=torch.float32)
        tensors[f"layers.{i}.v_clip"] = torch.tensor(clips["v"], dtype=torch.float32)
        mean = {kv: sum(hd[kv]["rel_error"] for hd in heads) / g_heads for kv in ("k", "v")}
        plain = {kv: sum(hd[kv]["rel_error_plain"] for hd in heads) / g_heads for kv in ("k", "v")}
        layers.append({"layer": i, "k_rel_error": mean["k"], "v_rel_error": mean["v"],
                       "k_rel_error_plain": plain["k"], "v_rel_error_plain": plain["v"], "heads": heads})
        if progress is not None:
            progress(i)
    report = {"options": {k: v for k, v in asdict(options).items() if k != "extra"}, "group_size": gs,
              "layers": layers,
              "mean_k_rel_error": sum(r["k_rel_error"] for r in layers) / max(len(layers), 1),
              "mean_v_rel_error": sum(r["v_rel_error"] for r in layers) / max(len(layers), 1),
              "mean_k_rel_error_plain": sum(r["k_rel_error_plain"] for r in layers) / max(len(layers), 1),
              "mean_v_rel_error_plain": sum(r["v_rel_error_plain"] for r in layers) / max(len(layers), 1)}
    return tensors, report


def fold_value_rotation(state: dict[str, torch.Tensor], spec: Any, v_rotation: dict[int, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
    """Fold ``R_v`` into W_v (rows of each KV head: ``R W``) and W_o (columns of each query head: ``W Rᵀ``)."""
    d, rep = spec.head_dim, spec.num_heads // spec.num_kv_heads
    out = dict(state)
    for i, rot in v_rotation.items():
        pre = f"model.layers.{i}.self_attn."
        rot = rot.to(torch.float64)
        wv = out[pre + "v_proj.weight"]
        new_v = torch.cat([rot[g] @ wv[g * d:(g + 1) * d].to(torch.float64) for g in range(spec.num_kv_heads)])
        out[pre + "v_proj.weight"] = new_v.to(wv.dtype)
        if pre + "v_proj.bias" in out:
            bv = out[pre + "v_proj.bias"]
            out[pre + "v_proj.bias"] = torch.cat([rot[g] @ bv[g * d:(g + 1) * d].to(torch.float64)
                                                  for g in range(spec.num_kv_heads)]).to(bv.dtype)
        wo = out[pre + "o_proj.weight"]
        cols = [wo[:, h * d:(h + 1) * d].to(torch.float64) @ rot[h // rep].T for h in range(spec.num_heads)]
        out[pre + "o_proj.weight"] = torch.cat(cols, dim=1).to(wo.dtype)
    return out
