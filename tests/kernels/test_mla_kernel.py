"""Triton MLA decode kernels against their PyTorch references (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from kvtool.kernels.mla_decode import (
    absorbed_launch,
    mla_decode_absorbed,
    mla_decode_absorbed_reference,
    mla_decode_keep,
    mla_decode_keep_reference,
    padded_latent_cache,
)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("heads,dk,dv,length,splits", [(9, 40, 24, 70, None), (4, 16, 16, 5, 1), (20, 72, 33, 130, 3)])
@pytest.mark.parametrize("tile", ["full", "chunked"])
def test_absorbed_matches_reference(heads, dk, dv, length, splits, tile):
    g = torch.Generator().manual_seed(heads + length)
    q, kv, v = (torch.randn(2, heads, dk, generator=g), torch.randn(2, length, dk, generator=g),
                torch.randn(2, length, dv, generator=g))
    out = mla_decode_absorbed(q, kv, v, 0.2, num_splits=splits, block_n=16, block_d=16, tile=tile)
    assert out.shape == (2, heads, dv)
    assert rel(out, mla_decode_absorbed_reference(q, kv, v, 0.2)) < 1e-5


def test_default_launch_is_the_measured_one():
    from kvtool.kernels.mla_decode import absorbed_config

    # Llama-8B shapes at KV ratio 0.5 / 0.25 (key latent 480+64 / 224+64), batch 32 and 1
    assert absorbed_config(32, 32, 544, 480) == {"tile": "full", "block_h": 32, "block_n": 32, "num_warps": 4,
                                                 "num_stages": 3, "waves": 2}
    assert absorbed_config(1, 32, 288, 224)["waves"] == 1
    wide = absorbed_config(1, 32, 800, 736)  # per-layer ranks past 512
    assert (wide["tile"], wide["block_h"], wide["block_n"]) == ("full", 16, 16)
    assert absorbed_config(1, 32, 2112, 2048)["tile"] == "chunked"


def test_output_slices_and_head_blocks_match_reference():
    # dv_parts programs per head block, each with a slice of the output; block_h below the head count
    g = torch.Generator().manual_seed(3)
    q, kv, v = (torch.randn(2, 20, 40, generator=g), torch.randn(2, 70, 40, generator=g),
                torch.randn(2, 70, 56, generator=g))
    ref = mla_decode_absorbed_reference(q, kv, v, 0.2)
    for parts, block_h in ((2, None), (4, 16)):
        out = mla_decode_absorbed(q, kv, v, 0.2, num_splits=2, block_n=16, block_d=16, dv_parts=parts,
                                  block_h=block_h, tile="chunked")
        assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("dk", [40, 32, 16])
def test_full_tile_kernel_matches_reference(dk):
    from kvtool.kernels.mla_decode import key_pieces

    assert key_pieces(544) == (512, 32) and key_pieces(288) == (256, 32) and key_pieces(512) == (512, 16)
    g = torch.Generator().manual_seed(dk)
    q, kv, v = (torch.randn(2, 20, dk, generator=g), torch.randn(2, 70, dk, generator=g),
                torch.randn(2, 70, 24, generator=g))
    out = mla_decode_absorbed(q, kv, v, 0.2, num_splits=3, block_n=16, tile="full", num_stages=2)
    assert rel(out, mla_decode_absorbed_reference(q, kv, v, 0.2)) < 1e-5


def test_wide_latent_takes_fewer_heads_per_program():
    # per-layer ranks past 512: 32 heads x 1024 would spill; 16 heads per program, two head blocks
    assert absorbed_launch(32, 480) == (32, 64, 4)
    assert absorbed_launch(32, 736) == (16, 32, 8)
    assert absorbed_launch(32, 200) == (32, 64, 4)
    assert absorbed_launch(8, 100, block_n=16) == (16, 16, 4)
    assert absorbed_launch(32, 736, num_warps=4) == (16, 32, 4)
    assert absorbed_launch(32, 480, block_n=128, num_warps=8) == (32, 128, 8)
    g = torch.Generator().manual_seed(5)
    q, kv, v = (torch.randn(1, 32, 24, generator=g), torch.randn(1, 20, 24, generator=g),
                torch.randn(1, 20, 600, generator=g))
    out = mla_decode_absorbed(q, kv, v, 0.2, num_splits=2, block_n=16, block_d=16)
    assert rel(out, mla_decode_absorbed_reference(q, kv, v, 0.2)) < 1e-5


def test_padded_rows_read_in_place():
    g = torch.Generator().manual_seed(6)
    kv, v = padded_latent_cache(2, 30, 40, torch.float32, "cpu"), padded_latent_cache(2, 30, 24, torch.float32, "cpu")
    assert kv.stride(1) == 48 and v.stride(1) == 32 and not kv.is_contiguous()
    kv.copy_(torch.randn(2, 30, 40, generator=g))
    v.copy_(torch.randn(2, 30, 24, generator=g))
    q = torch.randn(2, 4, 40, generator=g)
    out = mla_decode_absorbed(q, kv, v, 0.2, num_splits=2, block_n=16, block_d=16)
    assert rel(out, mla_decode_absorbed_reference(q, kv, v, 0.2)) < 1e-5


def keep_inputs(g, bsz, groups, nrep, d, r_k, r_v, length):
    """Random (q, c_k, c_v, w_kb, inv_freq) of the keep kernel's shapes."""
    q = torch.randn(bsz, groups * nrep, d, generator=g)
    c_k, c_v = torch.randn(bsz, length, r_k, generator=g), torch.randn(bsz, length, r_v, generator=g)
    w_kb = torch.randn(groups, r_k, d, generator=g) / r_k ** 0.5
    return q, c_k, c_v, w_kb, 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))


