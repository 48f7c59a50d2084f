"""CorDA: context-oriented decomposition of each target linear into a frozen residual plus a LoRA adapter.

For a linear ``W`` (out×in) whose input ``x`` has second moment ``C = E[x xᵀ]`` (in×in):

1. **Damping.** ``C_λ = C + λ·mean(diag C)·I``; ``λ`` starts at ``damp`` (0.01, PEFT's value) and doubles until the
   inverse error ``‖C_λ·C_λ⁻¹ − I‖_F`` is below ``inverse_tol`` (0.05, PEFT's rule; estimated from 64 columns when
   far below it, see :func:`damped_inverse`). If ``λ`` would exceed
   ``max_damp`` the covariance is singular beyond what damping may fix and :class:`KvtoolError` is raised.
2. **SVD** of ``W·C_λ = U Σ Vᵀ`` in float64, so ``W = U Σ (Vᵀ C_λ⁻¹)`` exactly. Only the ``r`` triplets the adapter
   uses are formed (:func:`top_or_bottom_svd`: from the smaller Gram side, or for KPA's smallest ones from
   ``(mᵀm)⁻¹`` with a residual check, else the full SVD), and only their ``r`` rows of ``Vᵀ C_λ⁻¹``, solved
   against the Cholesky factor of ``C_λ`` (no n×n inverse).
3. **Adapter** from ``r`` components: the smallest (``kpa``, knowledge-preserved: the directions the
   calibration context uses least go to the trainable adapter) or the largest (``ipa``, instruction-previewed).
   ``B = U_r √Σ_r`` (out×r), ``A = √Σ_r (Vᵀ C_λ⁻¹)_r`` (r×in), and the frozen residual is ``W − B·A``, so the
   model's function is unchanged at initialization.

Two baselines share the same output format: ``pissa`` (SVD of ``W`` alone, largest ``r`` components, no
statistics) and ``lora`` (PEFT's default init: ``A`` Kaiming-uniform with a fixed seed, ``B = 0``, residual = ``W``).

Everything here is a pure function of tensors; :func:`corda_transform` walks the target linears of a model's state
dict and returns (adapter tensors with PEFT's key names, residual weights, report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtool.errors import KvtoolError

MODES = ("kpa", "ipa", "pissa", "lora")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# which input statistic (kvtool.calib names) feeds each target linear
STAT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
           "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
PARENT_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
DEFAULT_DAMP = 0.01
DEFAULT_MAX_DAMP = 10.0
DEFAULT_INVERSE_TOL = 0.05


def parse_targets(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Validate ``--targets`` (comma-separated projection names); None -> all attention and MLP projections."""
    if spec is None:
        return ALL_TARGETS
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown or not names:
        raise KvtoolError(f"target module {', '.join(unknown) or '(none given)'} is not a projection kvtool adapts: "
                          f"choose from {','.join(ALL_TARGETS)}")
    return tuple(n for n in ALL_TARGETS if n in names)


def required_stats(targets: tuple[str, ...], mode: str = "kpa") -> tuple[str, ...]:
    """The input statistics CorDA needs for these targets (none for the weight-only baselines)."""
    if mode in ("pissa", "lora"):
        return ()
    wanted = {STAT_OF[t] for t in targets}
    return tuple(n for n in ("attn_in", "o_in", "mlp_in", "down_in") if n in wanted)


def module_key(layer: int, target: str) -> str:
    """HF module path of a target linear in decoder layer ``layer``."""
    return f"model.layers.{layer}.{PARENT_OF[target]}.{target}"


PROBE_COLUMNS = 64  # columns of C_λ·C_λ⁻¹ − I computed to estimate its Frobenius norm (see damped_inverse)
PROBE_MARGIN = 0.1  # an estimate below PROBE_MARGIN·inverse_tol is accepted; above it, the full residual decides


@dataclass
class DampedInverse:
    """A damped covariance ``C_λ``, its Cholesky factor (or explicit inverse), the damping used and the inverse error.

    ``solve_rows(R)`` is ``R·C_λ⁻¹`` (from the factor: n²·rows work, no n×n inverse formed)."""

    damped: torch.Tensor
    factor: torch.Tensor | None
    damp: float
    inverse_error: float
    explicit: torch.Tensor | None = None  # C_λ⁻¹ when C_λ is not positive definite (LU path) or was checked in full
    probed: bool = False  # inverse_error estimated from PROBE_COLUMNS columns (else the full residual)

    def solve_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.factor is not None:
            return torch.cholesky_solve(rows.T.contiguous(), self.factor).T
        return rows @ self.explicit

    @property
    def inverse(self) -> torch.Tensor:
        if self.explicit is None:
            self.explicit = torch.cholesky_inverse(self.factor)
        return self.explicit


