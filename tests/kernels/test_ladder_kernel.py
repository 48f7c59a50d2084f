"""Fused residual add + RMSNorm of the ladder block (Triton, under TRITON_INTERPRET=1) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kvtool.kernels.ladder_norm import add_rmsnorm, add_rmsnorm_reference


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = (torch.randn(shape, generator=g) * 3).to(dtype)
    a = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(shape, generator=g).to(dtype)
    w = torch.empty(shape[-1]).uniform_(0.5, 1.5, generator=g).to(dtype)
    return r, a, b, w


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96), (1, 1, 200)])  # 96, 200: not powers of two (masked tail)
@pytest.mark.parametrize("n_inputs", [0, 1, 2])
def test_kernel_matches_reference_fp32(shape, n_inputs):
    r, a, b, w = _inputs(shape, torch.float32, seed=len(shape) + n_inputs)
    a = a if n_inputs >= 1 else None
    b = b if n_inputs >= 2 else None
    r_ref, y_ref = add_rmsnorm_reference(r, a, b, w, 1e-6)
    r_k, y_k = add_rmsnorm(r, a, b, w, 1e-6)
    torch.testing.assert_close(r_k, r_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_k, y_ref, rtol=1e-5, atol=1e-5)
    # the reference really is r + a + b followed by RMSNorm (guards against a reference that is wrong the same way)
    s = r.double() + (a.double() if a is not None else 0) + (b.double() if b is not None else 0)
    expect = w.double() * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y_k.double(), expect, rtol=1e-5, atol=1e-5)


def test_kernel_bfloat16_within_one_ulp():
    r, a, b, w = _inputs((4, 128), torch.bfloat16, seed=3)
    r_ref, y_ref = add_rmsnorm_reference(r, a, b, w, 1e-5)
    r_k, y_k = add_rmsnorm(r, a, b, w, 1e-5)
    assert r_k.dtype == y_k.dtype == torch.bfloat16
    # same fp32 sum; the CPU interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest): <= 1 ulp (2^-7)
    ulp = 2.0 ** -7 * r_ref.float().abs()
    assert ((r_k.float() - r_ref.float()).abs() <= ulp).all()
    torch.testing.assert_close(y_k.float(), y_ref.float(), rtol=2 ** -6, atol=2e-2)


def test_kernel_in_place_residual():
    r, a, _, w = _inputs((3, 64), torch.float32, seed=5)
    r_ref, y_ref = add_rmsnorm_reference(r.clone(), a, None, w, 1e-6)
    buf = r.clone()
    r_k, y_k = add_rmsnorm(buf, a, None, w, 1e-6, out_residual=buf)
    assert r_k.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, r_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_k, y_ref, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_mismatched_inputs():
    r, a, _, w = _inputs((3, 64), torch.float32)
    with pytest.raises(ValueError, match="residual inputs must match"):
        add_rmsnorm(r, a[:2], None, w, 1e-6)
