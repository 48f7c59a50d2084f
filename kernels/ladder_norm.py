"""Fused residual add + RMSNorm of the ladder block: ``r' = r + a (+ b)``, ``y = w · rmsnorm(r')`` in one pass.

In a ladder block the output of module ``j-2`` arrives (all-reduced) just before module ``j`` starts; it is added
to the residual stream and the sum is normalized for module ``j``. At the end of the decoder both pending
outputs (the last attention and the last MLP) are added before the final norm: two residual inputs. One
program per row (token) loads ``r``, ``a`` and optionally ``b``, sums in fp32, stores the new residual in the
input dtype, and normalizes *that stored value* (as an unfused ``r = r + a; norm(r)`` in the model's dtype does),
so kernel and reference agree to float rounding in fp32 and to one bf16/fp16 ulp of the normalized output.

:func:`add_rmsnorm_reference` is the unfused PyTorch computation (HF's RMSNorm convention: normalize in fp32,
cast to the input dtype, multiply by the weight); :func:`add_rmsnorm` launches the kernel (block = the next
power of two of the hidden size). Tested under ``TRITON_INTERPRET=1`` on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rmsnorm_reference(residual: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
                          weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused: ``r' = r + a (+ b)`` (summed in fp32, stored in r's dtype), ``y = w * rmsnorm(r')``; returns (r', y)."""
    s = residual.float()
    if a is not None:
        s = s + a.float()
    if b is not None:
        s = s + b.float()
    new = s.to(residual.dtype)
    x = new.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return new, weight * x.to(residual.dtype)


@triton.jit
def _add_rmsnorm_kernel(r_ptr, a_ptr, b_ptr, w_ptr, r_out_ptr, y_ptr, N, eps,
                        HAS_A: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    base = row * N
    s = tl.load(r_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_A:
        s += tl.load(a_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        s += tl.load(b_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    stored = s.to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + base + cols, stored, mask=mask)
    x = stored.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    x = x * tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * x.to(r_out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(residual: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, weight: torch.Tensor,
                eps: float, out_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton version of :func:`add_rmsnorm_reference`; ``out_residual`` may alias ``residual`` (in place).

    Shapes: ``residual``, ``a``, ``b``: (..., N) contiguous, same dtype; ``weight``: (N,). The output ``y`` has the
    dtype of ``weight * residual`` as in the reference (weight and residual normally share the model dtype).
    """
    n = residual.shape[-1]
    for t in (a, b):
        if t is not None and (t.shape != residual.shape or t.dtype != residual.dtype):
            raise ValueError(f"residual inputs must match the residual: {tuple(t.shape)} {t.dtype} vs "
                             f"{tuple(residual.shape)} {residual.dtype}")
    r = residual.contiguous()
    a_c = a.contiguous() if a is not None else r
    b_c = b.contiguous() if b is not None else r
    r_out = out_residual if out_residual is not None else torch.empty_like(r)
    y = torch.empty(r.shape, dtype=torch.promote_types(weight.dtype, r.dtype), device=r.device)
    rows = r.numel() // n if n else 0
    if rows:
        block = triton.next_power_of_2(n)
        warps = 1 if block <= 512 else 4 if block <= 4096 else 8
        _add_rmsnorm_kernel[(rows,)](r, a_c, b_c, weight.contiguous(), r_out, y, n, float(eps),
                                     HAS_A=a is not None, HAS_B=b is not None, BLOCK=block, num_warps=warps)
    return r_out, y