def damped_inverse(cov: torch.Tensor, damp: float = DEFAULT_DAMP, max_damp: float = DEFAULT_MAX_DAMP,
                   inverse_tol: float = DEFAULT_INVERSE_TOL, what: str = "covariance") -> DampedInverse:
    """``C_λ = C + λ·mean(diag C)·I`` with λ doubling from ``damp`` until ``‖C_λ C_λ⁻¹ − I‖_F < inverse_tol``.

    Computed in float64 from a Cholesky factor. The Frobenius residual is estimated from ``PROBE_COLUMNS`` evenly
    spaced columns (``‖E_J‖_F·√(n/k)``, n² work instead of the n³ of forming and checking the inverse); an estimate
    above ``PROBE_MARGIN·inverse_tol`` (or a failed factorization) falls back to the explicit inverse and the full
    residual, so the damping chosen is PEFT's rule wherever the decision is close. In float64 with λ ≥ 0.01 the
    residual is ~1e-11 on real statistics (embedded model: ≤ 1.3e-11), nine orders below the tolerance.
    Raises KvtoolError when the covariance is not finite, is zero, or still inverts badly at ``λ > max_damp``.
    """
    c = cov.to(torch.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise KvtoolError(f"{what} has shape {tuple(c.shape)}, expected a square matrix: recalibrate")
    if not torch.isfinite(c).all():
        raise KvtoolError(f"{what} holds NaN/inf values: recalibrate (check the model runs in float32)")
    c = 0.5 * (c + c.T)
    scale = float(torch.diagonal(c).mean())
    if not scale > 0:
        raise KvtoolError(f"{what} is zero (no signal reached this linear): recalibrate with more/other text")
    n = c.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=c.device)
    cols = torch.linspace(0, n - 1, min(n, PROBE_COLUMNS), device=c.device).round().long().unique()
    lam = damp
    while True:
        damped = c + (lam * scale) * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            probe = damped @ torch.cholesky_solve(eye[:, cols], factor) - eye[:, cols]
            est = float(torch.linalg.matrix_norm(probe)) * math.sqrt(n / len(cols))
            if math.isfinite(est) and est < PROBE_MARGIN * inverse_tol:
                return DampedInverse(damped, factor, lam, est, probed=True)
        try:  # the full residual: with the Cholesky inverse, or LU when C_λ is not positive definite
            inverse = torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.inv(damped)
            err = float(torch.linalg.matrix_norm(damped @ inverse - eye))
        except RuntimeError:  # exactly singular
            err = math.inf
        if err < inverse_tol and math.isfinite(err):
            return DampedInverse(damped, factor if int(info) == 0 else None, lam, err, explicit=inverse)
        lam *= 2.0
        if lam > max_damp:
            raise KvtoolError(f"{what} is singular beyond the damping limit (inverse error {err:.3g} at damping "
                              f"{lam / 2:.3g} > --max-damp {max_damp:g}): calibrate on more tokens or raise --max-damp")