@pytest.mark.parametrize("bias,knorm", [(False, False), (True, False), (False, True)])
def test_keep_matches_reference(bias, knorm):
    g = torch.Generator().manual_seed(3)
    groups, d = 3, 32
    q, c_k, c_v, w_kb, inv_freq = keep_inputs(g, 2, groups, 3, d, 20, 27, 45)
    b_k = torch.randn(groups, d, generator=g) if bias else None
    k_norm = torch.rand(d, generator=g) + 0.5 if knorm else None
    out = mla_decode_keep(q, c_k, c_v, w_kb, inv_freq, 0.18, b_k=b_k, k_norm=k_norm, num_splits=2, block_n=16,
                          block_rk=16)
    ref = mla_decode_keep_reference(q, c_k, c_v, w_kb, inv_freq, 0.18, b_k=b_k, k_norm=k_norm)
    assert rel(out, ref) < 1e-5


def test_keep_reference_equals_gqa_with_rope_at_full_rank():
    """With W_kb invertible (full rank), reconstruct-then-RoPE equals ordinary GQA decode on the RoPE'd keys."""
    g = torch.Generator().manual_seed(5)
    bsz, groups, nrep, d, length = 1, 2, 2, 32, 12
    keys = torch.randn(bsz, groups, length, d, generator=g, dtype=torch.float64)
    w_kb = torch.eye(d, dtype=torch.float64).repeat(groups, 1, 1)
    # c_k holds group 0's keys; use a single group to compare exactly
    q = torch.randn(bsz, nrep, d, generator=g, dtype=torch.float64)
    vals = torch.randn(bsz, length, d, generator=g, dtype=torch.float64)
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    out = mla_decode_keep_reference(q, keys[:, 0], vals, w_kb[:1], inv, d ** -0.5)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    k = keys[:, 0] * cos + torch.cat([-keys[:, 0, :, d // 2:], keys[:, 0, :, : d // 2]], -1) * sin
    att = torch.softmax(torch.einsum("bhd,bsd->bhs", q, k) * d ** -0.5, -1)
    torch.testing.assert_close(out.double(), torch.einsum("bhs,bsd->bhd", att, vals), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", ["full", "chunked"])
def test_absorbed_static_cache_lengths(tile):
    """Rows of a static cache hold fewer valid tokens than slots: ``seq_lens`` equals slicing each row."""
    g = torch.Generator().manual_seed(5)
    q, kv = torch.randn(3, 6, 40, generator=g), torch.randn(3, 90, 40, generator=g)
    v = torch.randn(3, 90, 24, generator=g)
    lens = torch.tensor([90, 37, 1])
    out = mla_decode_absorbed(q, kv, v, 0.2, num_splits=4, block_n=16, block_d=16, tile=tile, seq_lens=lens)
    for b, n in enumerate(lens.tolist()):
        ref = mla_decode_absorbed_reference(q[b:b + 1], kv[b:b + 1, :n], v[b:b + 1, :n], 0.2)
        assert rel(out[b:b + 1], ref) < 1e-5
    assert rel(out, mla_decode_absorbed_reference(q, kv, v, 0.2, seq_lens=lens)) < 1e-5


def test_keep_static_cache_lengths():
    q, c_k, c_v, w_kb, inv_freq = keep_inputs(torch.Generator().manual_seed(6), 2, 2, 2, 32, 20, 27, 50)
    lens = torch.tensor([23, 50])
    out = mla_decode_keep(q, c_k, c_v, w_kb, inv_freq, 0.18, num_splits=3, block_n=16, block_rk=16, seq_lens=lens)
    for b, n in enumerate(lens.tolist()):
        ref = mla_decode_keep_reference(q[b:b + 1], c_k[b:b + 1, :n], c_v[b:b + 1, :n], w_kb, inv_freq, 0.18)
        assert rel(out[b:b + 1], ref) < 1e-5


@pytest.mark.parametrize("heads,dv,dr,length,splits", [(9, 40, 16, 70, None), (16, 48, 24, 33, 2), (4, 16, 16, 5, 1)])
def test_shared_latent_matches_reference(heads, dv, dr, length, splits):
    from kvtool.kernels.mla_decode import mla_decode_shared, mla_decode_shared_reference

    g = torch.Generator().manual_seed(heads * length)
    q_lat, q_pe = torch.randn(2, heads, dv, generator=g), torch.randn(2, heads, dr, generator=g)
    c, pe = torch.randn(2, length, dv, generator=g), torch.randn(2, length, dr, generator=g)
    out = mla_decode_shared(q_lat, q_pe, c, pe, 0.2, num_splits=splits, block_n=16)
    assert out.shape == (2, heads, dv)
    assert rel(out, mla_decode_shared_reference(q_lat, q_pe, c, pe, 0.2)) < 1e-5
    # a static cache: rows attend to their first seq_lens tokens only (the slots past them hold garbage)
    lens = torch.tensor([length // 2, length])
    junk = c.clone()
    junk[0, length // 2:] = 1e4
    out = mla_decode_shared(q_lat, q_pe, junk, pe, 0.2, seq_lens=lens, num_splits=splits, block_n=16)
    assert rel(out, mla_decode_shared_reference(q_lat, q_pe, c, pe, 0.2, seq_lens=lens)) < 1e-5


def test_shared_latent_default_launch():
    from kvtool.kernels.mla_decode import shared_config

    # DeepSeek-V3's 512-wide latent at 128 heads, and the Llama-8B export at KV ratio 0.5 (kv_lora_rank 960)
    assert shared_config(32, 128, 512) == {"block_h": 32, "block_n": 32, "num_warps": 4, "num_stages": 3, "waves": 2}
    assert shared_config(1, 32, 960)["block_h"] == 16 and shared_config(1, 32, 960)["num_stages"] == 3
    # float32 caches: the stages' c_KV + k_pe tiles stay within the shared-memory budget
    assert shared_config(1, 32, 448, elem=4)["num_stages"] == 2 and shared_config(1, 32, 960, elem=4)["num_stages"] == 2
