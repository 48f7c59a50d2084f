"""Fused LoRA Triton kernel vs its PyTorch reference (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from kvtool.kernels.lora import FusedLoraLinear, default_blocks, lora_linear, lora_linear_reference


@pytest.mark.parametrize("m,n,k,r", [(1, 48, 40, 3), (5, 70, 100, 16), (33, 64, 64, 8), (17, 96, 32, 20)])
def test_fp32_matches_reference(m, n, k, r):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a, b, bias = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g), torch.randn(n, generator=g)
    for bias_ in (None, bias):
        got = lora_linear(x, w, a, b, bias_, scale=0.5)
        ref = lora_linear_reference(x, w, a, b, bias_, scale=0.5)
        assert got.shape == (m, n)
        assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_half_precision_batched_input(dtype, tol):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 40, generator=g).to(dtype)
    w = torch.randn(48, 40, generator=g).to(dtype)
    a, b = torch.randn(4, 40, generator=g), torch.randn(48, 4, generator=g)
    got = lora_linear(x, w, a, b).float()
    exact = lora_linear_reference(x.float(), w.float(), a.to(dtype).float(), b.to(dtype).float())
    assert got.shape == (2, 3, 48)
    assert (got - exact).abs().max() < tol * exact.abs().max()


def test_adapter_term_is_really_added():
    # W = 0 isolates the low-rank path; B = 0 isolates the base path
    g = torch.Generator().manual_seed(3)
    x, a, b = torch.randn(4, 32, generator=g), torch.randn(2, 32, generator=g), torch.randn(24, 2, generator=g)
    zero_w = torch.zeros(24, 32)
    assert torch.allclose(lora_linear(x, zero_w, a, b), (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    w = torch.randn(24, 32, generator=g)
    assert torch.allclose(lora_linear(x, w, a, torch.zeros(24, 2)), x @ w.T, rtol=1e-5, atol=1e-5)


def test_block_overrides_and_module():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(40, 64, generator=g), torch.randn(80, 64, generator=g)
    a, b = torch.randn(8, 64, generator=g), torch.randn(80, 8, generator=g)
    ref = lora_linear_reference(x, w, a, b)
    for blocks in ({"BM": 16, "BN": 32, "BK": 32}, {"BM": 64, "BN": 128, "BK": 64}):
        assert (lora_linear(x, w, a, b, blocks=blocks) - ref).abs().max() < 1e-5 * ref.abs().max()
    mod = FusedLoraLinear(w, a, b)
    assert torch.allclose(mod(x), ref, rtol=1e-5, atol=1e-4)
    assert default_blocks(1, 4096, 4096)["BM"] == 16 and default_blocks(2048, 4096, 4096)["BM"] == 128


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 7), torch.randn(4, 2))