@dataclass
class Factor:
    """One adapted linear: adapter ``A`` (r×in) and ``B`` (out×r), the residual base weight, and diagnostics."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    residual: torch.Tensor
    report: dict


def corda_factor(weight: torch.Tensor, cov: DampedInverse | None, rank: int, mode: str, *,
                 seed: int = 0, what: str = "linear", try_gram: bool = True) -> Factor:
    """Split ``weight`` (out×in) into residual + ``B·A`` for one mode; float64 throughout (see module docstring).

    ``try_gram=False`` goes straight to the full SVD (see :func:`top_or_bottom_svd`); the report's ``svd`` says
    which path ran."""
    if mode not in MODES:
        raise KvtoolError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    w = weight.detach().to(torch.float64)
    out_f, in_f = w.shape
    if not 0 < rank < min(out_f, in_f):
        raise KvtoolError(f"rank {rank} is not below min(in, out) = {min(out_f, in_f)} of {what} "
                          f"({out_f}×{in_f}): choose --rank between 1 and {min(out_f, in_f) - 1}")
    report: dict = {"shape": [out_f, in_f]}
    if mode == "lora":
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) as in PEFT / nn.Linear
        a = ((torch.rand(rank, in_f, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(w.device)
        b = torch.zeros(out_f, rank, dtype=torch.float64, device=w.device)
        report.update(energy_kept=0.0)
        return Factor(a, b, w.clone(), report)
    if mode == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        t = Triplets(u[:, :rank], s[:rank], vh[:rank], float(s.square().sum()), float(s[0]), "full")
        right = t.vh
    else:  # kpa / ipa
        if cov is None:
            raise KvtoolError(f"mode {mode} needs input statistics for {what}: pass --stats or let kvtool collect them")
        if cov.damped.shape[0] != in_f:
            raise KvtoolError(f"statistics for {what} are {cov.damped.shape[0]}-wide but the linear takes {in_f} "
                              "inputs: recalibrate on this model")
        idx = slice(-rank, None) if mode == "kpa" else slice(0, rank)
        t = top_or_bottom_svd(w @ cov.damped, idx, try_gram)
        report["svd"] = t.path
        if t.path == "inverse":
            report["svd_residual"] = t.residual
        right = cov.solve_rows(t.vh)  # only the r rows the adapter uses
        report.update(damp=cov.damp, inverse_error=cov.inverse_error, inverse_error_probed=cov.probed)
    root = t.s.sqrt()
    return _finish(w, root[:, None] * right, t.u * root, t, report)


INVERSE_PATH_TOL = 1e-7  # accept the inverse path's triplets when ‖mᵀu − vσ‖_F ≤ this · ‖m‖_F (else the full SVD)
INVERSE_PATH_OVERSAMPLE = 16  # extra eigenvectors of (mᵀm)⁻¹ refined with the r chosen ones (Rayleigh–Ritz)


@dataclass
class Triplets:
    """``r`` singular triplets of ``m``: ``u`` (rows×r), ``s`` (r, descending), ``vh`` (r×cols); ``energy`` = ``‖m‖_F²``
    (the sum of all σ²), ``sigma_max``, and the ``path`` that computed them (``gram``, ``inverse`` or ``full``)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    energy: float
    sigma_max: float
    path: str
    residual: float = 0.0  # ‖mᵀu − vσ‖_F / ‖m‖_F of the inverse path (0 for the others: exact by construction)


def top_or_bottom_svd(m: torch.Tensor, idx: slice, try_gram: bool = True) -> Triplets:
    """Singular triplets ``idx`` of ``m`` (descending order, like ``torch.linalg.svd``), in float64.

    Three paths, cheapest first:

    * ``gram``: eigendecomposition of the smaller Gram matrix (``m mᵀ`` or ``mᵀ m``), the other factor recovered as
      ``mᵀu/σ`` or ``m v/σ``. Squaring costs relative accuracy on singular values far below the largest (about
      ``eps · σ_max² / σ²``), so it is used only when every chosen one is at least ``1e-4 · σ_max`` (and
      ``try_gram``).
    * ``inverse`` (the smallest triplets only, as KPA takes): ``R`` from a QR of ``m`` (tall side), the
      eigendecomposition of ``(mᵀm)⁻¹ = R⁻¹R⁻ᵀ`` (its largest eigenvalues are the smallest σ's, computed to
      accuracy relative to themselves), ``r + 16`` of its eigenvectors refined by one inverse iteration, then
      Rayleigh–Ritz on ``m``. Accepted when the residual ``‖mᵀu − vσ‖_F`` is below ``1e-7 · ‖m‖_F``; on the embedded
      model's 210 KPA modules it is ≤ 7.4e-9 and the adapters agree with the full SVD's to ≤ 1.2e-9 relative, below
      the float32 rounding of the written adapter (6e-8). About 1.6x faster than the full SVD.
    * ``full``: ``torch.linalg.svd``.
    """
    out_f, in_f = m.shape
    fro2 = float(m.square().sum())
    if try_gram:
        wide = out_f <= in_f
        vals, vecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
        vals, vecs = vals.flip(0), vecs.flip(1)  # descending
        s = vals.clamp_min(0).sqrt()
        chosen, sv = vecs[:, idx], s[idx]
        if float(sv.min()) >= 1e-4 * float(s[0]):
            if wide:
                return Triplets(chosen, sv, (m.T @ chosen / sv).T, fro2, float(s[0]), "gram")
            return Triplets(m @ chosen / sv, sv, chosen.T, fro2, float(s[0]), "gram")
    n = min(out_f, in_f)
    r = len(range(n)[idx])
    if idx.stop is None and idx.start is not None and idx.start < 0 and r + INVERSE_PATH_OVERSAMPLE < n:
        found = _bottom_by_inverse(m, r, fro2)
        if found is not None:
            return found
    # squared spread > 1e8 and the inverse path not applicable or not accurate enough: the full SVD
    u, s_full, vh = torch.linalg.svd(m, full_matrices=False)
    return Triplets(u[:, idx], s_full[idx], vh[idx], fro2, float(s_full[0]), "full")


