"""INT2 KV cache kernels: fused rotate + clip + quantize + pack into a paged cache, and decode attention over it.

Paged INT2 cache layout (one tensor set for keys, one for values; ``G`` KV heads, head_dim ``d``, group ``gs``)::

    data   uint8    [num_blocks, G, block_size, d // 4]   element 4c+t of a token in bits 2t..2t+1 of byte c
    scale  float16  [num_blocks, G, block_size, d // gs]
    zero   float16  [num_blocks, G, block_size, d // gs]   x_hat = zero + scale * code, code in 0..3

A token's slot is ``block * block_size + offset`` (vLLM's ``slot_mapping``); a sequence's blocks are listed in its
row of ``block_table`` [B, max_blocks].

* :func:`quantize_pack` - per (token, KV head): ``y = R x`` (R: [G, d, d], row convention, e.g. OSCAR's R_k after
  RoPE), per-group asymmetric INT2 with the range clipped around its midpoint by the head's ratio, 4 codes per
  byte, fp16 scale/zero, written to the token's slot.
* :func:`int2_decode_attention` - one query token per sequence: ``q' = R_k q`` (a small kernel), split-K attention
  over the packed cache that unpacks and dequantizes INT2 in registers (flash-decoding: each program covers a
  slice of the context for all query heads of one KV head), then a merge kernel that combines the slices and
  rotates the output back by ``R_vᵀ`` (skipped when R_v is folded into W_v/W_o). An optional full-precision
  segment per sequence (sink + recent tokens, stored rotated) is one more partial of that merge.

PyTorch references beside them: :func:`quantize_pack_reference`, :func:`decode_attention_reference`. Only standard
``tl.*`` ops are used (Triton 3.6+); tests run them with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kvtool.errors import KvtoolError
from kvtool.kernels.splitk import LOG2E, merge_weights, softmax_step

# ---------------------------------------------------------------------------------------------- quantize + pack

@triton.jit
def _quantize_pack_kernel(x_ptr, rot_ptr, clip_ptr, slot_ptr, data_ptr, scale_ptr, zero_ptr,
                          stride_xt, stride_xg, G, BLOCK_SIZE,
                          D: tl.constexpr, GS: tl.constexpr, HAS_ROT: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        cols = tl.arange(0, D)
        x = tl.load(x_ptr + t * stride_xt + g * stride_xg + cols).to(tl.float32)
        if HAS_ROT:
            rows = tl.arange(0, D)
            r = tl.load(rot_ptr + g * D * D + rows[:, None] * D + cols[None, :])
            y = tl.sum(r * x[None, :], axis=1)  # y_i = sum_j R_ij x_j
        else:
            y = x
        a = tl.load(clip_ptr + g)
        yg = tl.reshape(y, (D // GS, GS))
        lo = tl.min(yg, axis=1)
        hi = tl.max(yg, axis=1)
        mid = (lo + hi) * 0.5
        half = (hi - lo) * 0.5 * a
        zero = mid - half
        scale = tl.maximum(2.0 * half / 3.0, 1e-19)
        code = tl.floor((yg - zero[:, None]) / scale[:, None] + 0.5)
        code = tl.minimum(tl.maximum(code, 0.0), 3.0).to(tl.int32)
        code4 = tl.reshape(code, (D // 4, 4))
        shifts = tl.arange(0, 4) * 2
        packed = tl.sum(code4 << shifts[None, :], axis=1).to(tl.uint8)
        block = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        base = (block * G + g) * BLOCK_SIZE + off
        tl.store(data_ptr + base * (D // 4) + tl.arange(0, D // 4), packed)
        gidx = tl.arange(0, D // GS)
        tl.store(scale_ptr + base * (D // GS) + gidx, scale.to(tl.float16))
        tl.store(zero_ptr + base * (D // GS) + gidx, zero.to(tl.float16))


def new_paged_cache(num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, group_size: int,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed (data, scale, zero) tensors of one paged INT2 cache."""
    data = torch.zeros(num_blocks, num_kv_heads, block_size, head_dim // 4, dtype=torch.uint8, device=device)
    scale = torch.zeros(num_blocks, num_kv_heads, block_size, head_dim // group_size, dtype=torch.float16,
                        device=device)
    return data, scale, torch.zeros_like(scale)


def _head_dim_ok(head_dim: int) -> bool:
    return head_dim >= 64 and not head_dim & (head_dim - 1)


def _group_ok(head_dim: int, group_size: int) -> bool:
    return group_size >= 4 and not head_dim % group_size and not group_size & (group_size - 1)


def shapes_supported(head_dim: int, group_size: int) -> bool:
    """Whether the INT2 kernels take these shapes (power-of-two head_dim >= 64, power-of-two group >= 4 dividing
    it); :func:`_check_shapes` raises where not."""
    return _head_dim_ok(head_dim) and _group_ok(head_dim, group_size)


def _check_shapes(head_dim: int, group_size: int) -> None:
    if not _head_dim_ok(head_dim):
        raise KvtoolError(f"the INT2 kernels need a power-of-two head_dim >= 64, got {head_dim}")
    if not _group_ok(head_dim, group_size):
        raise KvtoolError(f"the INT2 kernels need a power-of-two group size >= 4 dividing head_dim, got {group_size}")


def quantize_pack(x: torch.Tensor, rot: torch.Tensor | None, clip: torch.Tensor | None, slot_mapping: torch.Tensor,
                  cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Rotate, clip, quantize to INT2 and pack x [T, G, d] into the paged ``cache`` at ``slot_mapping`` [T].

    ``rot`` [G, d, d] float32 (None: identity); ``clip`` [G] float32 (None: 1). Slots < 0 are skipped.
    """
    data, scale, zero = cache
    t, g, d = x.shape
    gs = d // scale.shape[-1]
    _check_shapes(d, gs)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rot_t = rot.float().contiguous() if rot is not None else x.new_empty(1, dtype=torch.float32)
    clip_t = clip.float().contiguous() if clip is not None else torch.ones(g, device=x.device, dtype=torch.float32)
    _quantize_pack_kernel[(t, g)](x, rot_t, clip_t, slot_mapping.contiguous(), data, scale, zero,
                                  x.stride(0), x.stride(1), g, data.shape[2],
                                  D=d, GS=gs, HAS_ROT=rot is not None)


def quantize_pack_reference(x: torch.Tensor, rot: torch.Tensor | None, clip: torch.Tensor | None, group_size: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference: (packed uint8 [T, G, d/4], scale fp16 [T, G, d/gs], zero fp16) of x [T, G, d]."""
    t, g, d = x.shape
    y = x.float() if rot is None else torch.einsum("ged,tgd->tge", rot.float(), x.float())
    a = torch.ones(g, device=x.device) if clip is None else clip.float()
    yg = y.reshape(t, g, d // group_size, group_size)
    lo, hi = yg.amin(-1), yg.amax(-1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * a[None, :, None]
    zero = mid - half
    scale = (2 * half / 3).clamp_min(1e-19)
    code = torch.floor((yg - zero[..., None]) / scale[..., None] + 0.5).clamp(0, 3).to(torch.int32)
    code = code.reshape(t, g, d // 4, 4)
    packed = (code << torch.arange(0, 8, 2, device=x.device, dtype=torch.int32)).sum(-1).to(torch.uint8)
    return packed, scale.half(), zero.half()


def unpack_dequantize(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of the packing: data [..., d/4] uint8, scale/zero [..., d/gs] -> float32 [..., d]."""
    codes = (data[..., None].to(torch.int32) >> torch.arange(0, 8, 2, device=data.device, dtype=torch.int32)) & 3
    codes = codes.reshape(*data.shape[:-1], data.shape[-1] * 4).float()
    gs = codes.shape[-1] // scale.shape[-1]
    rep = lambda s: s.float().repeat_interleave(gs, dim=-1)  # noqa: E731
    return rep(zero) + rep(scale) * codes


def gather_paged(cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], block_table: torch.Tensor, b: int,
                 seq_len: int) -> torch.Tensor:
    """Dequantized [G, seq_len, d] of sequence ``b`` read through its block-table row (reference path)."""
    data, scale, zero = cache
    bs = data.shape[2]
    if seq_len == 0:
        return torch.zeros(data.shape[1], 0, data.shape[-1] * 4, device=data.device)
    n_blocks = (seq_len + bs - 1) // bs
    blocks = block_table[b, :n_blocks].long()
    x = unpack_dequantize(data[blocks], scale[blocks], zero[blocks])  # [n, G, bs, d]
    return x.permute(1, 0, 2, 3).reshape(x.shape[1], n_blocks * bs, -1)[:, :seq_len]


# ---------------------------------------------------------------------------------------------- decode attention

@triton.jit
def _rotate_rows_kernel(x_ptr, rot_ptr, out_ptr, H, REP, D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """out[b, h] = R[h // REP] x[b, h] (or R^T x with TRANSPOSE), x/out [B, H, D] float32."""
    pid = tl.program_id(0)
    h = pid % H
    g = h // REP
    i = tl.arange(0, D)
    x = tl.load(x_ptr + pid * D + i).to(tl.float32)
    if TRANSPOSE:
        r = tl.load(rot_ptr + g * D * D + i[:, None] * D + i[None, :])  # r[i, j] = R_ij
        y = tl.sum(r * x[:, None], axis=0)  # y_j = sum_i R_ij x_i
    else:
        r = tl.load(rot_ptr + g * D * D + i[:, None] * D + i[None, :])
        y = tl.sum(r * x[None, :], axis=1)
    tl.store(out_ptr + pid * D + i, y)


# Four 2-bit code planes of 4 packed bytes -> fp16 without int->float conversions: bytes are spread to the two halves of
# a 32-bit word (prmt), a code is masked into the mantissa of 1024.0 (lop3 with 0x64006400 = fp16x2 {1024, 1024}) and
# 1024 is subtracted (sub.f16x2), exact for codes 0..3: ~1.6 instructions per code instead of shift/and/I2F/F2F each.
# Output t holds code t (bits 2t..2t+1) of each byte: registers $2t (bytes 0, 1) and $2t+1 (bytes 2, 3).
# (The PTX is built once by _unpack_ptx into constexpr globals: jitted functions read only constexpr globals.)


def _unpack_ptx(subtract: bool) -> str:
    """The PTX of :func:`code_planes` (see the comment above); without ``subtract`` the 1024 stays in the codes."""
    lines = [".reg .b32 lo, hi, t, m, k, z;", "mov.b32 z, 0;", "mov.b32 m, 0x00030003;", "mov.b32 k, 0x64006400;",
             "prmt.b32 lo, $8, z, 0x4140;", "prmt.b32 hi, $8, z, 0x4342;",
             "lop3.b32 $0, lo, m, k, 0xea;", "lop3.b32 $1, hi, m, k, 0xea;"]
    for t in (1, 2, 3):
        lines += [f"shr.b32 t, lo, {2 * t};", f"lop3.b32 ${2 * t}, t, m, k, 0xea;",
                  f"shr.b32 t, hi, {2 * t};", f"lop3.b32 ${2 * t + 1}, t, m, k, 0xea;"]
    if subtract:
        lines += [f"sub.f16x2 ${i}, ${i}, k;" for i in range(8)]
    return "{\n" + "".join(line + "\n" for line in lines) + "}\n"


# constexpr globals: what a jitted function may read
_UNPACK_PTX = tl.constexpr(_unpack_ptx(subtract=True))
_UNPACK_PTX_FOLDED = tl.constexpr(_unpack_ptx(subtract=False))


@triton.jit
def code_planes(x, ASM: tl.constexpr, FOLD: tl.constexpr = False):
    """The four 2-bit code planes of uint8 bytes ``x`` as fp16 (plane t: bits 2t..2t+1 of each byte).

    ``ASM``: packed bit operations (PTX, GPU only; the comment above); otherwise shifts and conversions (also what
    the interpreter runs). Both give the same exact values 0..3, or with ``FOLD`` 1024 + code (the 1024 left in:
    no sub.f16x2, 16 instead of 24 instructions per 16 codes; the caller subtracts 1024 through the zero term).
    """
    if ASM and FOLD:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _UNPACK_PTX_FOLDED, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    elif ASM:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _UNPACK_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        xi = x.to(tl.int32)
        c0 = (xi & 3).to(tl.float16)
        c1 = ((xi >> 2) & 3).to(tl.float16)
        c2 = ((xi >> 4) & 3).to(tl.float16)
        c3 = ((xi >> 6) & 3).to(tl.float16)
        if FOLD:
            c0, c1, c2, c3 = c0 + 1024.0, c1 + 1024.0, c2 + 1024.0, c3 + 1024.0
    return c0, c1, c2, c3


@triton.jit
def _int2_attention_split_kernel(q_ptr, kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, bt_ptr, len_ptr,
                                 o_ptr, m_ptr, l_ptr, sm_scale_log2, H, G, REP, MAX_BLOCKS,
                                 TOKENS_PER_SPLIT, NUM_SPLITS,
                                 D: tl.constexpr, GS: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr,
                                 ASM: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                 IDX64: tl.constexpr, FOLD: tl.constexpr = False):
    # BLOCK_SIZE (tokens per page) is a compile-time power of two: page and offset are a shift and a mask, not a
    # signed division (ncu: integer address arithmetic was ~40% of the instructions with a runtime page size).
    # IDX64: 64-bit token offsets only when the cache has 2**29 elements or more (a 4x margin below 2**31).
    b = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    start = sp * TOKENS_PER_SPLIT
    end = tl.minimum(start + TOKENS_PER_SPLIT, seq_len)
    DQ: tl.constexpr = D // 4
    NG: tl.constexpr = D // GS
    rows = tl.arange(0, GP)
    row_ok = rows < REP
    heads = g * REP + rows
    c = tl.arange(0, DQ)
    q_base = q_ptr + (b * H + heads[:, None]) * D + 4 * c[None, :]
    q0 = tl.load(q_base + 0, mask=row_ok[:, None], other=0.0).to(tl.float16)
    q1 = tl.load(q_base + 1, mask=row_ok[:, None], other=0.0).to(tl.float16)
    q2 = tl.load(q_base + 2, mask=row_ok[:, None], other=0.0).to(tl.float16)
    q3 = tl.load(q_base + 3, mask=row_ok[:, None], other=0.0).to(tl.float16)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc0 = tl.zeros((GP, DQ), tl.float32)
    acc1 = tl.zeros((GP, DQ), tl.float32)
    acc2 = tl.zeros((GP, DQ), tl.float32)
    acc3 = tl.zeros((GP, DQ), tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    grp = c // (GS // 4)  # scale group of byte column c (all 4 codes of a byte share it)
    if NG == 1:
        qsum = (tl.sum(q0.to(tl.float32), axis=1) + tl.sum(q1.to(tl.float32), axis=1)
                + tl.sum(q2.to(tl.float32), axis=1) + tl.sum(q3.to(tl.float32), axis=1))
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        n = n0 + n_off
        ok = n < end
        page = tl.load(bt_ptr + b * MAX_BLOCKS + n // BLOCK_SIZE, mask=ok, other=0)
        if IDX64:
            page = page.to(tl.int64)
        tok = (page * G + g) * BLOCK_SIZE + n % BLOCK_SIZE
        kb = tl.load(kd_ptr + tok[:, None] * DQ + c[None, :], mask=ok[:, None], other=0)
        vb = tl.load(vd_ptr + tok[:, None] * DQ + c[None, :], mask=ok[:, None], other=0)
        if NG == 1:
            # one scale/zero per token: q.(z + s*code) = s * (q.code) + z * sum(q); codes are exact in fp16
            ksc = tl.load(ks_ptr + tok, mask=ok, other=0.0).to(tl.float32)
            kze = tl.load(kz_ptr + tok, mask=ok, other=0.0).to(tl.float32)
            k0, k1, k2, k3 = code_planes(kb, ASM, FOLD)
            s = (tl.dot(q0, tl.trans(k0)) + tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
                 + tl.dot(q3, tl.trans(k3)))
            if FOLD:  # planes hold 1024 + code: q.(1024 + code) = q.code + 1024 sum(q) (qsum of the fp16 q)
                kze = kze - 1024.0 * ksc
            s = s * ksc[None, :] + qsum[:, None] * kze[None, :]
        else:
            ksc = tl.load(ks_ptr + tok[:, None] * NG + grp[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            kze = tl.load(kz_ptr + tok[:, None] * NG + grp[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            c0, c1, c2, c3 = code_planes(kb, ASM, FOLD)
            if FOLD:
                kze = kze - 1024.0 * ksc
            k0 = (kze + ksc * c0.to(tl.float32)).to(tl.float16)
            k1 = (kze + ksc * c1.to(tl.float32)).to(tl.float16)
            k2 = (kze + ksc * c2.to(tl.float32)).to(tl.float16)
            k3 = (kze + ksc * c3.to(tl.float32)).to(tl.float16)
            s = (tl.dot(q0, tl.trans(k0)) + tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
                 + tl.dot(q3, tl.trans(k3)))
        s = s * sm_scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        if NG == 1:
            # p.(z + s*code) = (p*s).code + p.z
            vsc = tl.load(vs_ptr + tok, mask=ok, other=0.0).to(tl.float32)
            vze = tl.load(vz_ptr + tok, mask=ok, other=0.0).to(tl.float32)
            ps = (p * vsc[None, :]).to(tl.float16)
            pz = tl.sum(p * vze[None, :], axis=1)[:, None]
            if FOLD:  # (p*s).(1024 + code): 1024 times the fp16 weights actually fed to the dot comes off
                pz = pz - 1024.0 * tl.sum(ps.to(tl.float32), axis=1)[:, None]
            v0, v1, v2, v3 = code_planes(vb, ASM, FOLD)
            acc0 = acc0 * alpha[:, None] + tl.dot(ps, v0) + pz
            acc1 = acc1 * alpha[:, None] + tl.dot(ps, v1) + pz
            acc2 = acc2 * alpha[:, None] + tl.dot(ps, v2) + pz
            acc3 = acc3 * alpha[:, None] + tl.dot(ps, v3) + pz
        else:
            vsc = tl.load(vs_ptr + tok[:, None] * NG + grp[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            vze = tl.load(vz_ptr + tok[:, None] * NG + grp[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            pf = p.to(tl.float16)
            if FOLD:
                vze = vze - 1024.0 * vsc
            v0, v1, v2, v3 = code_planes(vb, ASM, FOLD)
            acc0 = acc0 * alpha[:, None] + tl.dot(pf, (vze + vsc * v0.to(tl.float32)).to(tl.float16))
            acc1 = acc1 * alpha[:, None] + tl.dot(pf, (vze + vsc * v1.to(tl.float32)).to(tl.float16))
            acc2 = acc2 * alpha[:, None] + tl.dot(pf, (vze + vsc * v2.to(tl.float32)).to(tl.float16))
            acc3 = acc3 * alpha[:, None] + tl.dot(pf, (vze + vsc * v3.to(tl.float32)).to(tl.float16))
    part = (b * H + heads) * NUM_SPLITS + sp
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    o_base = o_ptr + part[:, None] * D + 4 * c[None, :]
    tl.store(o_base + 0, acc0, mask=row_ok[:, None])
    tl.store(o_base + 1, acc1, mask=row_ok[:, None])
    tl.store(o_base + 2, acc2, mask=row_ok[:, None])
    tl.store(o_base + 3, acc3, mask=row_ok[:, None])


@triton.jit
def _fp_segment_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, m_ptr, l_ptr, sm_scale_log2, H, G, REP, W, NUM_PARTS,
                       PART, D: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attention partials over the full-precision segment (sink + recent tokens, stored rotated) of one KV head."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    n_len = tl.load(len_ptr + b)
    rows = tl.arange(0, GP)
    row_ok = rows < REP
    heads = g * REP + rows
    i = tl.arange(0, D)
    q = tl.load(q_ptr + (b * H + heads[:, None]) * D + i[None, :], mask=row_ok[:, None], other=0.0).to(tl.float16)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    base = (b * G + g) * W
    for n0 in range(0, n_len, BLOCK_N):
        n = n0 + n_off
        ok = n < n_len
        k = tl.load(k_ptr + (base + n)[:, None] * D + i[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        v = tl.load(v_ptr + (base + n)[:, None] * D + i[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
    part = (b * H + heads) * NUM_PARTS + PART
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    tl.store(o_ptr + part[:, None] * D + i[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, H, REP, NUM_SPLITS,
                  D: tl.constexpr, SP: tl.constexpr, HAS_ROT: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    h = pid % H
    s = tl.arange(0, SP)
    s_ok = s < NUM_SPLITS
    m = tl.load(m_ptr + pid * NUM_SPLITS + s, mask=s_ok, other=float("-inf"))
    l_ = tl.load(l_ptr + pid * NUM_SPLITS + s, mask=s_ok, other=0.0)
    w, denom = merge_weights(m, l_)
    i = tl.arange(0, D)
    o = tl.load(o_ptr + (pid * NUM_SPLITS + s)[:, None] * D + i[None, :], mask=s_ok[:, None], other=0.0)
    y = tl.sum(o * w[:, None], axis=0) / denom
    if HAS_ROT:
        g = h // REP
        r = tl.load(rot_ptr + g * D * D + i[:, None] * D + i[None, :])
        y = tl.sum(r * y[:, None], axis=0)  # R^T y
    tl.store(out_ptr + pid * D + i, y)


UNPACK_MODES = ("auto", "asm", "convert", "asm-folded", "convert-folded")


def _unpack_mode(unpack: str, device: torch.device) -> tuple[bool, bool]:
    """(PTX unpack, 1024 bias folded into the zero term) of an ``unpack`` mode (see :func:`int2_decode_attention`)."""
    if unpack not in UNPACK_MODES:
        raise KvtoolError(f"unpack must be one of {', '.join(UNPACK_MODES)}, got {unpack!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    base, _, folded = unpack.partition("-")
    if base == "asm" and (interpreted or device.type != "cuda"):
        raise KvtoolError(f"unpack={unpack!r} needs a CUDA device and no TRITON_INTERPRET")
    return base == "asm" or (base == "auto" and device.type == "cuda" and not interpreted), bool(folded)


PROGRAMS_PER_SM = 4  # split-K programs per SM of the default launch (H200 sweep, docs/gpu-logs/int2_*h200*.log)


def default_target_programs(device: torch.device | str) -> int:
    """Split-K programs the default launch aims for: 4 per SM on a CUDA device (528 on an H200, the launch
    bench/gpu_int2_attention.py times), 512 elsewhere (the Triton interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 512


def _num_splits(batch: int, kv_heads: int, max_len: int, block_n: int, target_programs: int) -> int:
    tiles = max(1, math.ceil(max_len / block_n))
    return max(1, min(tiles, math.ceil(target_programs / max(batch * kv_heads, 1))))


def int2_decode_attention(q: torch.Tensor, k_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                          v_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], block_table: torch.Tensor,
                          seq_lens: torch.Tensor, k_rot: torch.Tensor | None = None,
                          v_rot: torch.Tensor | None = None, sm_scale: float | None = None, *,
                          max_seq_len: int | None = None, block_n: int | None = None, num_splits: int | None = None,
                          target_programs: int | None = None,
                          fp_segment: tuple[torch.Tensor, torch.Tensor] | None = None,
                          fp_lens: torch.Tensor | None = None, num_warps: int = 4, num_stages: int | None = None,
                          unpack: str = "auto") -> torch.Tensor:
    """Decode attention of q [B, H, d] (after RoPE, unrotated) over a paged INT2 K/V cache; returns [B, H, d].

    ``k_rot``/``v_rot``: [G, d, d] float32 rotations the cache was written with (None: identity / folded).
    ``max_seq_len`` avoids a device sync when given (defaults to ``seq_lens.max()``).
    ``fp_segment`` = (k, v) [B, G, W, d] (bf16/fp16/fp32): the full-precision sink + recent tokens of each sequence,
    stored rotated like the cache (``R_k k``, ``R_v v``); ``fp_lens`` [B] says how many are valid. They are one more
    partial in the split merge (online softmax), so the result is attention over INT2 history ∪ FP tokens.
    ``num_warps`` and ``num_stages`` (software pipelining of the tile loop) apply to the main (split) kernel.
    ``block_n``/``num_stages`` None: 64 tokens per tile when fewer than 128 (sequence, KV head) pairs, else 128;
    3 stages — the H200 ablation's picks at batch 1 and 32 (2026-11-30, docs/gpu-logs/int2_ablation2_h200.log).
    ``unpack``: ``"asm"`` (packed PTX bit operations), ``"convert"`` (shifts + conversions) or ``"auto"`` (asm on a
    CUDA device unless the Triton interpreter runs); ``"asm-folded"``/``"convert-folded"``: codes unpacked as
    1024 + code (8 fewer instructions per 16 codes in PTX), the 1024 taken off through the zero term (not yet
    timed on a GPU, so not the default; bench/gpu_int2_attention.py ``--unpack auto,asm-folded``).
    ``target_programs`` None: :func:`default_target_programs`
    (4 per SM on CUDA; the split count then follows from batch, KV heads and length).
    """
    bsz, h, d = q.shape
    data = k_cache[0]
    g, block_size = data.shape[1], data.shape[2]
    gs = d // k_cache[1].shape[-1]
    _check_shapes(d, gs)
    rep = h // g
    sm_scale = sm_scale if sm_scale is not None else d ** -0.5
    asm, fold = _unpack_mode(unpack, q.device)
    qf = q.float().contiguous()
    if k_rot is not None:
        qr = torch.empty_like(qf)
        _rotate_rows_kernel[(bsz * h,)](qf, k_rot.float().contiguous(), qr, h, rep, D=d, TRANSPOSE=False)
        qf = qr
    max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    wide = bsz * g >= 128
    block_n = block_n or (128 if wide else 64)
    num_stages = num_stages or 3
    target_programs = target_programs or default_target_programs(q.device)
    splits = num_splits or _num_splits(bsz, g, max_len, block_n, target_programs)
    per_split = math.ceil(max(max_len, 1) / splits / block_n) * block_n
    splits = max(1, math.ceil(max(max_len, 1) / per_split))
    parts = splits + (fp_segment is not None)
    o_part = torch.empty(bsz, h, parts, d, device=q.device, dtype=torch.float32)
    m_part = torch.empty(bsz, h, parts, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    gp = max(16, triton.next_power_of_2(rep))
    _int2_attention_split_kernel[(bsz, g, splits)](
        qf, *k_cache, *v_cache, block_table.int().contiguous(), seq_lens.int().contiguous(),
        o_part, m_part, l_part, sm_scale * LOG2E, h, g, rep, block_table.shape[1], per_split, parts,
        D=d, GS=gs, GP=gp, BLOCK_N=block_n, ASM=asm, NUM_STAGES=num_stages,
        BLOCK_SIZE=block_size, IDX64=data.numel() >= 2 ** 31 // 4, FOLD=fold, num_warps=num_warps)
    if fp_segment is not None:
        fk, fv = (t.contiguous() for t in fp_segment)
        if fk.shape[:2] != (bsz, g) or fk.shape[-1] != d or fv.shape != fk.shape or fp_lens is None:
            raise KvtoolError("fp_segment must be (k, v) of shape [B, G, W, head_dim] with fp_lens [B]")
        _fp_segment_kernel[(bsz, g)](qf, fk, fv, fp_lens.int().contiguous(), o_part, m_part, l_part,
                                     sm_scale * LOG2E, h, g, rep, fk.shape[2], parts, splits,
                                     D=d, GP=gp, BLOCK_N=min(block_n, 64))
    out = torch.empty(bsz, h, d, device=q.device, dtype=torch.float32)
    rot = v_rot.float().contiguous() if v_rot is not None else qf.new_empty(1)
    _merge_kernel[(bsz * h,)](o_part, m_part, l_part, rot, out, h, rep, parts,
                              D=d, SP=triton.next_power_of_2(parts), HAS_ROT=v_rot is not None)
    return out.to(q.dtype)


def decode_attention_reference(q: torch.Tensor, k_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                               v_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], block_table: torch.Tensor,
                               seq_lens: torch.Tensor, k_rot: torch.Tensor | None = None,
                               v_rot: torch.Tensor | None = None, sm_scale: float | None = None,
                               fp_segment: tuple[torch.Tensor, torch.Tensor] | None = None,
                               fp_lens: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`int2_decode_attention` (float32, dequantizing the whole cache)."""
    bsz, h, d = q.shape
    g = k_cache[0].shape[1]
    rep = h // g
    sm_scale = sm_scale if sm_scale is not None else d ** -0.5
    outs = []
    for b in range(bsz):
        n = int(seq_lens[b])
        k = gather_paged(k_cache, block_table, b, n)  # rotated space [G, n, d]
        v = gather_paged(v_cache, block_table, b, n)
        if fp_segment is not None:
            w = int(fp_lens[b])
            k = torch.cat([k, fp_segment[0][b, :, :w].float()], dim=1)
            v = torch.cat([v, fp_segment[1][b, :, :w].float()], dim=1)
        qb = q[b].float().reshape(g, rep, d)
        if k_rot is not None:
            qb = torch.einsum("ged,grd->gre", k_rot.float(), qb)
        p = torch.softmax(torch.einsum("grd,gnd->grn", qb, k) * sm_scale, dim=-1)
        o = torch.einsum("grn,gnd->grd", p, v)
        if v_rot is not None:
            o = torch.einsum("ged,gre->grd", v_rot.float(), o)
        outs.append(o.reshape(h, d))
    return torch.stack(outs).to(q.dtype)


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, group_size: int) -> int:
    """Bytes one token occupies in the INT2 K+V cache of one layer (codes + fp16 scale and zero)."""
    return 2 * num_kv_heads * (head_dim // 4 + 4 * (head_dim // group_size))
