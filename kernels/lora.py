"""Fused LoRA linear: ``y = x·W_resᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias)`` in one Triton kernel, one pass over ``x``.

Each program owns an output tile ``[BM, BN]``. While it streams ``x`` along K for the base product ``x·W_resᵀ``
it also accumulates the rank-r projection ``x·Aᵀ`` (``[BM, BR]``, fp32) from the same ``x`` tiles, then adds
``(x·Aᵀ)·B_tileᵀ`` before the single store. ``x·Aᵀ`` is recomputed by every N-tile of a row block (extra
work ``r/BN`` of the base product) instead of going through memory, so ``x`` is read once per tile and ``y``
written once: no separate shrink/expand launches and no intermediate tensor.

:func:`lora_linear_reference` is the unfused PyTorch computation; :func:`lora_linear` picks block sizes and launches.
Tested under ``TRITON_INTERPRET=1`` on the CPU; the GPU timing is ``bench/gpu_lora.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Unfused PyTorch LoRA linear: ``x @ Wᵀ + scale * (x @ Aᵀ) @ Bᵀ (+ bias)`` (what PEFT's forward does)."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scale * ((x @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T)


@triton.jit
def _lora_linear_kernel(x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                        stride_ym, stride_yn, scale,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    xa = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)
        if UPCAST:  # the CPU interpreter's tl.dot mishandles bfloat16 operands (triton 3.9); GPU runs stay bf16
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
            xa = tl.dot(x, a, xa, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
            xa = tl.dot(x, a, xa)
    b = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
    xa = (xa * scale).to(b.dtype)
    if UPCAST:
        xa = xa.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(xa, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(xa, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def default_blocks(m: int, n: int, k: int) -> dict[str, int]:
    """Block sizes for an (m tokens) × (n out) × (k in) problem, from the H100 block sweep of ``bench/gpu_lora.py``
    (docs/gpu-logs/lora_h100.log): decode uses 16-row tiles (narrow, deep ones for long K such as down_proj),
    medium batches 64/128-row tiles, prefill 128×128 tiles."""
    if m <= 16:
        long_k = k >= 8192
        return {"BM": 16, "BN": 32 if long_k else 64, "BK": 128 if long_k else 64, "num_warps": 4, "num_stages": 4}
    if m <= 128:
        return {"BM": min(128, max(32, triton.next_power_of_2(m))), "BN": 64, "BK": 64, "num_warps": 4,
                "num_stages": 4}
    return {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                bias: torch.Tensor | None = None, scale: float = 1.0,
                blocks: dict[str, int] | None = None) -> torch.Tensor:
    """Fused ``x @ Wᵀ + scale * (x @ Aᵀ) @ Bᵀ (+ bias)`` for ``x`` (..., in), W (out, in), A (r, in), B (out, r).

    Accumulates in fp32; float32 inputs use IEEE fp32 products (no TF32). ``blocks`` overrides the block sizes
    (keys BM, BN, BK, num_warps, num_stages).
    """
    n, k = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k or lora_a.shape[1] != k or lora_b.shape != (n, r):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, "
                         f"B {tuple(lora_b.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    lora_a = lora_a.to(x.dtype)
    lora_b = lora_b.to(x.dtype)
    weight = weight.to(x.dtype)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    cfg = {**default_blocks(m, n, k), **(blocks or {})}
    br = max(16, triton.next_power_of_2(r))
    grid = (triton.cdiv(m, cfg["BM"]), triton.cdiv(n, cfg["BN"]))
    _lora_linear_kernel[grid](
        x2, weight, lora_a, lora_b, bias if bias is not None else y, y, m, n, k, r,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), float(scale),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BR=br, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*lead, n)


class FusedLoraLinear(torch.nn.Module):
    """A linear layer with a LoRA adapter whose forward runs :func:`lora_linear` (inference only)."""

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 bias: torch.Tensor | None = None, scale: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.lora_a = torch.nn.Parameter(lora_a.to(weight.dtype), requires_grad=False)
        self.lora_b = torch.nn.Parameter(lora_b.to(weight.dtype), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.weight, self.lora_a, self.lora_b, self.bias, self.scale)