def _bottom_by_inverse(m: torch.Tensor, r: int, fro2: float) -> Triplets | None:
    """The ``r`` smallest singular triplets of ``m`` from ``(mᵀm)⁻¹`` (see :func:`top_or_bottom_svd`); None when
    ``m`` is (numerically) rank-deficient or the residual check fails."""
    wide = m.shape[0] < m.shape[1]
    a = m.T if wide else m  # tall: rows ≥ columns = n
    rr = torch.linalg.qr(a, mode="r").R
    if not bool((torch.diagonal(rr).abs() > 0).all()):
        return None
    g = torch.cholesky_inverse(rr.T)  # (RᵀR)⁻¹ = (aᵀa)⁻¹, from the triangular factor
    if not bool(torch.isfinite(g).all()):
        return None
    _, vecs = torch.linalg.eigh(g)  # ascending: the largest (= the smallest σ's) last
    basis = vecs[:, -(r + INVERSE_PATH_OVERSAMPLE):]
    # one inverse iteration: damps what rounding in forming (aᵀa)⁻¹ mixed in from the large-σ directions
    basis = torch.linalg.solve_triangular(rr, torch.linalg.solve_triangular(rr.T, basis, upper=False), upper=True)
    basis = torch.linalg.qr(basis).Q
    ub, s, vbh = torch.linalg.svd(a @ basis, full_matrices=False)  # Rayleigh–Ritz, descending
    u, s, v = ub[:, -r:], s[-r:], basis @ vbh[-r:].T
    residual = float(torch.linalg.matrix_norm(a.T @ u - v * s)) / math.sqrt(fro2)
    if not residual <= INVERSE_PATH_TOL:
        return None
    sigma_max = _largest_singular_value(rr)
    if wide:  # a = mᵀ: swap the roles of u and v
        return Triplets(v, s, u.T, fro2, sigma_max, "inverse", residual)
    return Triplets(u, s, v.T, fro2, sigma_max, "inverse", residual)


def _largest_singular_value(rr: torch.Tensor, steps: int = 30) -> float:
    """σ_max of a triangular ``R`` by power iteration on ``RᵀR`` (a report figure; a lower bound, typically to 1e-6)."""
    x = torch.ones(rr.shape[0], dtype=rr.dtype, device=rr.device)
    x = x / x.norm()
    for _ in range(steps):
        y = rr.T @ (rr @ x)
        x = y / y.norm()
    return float((rr @ x).norm())


def _finish(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: Triplets, report: dict) -> Factor:
    residual = w - b @ a
    report.update(energy_kept=float(t.s.square().sum()) / t.energy,
                  sigma_first=float(t.s[0]), sigma_last=float(t.s[-1]), sigma_max=t.sigma_max,
                  reconstruction_error=float(torch.linalg.matrix_norm(residual + b @ a - w)
                                             / torch.linalg.matrix_norm(w)),
                  residual_norm_ratio=float(torch.linalg.matrix_norm(residual) / torch.linalg.matrix_norm(w)))
    return Factor(a, b, residual, report)


CovarianceFn = Callable[[int, str], torch.Tensor]


