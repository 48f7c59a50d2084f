"""INT2 Triton kernels (TRITON_INTERPRET=1): fused rotate+clip+quantize+pack into a paged cache, decode attention."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from kvtool.cli import app
from kvtool.kernels.int2_kv import (
    decode_attention_reference,
    gather_paged,
    int2_decode_attention,
    kv_bytes_per_token,
    new_paged_cache,
    quantize_pack,
    quantize_pack_reference,
    unpack_dequantize,
)
from kvtool.runtime.kvquant import fake_quantize

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="tests run CPU tensors through the Triton interpreter (TRITON_INTERPRET=1); "
                                "GPU correctness is checked by bench/gpu_int2_attention.py")


def _orth(g: int, d: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(g, d, d, generator=torch.Generator().manual_seed(seed)))[0]


def _paged(lens: list[int], block: int, g: int, d: int, gs: int, seed: int, k_rot=None, v_rot=None, clip=None):
    """Random K/V for sequences of ``lens`` written through shuffled block tables; returns everything."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [(n + block - 1) // block for n in lens]
    total = sum(per_seq) + 3
    order = torch.randperm(total, generator=gen)
    table = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    kc, vc = new_paged_cache(total, g, block, d, gs), new_paged_cache(total, g, block, d, gs)
    used = 0
    kv = []
    for b, n in enumerate(lens):
        table[b, :per_seq[b]] = order[used:used + per_seq[b]].int()
        used += per_seq[b]
        k = torch.randn(n, g, d, generator=gen) * 2 + torch.randn(d, generator=gen)  # offset: exercises zeros
        v = torch.randn(n, g, d, generator=gen)
        slots = table[b, torch.arange(n) // block].long() * block + torch.arange(n) % block
        quantize_pack(k, k_rot, clip, slots, kc)
        quantize_pack(v, v_rot, None, slots, vc)
        kv.append((k, v, slots))
    return kc, vc, table, kv


@pytest.mark.parametrize("gs", [64, 16])
def test_quantize_pack_matches_reference_and_quantizer(gs):
    g, d, block = 2, 64, 8
    rot, clip = _orth(g, d, 0), torch.tensor([1.0, 0.75])
    kc, vc, table, kv = _paged([21], block, g, d, gs, seed=1, k_rot=rot, clip=clip)
    k, _, slots = kv[0]
    packed, scale, zero = quantize_pack_reference(k, rot, clip, gs)
    got = kc[0][slots // block, :, slots % block]
    assert (got != packed).float().mean() < 1e-3  # rounding ties may differ in the last ulp
    torch.testing.assert_close(kc[1][slots // block, :, slots % block], scale, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(kc[2][slots // block, :, slots % block], zero, atol=1e-3, rtol=1e-3)
    # the packed cache holds what kvtool.kvquant's quantizer model says (up to fp16 scale/zero rounding)
    y = torch.einsum("ged,tgd->tge", rot, k)
    deq = unpack_dequantize(got, kc[1][slots // block, :, slots % block], kc[2][slots // block, :, slots % block])
    model = fake_quantize(y, 2, gs, clip[None, :, None])
    step = (scale.float().repeat_interleave(gs, -1)).abs()
    assert ((deq - model).abs() <= 0.01 * step + 2e-3 * y.abs().amax()).float().mean() > 0.999
    assert gather_paged(kc, table, 0, 21).shape == (g, 21, d)


def test_quantize_pack_skips_negative_slots():
    kc = new_paged_cache(2, 1, 4, 64, 64)
    quantize_pack(torch.randn(3, 1, 64), None, None, torch.tensor([-1, 5, -1]), kc)
    assert kc[0][1, 0, 1].any() and not kc[0][0].any() and not kc[0][1, 0, [0, 2, 3]].any()


@pytest.mark.parametrize("unpack", ["auto", "convert-folded"])
@pytest.mark.parametrize("rotated,splits,gs", [(True, 3, 32), (True, 2, 64), (False, None, 64)])
def test_decode_attention_matches_reference(rotated, splits, gs, unpack):
    g, rep, d, block = 2, 3, 64, 8
    k_rot = _orth(g, d, 2) if rotated else None
    v_rot = _orth(g, d, 3) if rotated else None
    lens = [37, 5]
    kc, vc, table, _ = _paged(lens, block, g, d, gs, seed=4, k_rot=k_rot, v_rot=v_rot)
    q = torch.randn(2, g * rep, d, generator=torch.Generator().manual_seed(6))
    seq_lens = torch.tensor(lens)
    out = int2_decode_attention(q, kc, vc, table, seq_lens, k_rot, v_rot, block_n=16, num_splits=splits,
                                unpack=unpack)
    ref = decode_attention_reference(q, kc, vc, table, seq_lens, k_rot, v_rot)
    assert out.shape == (2, g * rep, d)
    torch.testing.assert_close(out, ref, atol=3e-3, rtol=3e-3)  # fp16 operands inside the kernel


def test_int2_attention_close_to_exact_attention_on_smooth_data():
    g, rep, d, block = 1, 2, 64, 16
    kc, vc, table, kv = _paged([48], block, g, d, d, seed=7)
    k, v, _ = kv[0]
    q = torch.randn(1, rep, d, generator=torch.Generator().manual_seed(8)) * 0.2
    out = int2_decode_attention(q, kc, vc, table, torch.tensor([48]), block_n=16)
    p = torch.softmax(torch.einsum("hd,td->ht", q[0], k[:, 0]) * d ** -0.5, -1)
    exact = p @ v[:, 0]
    rel = (out[0] - exact).norm() / exact.norm()
    assert rel < 0.5  # INT2 is coarse; a wrong unpack or scale would be far off (>1)
    assert kv_bytes_per_token(8, 128, 128) == 2 * 8 * (32 + 4)  # Llama-3.1-8B layer: 576 B vs 4096 B in bf16


def test_kernels_reject_small_head_dim():
    from kvtool.errors import KvtoolError

    with pytest.raises(KvtoolError, match="head_dim"):
        quantize_pack(torch.randn(2, 1, 16), None, None, torch.tensor([0, 1]), new_paged_cache(1, 1, 4, 16, 16))


def test_export_then_validate_on_tiny_model(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", head_dim=64)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "osc"), "--seq-len", "32",
                              "--kv-samples", "2", "--device", "cpu", "--no-progress", "--sink", "1",
                              "--residual-window", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", str(tmp_path / "osc"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["passed"] and report["max_kernel_vs_reference_rel_err"] < 1e-2
    assert report["max_packed_byte_mismatch"] <= 1e-3


def test_full_precision_segment_merges_with_int2_history():
    g, rep, d, gs, block = 2, 2, 64, 64, 8
    k_rot, v_rot = _orth(g, d, 11), _orth(g, d, 12)
    lens = [19, 0]  # the second sequence has only full-precision tokens
    kc, vc, table, _ = _paged(lens, block, g, d, gs, seed=13, k_rot=k_rot, v_rot=v_rot)
    gen = torch.Generator().manual_seed(14)
    fk, fv = torch.randn(2, g, 6, d, generator=gen), torch.randn(2, g, 6, d, generator=gen)  # unrotated
    fp_seg = (torch.einsum("ged,bgwd->bgwe", k_rot, fk), torch.einsum("ged,bgwd->bgwe", v_rot, fv))
    fp_lens = torch.tensor([4, 6])
    q = torch.randn(2, g * rep, d, generator=gen)
    args = (q, kc, vc, table, torch.tensor(lens), k_rot, v_rot)
    out = int2_decode_attention(*args, block_n=16, num_splits=2, fp_segment=fp_seg, fp_lens=fp_lens)
    ref = decode_attention_reference(*args, fp_segment=fp_seg, fp_lens=fp_lens)
    torch.testing.assert_close(out, ref, atol=3e-3, rtol=3e-3)
    # sequence 1 is exact attention over its (unrotated) full-precision tokens: rotations cancel
    qh = q[1].reshape(g, rep, d)
    p = torch.softmax(torch.einsum("grd,gwd->grw", qh, fk[1]) * d ** -0.5, -1)
    exact = torch.einsum("grw,gwd->grd", p, fv[1]).reshape(g * rep, d)
    torch.testing.assert_close(out[1], exact, atol=1e-2, rtol=1e-2)


def test_unpack_option_is_checked():
    from kvtool.errors import KvtoolError
    from kvtool.kernels.int2_kv import _unpack_mode

    with pytest.raises(KvtoolError, match="unpack must be one of auto, asm, convert"):
        _unpack_mode("fast", torch.device("cpu"))
    for mode in ("asm", "asm-folded"):
        with pytest.raises(KvtoolError, match="needs a CUDA device"):
            _unpack_mode(mode, torch.device("cpu"))
    assert _unpack_mode("auto", torch.device("cpu")) == (False, False)
    assert _unpack_mode("convert", torch.device("cpu")) == (False, False)
    assert _unpack_mode("convert-folded", torch.device("cpu")) == (False, True)