def corda_transform(weights: dict[str, torch.Tensor], covariance: CovarianceFn | None, num_layers: int,
                    targets: tuple[str, ...], rank: int, mode: str, *, damp: float = DEFAULT_DAMP,
                    max_damp: float = DEFAULT_MAX_DAMP, inverse_tol: float = DEFAULT_INVERSE_TOL,
                    seed: int = 0, adapter_dtype: torch.dtype = torch.float32,
                    base_dtype: torch.dtype | None = None, layers: list[int] | None = None,
                    on_layer: Callable[[int], None] | None = None, device: str | torch.device = "cpu",
                    in_place: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """CorDA (or a baseline) for every target linear of every (selected) layer.

    Args:
        weights: the model's state dict (``model.layers.{i}.{self_attn|mlp}.{target}.weight`` are read).
        covariance: ``(layer, stat_name) -> second moment`` (in×in); unused for ``pissa``/``lora``.
        num_layers: decoder layers in the model.
        targets: projection names (see :data:`ALL_TARGETS`).
        rank: adapter rank r (same for every target).
        mode: ``kpa``, ``ipa``, ``pissa`` or ``lora``.
        damp, max_damp, inverse_tol: damping rule of :func:`damped_inverse`.
        seed: seed of the ``lora`` baseline's random ``A`` (offset per module, deterministic).
        adapter_dtype: dtype of the written adapter tensors; base_dtype: of the residual weights (default: input's).
        layers: only these layer indices (default all).
        on_layer: called after each layer (progress).
        device: where the float64 factorizations run (e.g. ``cuda``); results come back to the CPU.
        in_place: write each residual into its tensor of ``weights`` as soon as it is computed (the caller's model
            becomes the residual base; peak memory holds no second copy of the target weights); the returned
            residual dict then maps to those same tensors.

    Returns:
        (adapter tensors keyed ``base_model.model.<module>.lora_{A,B}.weight``, residual weights keyed like
        ``weights``, report with per-module energy kept, damping and inverse error).
    """
    if mode not in MODES:
        raise KvtoolError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    chosen = list(range(num_layers)) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise KvtoolError(f"layer {bad[0]} does not exist (the model has {num_layers}): use --layers within "
                          f"0..{num_layers - 1}")
    for t in targets:
        if f"{module_key(chosen[0], t)}.weight" not in weights:
            raise KvtoolError(f"target module {t} is not present in this model ({module_key(chosen[0], t)}): "
                              f"drop it from --targets")
    adapter: dict[str, torch.Tensor] = {}
    residual: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    gram_ok: dict[str, bool] = {}
    for i in chosen:
        inverses: dict[str, DampedInverse] = {}
        for j, t in enumerate(targets):
            key = module_key(i, t)
            w = weights[f"{key}.weight"]
            cov = None
            if mode in ("kpa", "ipa"):
                stat = STAT_OF[t]
                if stat not in inverses:
                    if covariance is None:
                        raise KvtoolError(f"mode {mode} needs input statistics: pass --stats or collect them")
                    inverses[stat] = damped_inverse(covariance(i, stat).to(device), damp, max_damp, inverse_tol,
                                                    what=f"statistic {stat} of layer {i}")
                cov = inverses[stat]
            f = corda_factor(w.to(device), cov, rank, mode, seed=seed * 1_000_003 + i * len(ALL_TARGETS) + j,
                             what=key, try_gram=gram_ok.get(t, True))
            if f.report.get("svd") in ("inverse", "full"):  # this projection's W·C_λ spread past the Gram once:
                gram_ok[t] = False  # later layers' same projection skip the Gram attempt (KPA: 74% of modules)
            adapter[f"base_model.model.{key}.lora_A.weight"] = f.lora_a.to("cpu", adapter_dtype).contiguous()
            adapter[f"base_model.model.{key}.lora_B.weight"] = f.lora_b.to("cpu", adapter_dtype).contiguous()
            if in_place:
                with torch.no_grad():
                    w.copy_(f.residual)
                residual[f"{key}.weight"] = w
            else:
                residual[f"{key}.weight"] = f.residual.to("cpu", base_dtype or w.dtype).contiguous()
            modules[key] = {"layer": i, "target": t, **({"stat": STAT_OF[t]} if cov is not None else {}), **f.report}
        if on_layer is not None:
            on_layer(i)
    energies = [m["energy_kept"] for m in modules.values()]
    report = {
        "mode": mode, "rank": rank, "targets": list(targets), "layers": chosen, "modules": modules,
        "energy_kept_mean": sum(energies) / len(energies),
        "energy_kept_max": max(energies),
        "energy_kept_min": min(energies),
        "adapter_parameters": int(sum(t.numel() for t in adapter.values())),
    }
    if mode in ("kpa", "ipa"):
        report["damp_max"] = max(m["damp"] for m in modules.values())
        report["inverse_error_max"] = max(m["inverse_error"] for m in modules.values())
    return adapter, residual, report


def adapter_config(targets: tuple[str, ...], rank: int, base_model: str | None,
                   layers: list[int] | None = None, num_layers: int | None = None) -> dict:
    """``adapter_config.json`` for stock PEFT: a plain LoRA with ``lora_alpha = r`` (scale 1), no dropout."""
    restrict = layers is not None and num_layers is not None and sorted(set(layers)) != list(range(num_layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "layers_to_transform": sorted(set(layers)) if restrict else None,
        "layers_pattern": "layers" if restrict else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
