"""Decode attention over an MLA latent cache (one new query token per sequence), in Triton.

Three forms: two matching ``--rope`` of ``kvtool convert-mla``, one for the DeepSeek-V3 export:

``absorbed`` (rope=decoupled): all heads share one latent "key" row [c_K | RoPE(k_pe)] (width r_K + d_rope) and
    one latent "value" row c_V (width r_V) per token. Queries arrive already absorbed: [q_nope·W_kb | q_pe].
    scores = q·kv_lat / scale-corrected, out_lat = softmax · c_V; the caller applies each group's V
    up-projection (absorbed V). This is MQA attention with different K and V widths: the cache is read once
    per sequence for all heads.

``keep`` (rope=keep): each KV group g reconstructs its keys from c_K inside the kernel, k = c_K·W_kb[g] (+bias),
    optional per-head RMSNorm (Qwen3 k_norm), RoPE at the key's position (half-split convention, angles
    computed in registers), then scores against the group's queries (already RoPE'd). Values stay absorbed:
    out_lat = softmax · c_V, the caller applies W_vb[g].

``shared`` (the DeepSeek-V3 export, ``kvtool.runtime.deepseek``): one normalized latent c_KV per token is both the
    nope key and the value, plus a shared RoPE key k_pe; each c_KV tile is read once for both products.

All kernels split the context over programs (flash-decoding) and combine the partial softmax sums in PyTorch.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvtool.kernels.splitk import LOG2E, merge_weights, softmax_step


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


@functools.lru_cache(maxsize=8)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, programs: int, length: int, block_n: int, waves: int = 2) -> int:
    """Enough context splits to give the GPU ``waves`` waves of programs, at least one block per split."""
    if not torch.cuda.is_available():
        return max(1, min(4, triton.cdiv(length, block_n)))
    sms = _sm_count(torch.cuda.current_device())
    want = max(1, (waves * sms) // max(1, batch * programs))
    return max(1, min(want, triton.cdiv(length, block_n)))


@triton.jit
def _combine_kernel(ACC, M, L, OUT, SPLITS, DV_A, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, ALIGN: tl.constexpr):
    row = tl.program_id(0)  # one (batch, head)
    dc = tl.program_id(1)  # one BLOCK_DV slice of the output: B*H*ceil(DV/BLOCK_DV) programs, not B*H
    DV = DV_A * ALIGN  # a multiple of ALIGN the compiler can see (vector loads when DV is not divisible by 16)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < SPLITS
    m = tl.load(M + row * SPLITS + offs_s, mask=smask, other=float("-inf"))
    l = tl.load(L + row * SPLITS + offs_s, mask=smask, other=0.0)
    w, denom = merge_weights(m, l)
    offs_d = dc * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dmask = offs_d < DV
    acc = tl.load(ACC + row * SPLITS * DV + offs_s[:, None] * DV + offs_d[None, :],
                  mask=smask[:, None] & dmask[None, :], other=0.0)
    tl.store(OUT + row * DV + offs_d, tl.sum(acc * w[:, None], 0) / denom, mask=dmask)


def _combine(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge per-split (acc [B, H, S, dv], max [B, H, S], sum [B, H, S]) into the softmax-weighted output."""
    if acc.is_cuda or _interpreting():
        bsz, heads, splits, dv = acc.shape
        out = torch.empty(bsz, heads, dv, device=acc.device, dtype=torch.float32)
        block_s = max(2, triton.next_power_of_2(splits))
        block_dv = max(16, min(64, 8192 // block_s, _pow2(dv)))
        align = _align(dv)
        _combine_kernel[(bsz * heads, triton.cdiv(dv, block_dv))](acc, m, l, out, splits, dv // align,
                                                                 BLOCK_S=block_s, BLOCK_DV=block_dv, ALIGN=align)
        return out
    return combine_reference(acc, m, l)


def _split_buffers(bsz: int, heads: int, length: int, dv: int, block_n: int, splits: int, device: torch.device
                   ) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens per split, a multiple of block_n; splits; partial outputs [B, H, splits, dv], maxima and sums
    [B, H, splits]) of a split-K decode launch asked for ``splits`` splits."""
    split_len = triton.cdiv(triton.cdiv(length, splits), block_n) * block_n
    splits = triton.cdiv(length, split_len)
    acc = torch.empty(bsz, heads, splits, dv, device=device, dtype=torch.float32)
    m = torch.empty(bsz, heads, splits, device=device, dtype=torch.float32)
    return split_len, splits, acc, m, torch.empty_like(m)


def _align(*sizes: int) -> int:
    """8 when every width/stride is a multiple of 8 elements (passed to kernels divided by it, see ALIGN), else 1."""
    return 8 if all(x % 8 == 0 for x in sizes) else 1


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def combine_reference(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of the split merge (maxima ``m`` are base-2 logits, as the kernels store them)."""
    top = m.max(dim=-1, keepdim=True).values
    w = torch.exp2(m - top)
    w = torch.where(torch.isfinite(m), w, torch.zeros_like(w))
    return (acc * w[..., None]).sum(-2) / (l * w).sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ absorbed

@triton.jit
def _softmax_state(BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A split's empty online-softmax state: running max, running sum, output accumulator (float32)."""
    return (tl.full([BLOCK_H], float("-inf"), tl.float32), tl.zeros([BLOCK_H], tl.float32),
            tl.zeros([BLOCK_H, BLOCK_DV], tl.float32))


@triton.jit
def _split_range(S, LENS, b, sp, split_len, HAS_LENS: tl.constexpr):
    """Token range [start, end) of split ``sp`` of row ``b``; with HAS_LENS (a static cache of S slots) row b holds
    LENS[b] valid tokens."""
    if HAS_LENS:
        S = tl.load(LENS + b)
    start = sp * split_len
    return start, tl.minimum(start + split_len, S)


@triton.jit
def _aligned(DK_A, DV_A, s_qh_a, s_kn_a, s_vn_a, ALIGN: tl.constexpr):
    """Widths and row strides passed divided by ALIGN, multiplied back (see the absorbed kernels)."""
    return DK_A * ALIGN, DV_A * ALIGN, s_qh_a * ALIGN, s_kn_a * ALIGN, s_vn_a * ALIGN


@triton.jit
def _absorbed_value_step(V, b, s_vb, s_vn, offs_n, nmask, offs_dv, DV, s, scale, m_i, l_i, acc):
    """One token tile after its scores ``s``: online softmax, then the value latent tile into the accumulator."""
    s = tl.where(nmask[None, :], s * scale, float("-inf"))
    p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
    v = tl.load(V + b * s_vb + offs_n[:, None] * s_vn + offs_dv[None, :],
                mask=nmask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v), m_i, l_i


@triton.jit
def _absorbed_store(ACC, M, L, acc, m_i, l_i, b, sp, offs_h, offs_dv, hmask, DV, s_ab, s_ah, s_as, s_mb, s_mh):
    """A split's partial output, running max and sum (merged by :func:`_combine`)."""
    tl.store(ACC + b * s_ab + offs_h[:, None] * s_ah + sp * s_as + offs_dv[None, :], acc,
             mask=hmask[:, None] & (offs_dv[None, :] < DV))
    tl.store(M + b * s_mb + offs_h * s_mh + sp, m_i, mask=hmask)
    tl.store(L + b * s_mb + offs_h * s_mh + sp, l_i, mask=hmask)


@triton.jit
def _absorbed_kernel(Q, KV, V, ACC, M, L, S, LENS, H, DK_A, DV_A, split_len, scale,
                     s_qb, s_qh_a, s_kb, s_kn_a, s_vb, s_vn_a, s_ab, s_ah, s_as, s_mb, s_mh,
                     BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     ALIGN: tl.constexpr, DV_PARTS: tl.constexpr, HAS_LENS: tl.constexpr):
    # Widths and row strides arrive divided by ALIGN and are multiplied back here, so the compiler knows they are
    # multiples of ALIGN (8 elements = 16 bytes); Triton only infers this for values divisible by 16. Measured effect
    # at width 168 on an H200: ~5% (docs/gpu-logs/mla_width_sweep_h200_align_hint.log); the 3x seen at such widths
    # was the split merge (_combine_kernel), not this kernel.
    DK, DV, s_qh, s_kn, s_vn = _aligned(DK_A, DV_A, s_qh_a, s_kn_a, s_vn_a, ALIGN)
    b = tl.program_id(0)
    hb = tl.program_id(1) // DV_PARTS  # DV_PARTS programs share a head block, each owns a BLOCK_DV slice of the
    dvp = tl.program_id(1) % DV_PARTS  # output (scores recomputed per slice: the key tiles are read again, from L2)
    sp = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = dvp * BLOCK_DV + tl.arange(0, BLOCK_DV)
    hmask = offs_h < H
    m_i, l_i, acc = _softmax_state(BLOCK_H, BLOCK_DV)
    start, end = _split_range(S, LENS, b, sp, split_len, HAS_LENS)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        for d0 in range(0, DK, BLOCK_D):  # the key width (r_K + d_rope) in chunks: no padding to a power of 2
            dmask = (d0 + offs_d) < DK
            q = tl.load(Q + b * s_qb + offs_h[:, None] * s_qh + d0 + offs_d[None, :],
                        mask=hmask[:, None] & dmask[None, :], other=0.0)
            k = tl.load(KV + b * s_kb + offs_n[None, :] * s_kn + d0 + offs_d[:, None],
                        mask=nmask[None, :] & dmask[:, None], other=0.0)
            s += tl.dot(q, k)
        acc, m_i, l_i = _absorbed_value_step(V, b, s_vb, s_vn, offs_n, nmask, offs_dv, DV, s, scale, m_i, l_i, acc)
    _absorbed_store(ACC, M, L, acc, m_i, l_i, b, sp, offs_h, offs_dv, hmask, DV, s_ab, s_ah, s_as, s_mb, s_mh)


@triton.jit
def _absorbed_full_kernel(Q, KV, V, ACC, M, L, S, LENS, H, DK_A, DV_A, split_len, scale,
                          s_qb, s_qh_a, s_kb, s_kn_a, s_vb, s_vn_a, s_ab, s_ah, s_as, s_mb, s_mh,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr,
                          BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, ALIGN: tl.constexpr, STAGES: tl.constexpr,
                          HAS_LENS: tl.constexpr):
    # The whole key row per token tile, as two power-of-2 pieces (e.g. 544 = 512 + 32 masked from a 32-wide piece):
    # no inner loop over key chunks, so the token loop itself is software-pipelined (STAGES tiles of keys and
    # values in flight), and the query stays in registers across the loop.
    DK, DV, s_qh, s_kn, s_vn = _aligned(DK_A, DV_A, s_qh_a, s_kn_a, s_vn_a, ALIGN)
    b = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
    offs_dv = tl.arange(0, BLOCK_DV)
    hmask = offs_h < H
    q1 = tl.load(Q + b * s_qb + offs_h[:, None] * s_qh + offs_d1[None, :],
                 mask=hmask[:, None] & (offs_d1[None, :] < DK), other=0.0)
    q2 = tl.load(Q + b * s_qb + offs_h[:, None] * s_qh + offs_d2[None, :],
                 mask=hmask[:, None] & (offs_d2[None, :] < DK), other=0.0)
    m_i, l_i, acc = _softmax_state(BLOCK_H, BLOCK_DV)
    start, end = _split_range(S, LENS, b, sp, split_len, HAS_LENS)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        k1 = tl.load(KV + b * s_kb + offs_n[None, :] * s_kn + offs_d1[:, None],
                     mask=nmask[None, :] & (offs_d1[:, None] < DK), other=0.0)
        k2 = tl.load(KV + b * s_kb + offs_n[None, :] * s_kn + offs_d2[:, None],
                     mask=nmask[None, :] & (offs_d2[:, None] < DK), other=0.0)
        s = tl.dot(q1, k1) + tl.dot(q2, k2)
        acc, m_i, l_i = _absorbed_value_step(V, b, s_vb, s_vn, offs_n, nmask, offs_dv, DV, s, scale, m_i, l_i, acc)
    _absorbed_store(ACC, M, L, acc, m_i, l_i, b, sp, offs_h, offs_dv, hmask, DV, s_ab, s_ah, s_as, s_mb, s_mh)


def key_pieces(dk: int) -> tuple[int, int]:
    """The full-tile kernel's key row as two power-of-2 pieces: the largest power of 2 ≤ dk, and the power of 2
    covering the rest (16 at least: the second dot is always issued, fully masked when dk is a power of 2)."""
    d1 = max(16, 1 << (int(dk).bit_length() - 1))
    return d1, _pow2(dk - d1) if dk > d1 else 16


# fp32 output accumulator elements one program keeps (BLOCK_H x BLOCK_DV): up to 32 heads x 512 (the uniform KV-ratio
# 0.5 shape; 4 warps and 64-token tiles measured fastest there on an H200, 8 warps 1.4x slower). Wider latents
# (per-layer ranks past 512) take 16 heads per program, 8 warps and V tiles of at most 64 x 512 elements: with 4 warps
# or 64 x 1024 tiles a 1024-wide latent ran 4.6x slower (2026-11-30). The head blocks of one split read the same
# latent tiles close together in time (L2 hits).
_ACC_BUDGET = 32 * 512
_V_TILE_BUDGET = 64 * 512


def absorbed_launch(heads: int, dv: int, block_n: int = 64, num_warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps) of the absorbed kernel at latent width ``dv`` (see the budgets above)."""
    block_dv = _pow2(dv)
    block_h = min(64, _pow2(heads), max(16, _ACC_BUDGET // block_dv))
    if block_dv > 512:  # up to 512 wide, 128-token tiles at 8 warps were the bench's pick at batch 32
        block_n = max(16, min(block_n, _V_TILE_BUDGET // block_dv))
    if num_warps is None:
        num_warps = 8 if block_dv > 512 else 4
    return block_h, block_n, num_warps


def absorbed_config(batch: int, heads: int, dk: int, dv: int) -> dict:
    """The absorbed kernel's default launch (H200 ablation, docs/gpu-logs/mla_ablation*_h200_2026-11-30.log).

    The full-tile kernel wherever its tiles fit: 32-token tiles up to a 512-wide value latent (batch 32 / 32k at 85%
    of cuDNN SDPA's bandwidth, 1.70x; the chunked kernel: 48%), 16-token tiles up to 1024 (per-layer ranks past
    512: 1.9x faster than the chunked kernel), 4 warps, 3 stages; one wave of programs at batch 1 (fewer fp32
    partials to merge: 36.6 vs 43.2 us at 32k), two above. Wider latents: the chunked kernel (:func:`absorbed_launch`).
    """
    d1, d2 = key_pieces(dk)
    if _pow2(dv) <= 1024 and d1 + d2 <= 1024:
        block_h = min(64, _pow2(heads), max(16, _ACC_BUDGET // _pow2(dv)))
        return {"tile": "full", "block_h": block_h, "block_n": 32 if _pow2(dv) <= 512 else 16, "num_warps": 4,
                "num_stages": 3, "waves": 1 if batch * triton.cdiv(heads, block_h) < 8 else 2}
    block_h, block_n, num_warps = absorbed_launch(heads, dv)
    return {"tile": "chunked", "block_h": block_h, "block_n": block_n, "num_warps": num_warps, "num_stages": None,
            "waves": 2}


def mla_decode_absorbed(q: torch.Tensor, kv_lat: torch.Tensor, v_lat: torch.Tensor, scale: float,
                        num_splits: int | None = None, block_n: int | None = None, block_d: int = 64,
                        num_warps: int | None = None, num_stages: int | None = None, dv_parts: int = 1,
                        block_h: int | None = None, tile: str | None = None,
                        seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode. q [B, H, DK], kv_lat [B, S, DK], v_lat [B, S, DV] -> out_lat [B, H, DV] (float32).

    ``seq_lens`` [B] (int, on the device): row b attends to its first seq_lens[b] tokens (a static cache of S
    slots, read without a host sync, so the call can be captured in a CUDA graph); None: all S.

    ``kv_lat``/``v_lat`` may be views of caches whose rows are padded (see :func:`padded_latent_cache`).
    Launch options left at None take :func:`absorbed_config`'s defaults. ``tile``: ``full`` (the whole key row per
    token tile, the token loop pipelined) or ``chunked`` (the key row in ``block_d`` chunks; ``dv_parts`` output
    slices per head block)."""
    bsz, heads, dk = q.shape
    _, length, dv = v_lat.shape
    assert kv_lat.shape[:2] == (bsz, length) and kv_lat.shape[2] == dk
    # rows may be padded views (padded_latent_cache): only the last dimension must be contiguous, so none is copied
    q, kv_lat, v_lat = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, kv_lat, v_lat))
    cfg = absorbed_config(bsz, heads, dk, dv)
    tile = tile or cfg["tile"]
    if tile not in ("full", "chunked"):
        raise ValueError(f"tile must be 'full' or 'chunked', not {tile!r}")
    if tile == cfg["tile"]:
        block_n = block_n or cfg["block_n"]
        num_warps = num_warps or cfg["num_warps"]
        num_stages = num_stages or cfg["num_stages"]
    auto_h, block_n, num_warps = absorbed_launch(heads, dv, block_n or 64, num_warps)
    block_h = block_h or auto_h
    align = _align(dk, dv, q.stride(1), kv_lat.stride(1), v_lat.stride(1))
    hblocks = triton.cdiv(heads, block_h)
    split_len, splits, acc, m, l = _split_buffers(
        bsz, heads, length, dv, block_n, num_splits or _num_splits(bsz, hblocks * dv_parts, length, block_n,
                                                                   cfg["waves"]), q.device)
    lens = seq_lens.to(torch.int32) if seq_lens is not None else q
    args = (q, kv_lat, v_lat, acc, m, l, length, lens, heads, dk // align, dv // align, split_len, scale * LOG2E,
            q.stride(0), q.stride(1) // align, kv_lat.stride(0), kv_lat.stride(1) // align, v_lat.stride(0),
            v_lat.stride(1) // align, acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1))
    if tile == "full":
        assert dv_parts == 1, "the full-tile kernel keeps the whole output width"
        d1, d2 = key_pieces(dk)
        _absorbed_full_kernel[(bsz, hblocks, splits)](
            *args, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D1=d1, BLOCK_D2=d2, BLOCK_DV=_pow2(dv), ALIGN=align,
            STAGES=num_stages or 3, HAS_LENS=seq_lens is not None, num_warps=num_warps)
        return _combine(acc, m, l)
    block_dv = _pow2(dv) // dv_parts
    assert block_dv >= 16 and block_dv * dv_parts == _pow2(dv), "dv_parts must split the padded width in 16+ slices"
    extra = {"num_stages": num_stages} if num_stages else {}
    _absorbed_kernel[(bsz, hblocks * dv_parts, splits)](
        *args, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, ALIGN=align, DV_PARTS=dv_parts,
        HAS_LENS=seq_lens is not None, num_warps=num_warps, **extra)
    return _combine(acc, m, l)


def padded_latent_cache(batch: int, length: int, width: int, dtype: torch.dtype, device: torch.device | str,
                        multiple: int = 16) -> torch.Tensor:
    """An empty [batch, length, width] latent cache whose rows start every ``multiple`` elements (a view of a padded
    buffer, read in place by :func:`mla_decode_absorbed`); padding costs at most ``multiple - 1`` elements per row.
    Measured on an H200 for per-layer widths (2026-11-30): no speed change against unpadded rows (±1%)."""
    stride = -(-width // multiple) * multiple
    return torch.empty(batch, length, stride, dtype=dtype, device=device)[..., :width]


def _length_mask(s: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """Scores [B, H, S] with the slots past each row's length at -inf (a static cache)."""
    if seq_lens is None:
        return s
    valid = torch.arange(s.shape[-1], device=s.device)[None] < seq_lens.to(s.device)[:, None]
    return s.masked_fill(~valid[:, None], float("-inf"))


def mla_decode_absorbed_reference(q: torch.Tensor, kv_lat: torch.Tensor, v_lat: torch.Tensor,
                                  scale: float, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`mla_decode_absorbed` (float32)."""
    s = _length_mask(torch.einsum("bhd,bsd->bhs", q.float(), kv_lat.float()) * scale, seq_lens)
    return torch.einsum("bhs,bsd->bhd", torch.softmax(s, -1), v_lat.float())


# ------------------------------------------------------------------------------------------------ shared latent

@triton.jit
def _shared_kernel(QC, QR, C, PE, ACC, M, L, S, LENS, H, DV_A, DR, split_len, scale,
                   s_qb, s_qh_a, s_rb, s_rh, s_cb, s_cn_a, s_pb, s_pn, s_ab, s_ah, s_as, s_mb, s_mh,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
                   ALIGN: tl.constexpr, STAGES: tl.constexpr, HAS_LENS: tl.constexpr):
    # DeepSeek's one latent per token: the normalized c_KV row is both the nope key and the value, k_pe the rope
    # key. Each token tile of c_KV is loaded once and feeds both products (scores through its transpose, the value
    # accumulation directly); the absorbed kernel would read the value columns a second time.
    DV = DV_A * ALIGN
    s_qh = s_qh_a * ALIGN
    s_cn = s_cn_a * ALIGN
    b = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_dr = tl.arange(0, BLOCK_DR)
    hmask = offs_h < H
    dvmask = offs_dv < DV
    drmask = offs_dr < DR
    qc = tl.load(QC + b * s_qb + offs_h[:, None] * s_qh + offs_dv[None, :], mask=hmask[:, None] & dvmask[None, :],
                 other=0.0)
    qr = tl.load(QR + b * s_rb + offs_h[:, None] * s_rh + offs_dr[None, :], mask=hmask[:, None] & drmask[None, :],
                 other=0.0)
    m_i, l_i, acc = _softmax_state(BLOCK_H, BLOCK_DV)
    start, end = _split_range(S, LENS, b, sp, split_len, HAS_LENS)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        c = tl.load(C + b * s_cb + offs_n[:, None] * s_cn + offs_dv[None, :], mask=nmask[:, None] & dvmask[None, :],
                    other=0.0)
        pe = tl.load(PE + b * s_pb + offs_n[:, None] * s_pn + offs_dr[None, :], mask=nmask[:, None] & drmask[None, :],
                     other=0.0)
        s = tl.dot(qc, tl.trans(c)) + tl.dot(qr, tl.trans(pe))
        s = tl.where(nmask[None, :], s * scale, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
    _absorbed_store(ACC, M, L, acc, m_i, l_i, b, sp, offs_h, offs_dv, hmask, DV, s_ab, s_ah, s_as, s_mb, s_mh)


_STAGE_BYTES = 160 * 1024  # shared memory the pipelined c_KV + k_pe tiles may take (an H100/H200 SM has 228 KiB)


def shared_config(batch: int, heads: int, dv: int, dr: int = 64, elem: int = 2) -> dict:
    """The shared-latent kernel's default launch: the absorbed full-tile kernel's budgets (fp32 accumulator of at
    most 32 heads x 512, 32-token tiles up to a 512-wide latent, 16 past it), 4 warps, up to 3 pipeline stages of
    c_KV + k_pe tiles within :data:`_STAGE_BYTES` (``elem``: bytes per cache element), one wave of programs at
    batch 1, two above. Not yet tuned on a GPU (bench/gpu_mla_shared.py has the ablation)."""
    block_dv = _pow2(dv)
    block_h = min(64, _pow2(heads), max(16, _ACC_BUDGET // block_dv))
    block_n = 32 if block_dv <= 512 else 16
    stage = block_n * (block_dv + _pow2(dr)) * elem
    return {"block_h": block_h, "block_n": block_n, "num_warps": 4, "num_stages": max(1, min(3, _STAGE_BYTES // stage)),
            "waves": 1 if batch * triton.cdiv(heads, block_h) < 8 else 2}


def mla_decode_shared(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, scale: float,
                      seq_lens: torch.Tensor | None = None, num_splits: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None,
                      block_h: int | None = None) -> torch.Tensor:
    """Decode over one shared latent (DeepSeek-V3's MLA): q_lat [B, H, r] (each head's nope query through its
    W_UK), q_pe [B, H, d_rope] (RoPE'd), c_kv [B, S, r] (normalized latent: nope key and value), k_pe [B, S, d_rope]
    -> out_lat [B, H, r] (float32; the caller applies each head's W_UV). ``seq_lens`` as in
    :func:`mla_decode_absorbed`. Launch options left at None take :func:`shared_config`'s defaults."""
    bsz, heads, dv = q_lat.shape
    _, length, dr = k_pe.shape
    assert c_kv.shape == (bsz, length, dv) and q_pe.shape == (bsz, heads, dr)
    q_lat, q_pe, c_kv, k_pe = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_lat, q_pe, c_kv, k_pe))
    cfg = shared_config(bsz, heads, dv, dr, c_kv.element_size())
    block_h = block_h or cfg["block_h"]
    block_n = block_n or cfg["block_n"]
    align = _align(dv, q_lat.stride(1), c_kv.stride(1))
    hblocks = triton.cdiv(heads, block_h)
    split_len, splits, acc, m, l = _split_buffers(
        bsz, heads, length, dv, block_n, num_splits or _num_splits(bsz, hblocks, length, block_n, cfg["waves"]),
        q_lat.device)
    lens = seq_lens.to(torch.int32) if seq_lens is not None else q_lat
    _shared_kernel[(bsz, hblocks, splits)](
        q_lat, q_pe, c_kv, k_pe, acc, m, l, length, lens, heads, dv // align, dr, split_len, scale * LOG2E,
        q_lat.stride(0), q_lat.stride(1) // align, q_pe.stride(0), q_pe.stride(1), c_kv.stride(0),
        c_kv.stride(1) // align, k_pe.stride(0), k_pe.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1), BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=_pow2(dv), BLOCK_DR=_pow2(dr),
        ALIGN=align, STAGES=num_stages or cfg["num_stages"], HAS_LENS=seq_lens is not None,
        num_warps=num_warps or cfg["num_warps"])
    return _combine(acc, m, l)


def mla_decode_shared_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                                scale: float, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`mla_decode_shared` (float32)."""
    q = torch.cat([q_lat, q_pe], -1)
    return mla_decode_absorbed_reference(q, torch.cat([c_kv, k_pe], -1), c_kv, scale, seq_lens)


# ------------------------------------------------------------------------------------------------ keep

@triton.jit
def _keep_kernel(Q, CK, CV, WKB, BK, INV_FREQ, KNW, ACC, M, L,
                 S, LENS, RK, RV, NREP, split_len, scale, rope_scale, eps,
                 s_qb, s_qh, s_cb, s_cn, s_vb, s_vn, s_wg, s_wr, s_ab, s_ah, s_as, s_mb, s_mh,
                 HALF: tl.constexpr, BLOCK_REP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RK: tl.constexpr,
                 BLOCK_RV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_LENS: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    offs_rep = tl.arange(0, BLOCK_REP)
    heads = g * NREP + offs_rep
    hmask = offs_rep < NREP
    offs_half = tl.arange(0, HALF)
    offs_rk = tl.arange(0, BLOCK_RK)
    offs_rv = tl.arange(0, BLOCK_RV)
    q1 = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_half[None, :], mask=hmask[:, None], other=0.0)
    q2 = tl.load(Q + b * s_qb + heads[:, None] * s_qh + HALF + offs_half[None, :], mask=hmask[:, None], other=0.0)
    inv = tl.load(INV_FREQ + offs_half)
    if HAS_BIAS:
        b1 = tl.load(BK + g * 2 * HALF + offs_half)
        b2 = tl.load(BK + g * 2 * HALF + HALF + offs_half)
    if HAS_KNORM:
        n1 = tl.load(KNW + offs_half)
        n2 = tl.load(KNW + HALF + offs_half)
    m_i, l_i, acc = _softmax_state(BLOCK_REP, BLOCK_RV)
    start, end = _split_range(S, LENS, b, sp, split_len, HAS_LENS)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        k1 = tl.zeros([BLOCK_N, HALF], tl.float32)
        k2 = tl.zeros([BLOCK_N, HALF], tl.float32)
        for r0 in range(0, RK, BLOCK_RK):  # reconstruct keys from the latent in chunks of r_K
            rmask = (r0 + offs_rk) < RK
            c = tl.load(CK + b * s_cb + offs_n[:, None] * s_cn + r0 + offs_rk[None, :],
                        mask=nmask[:, None] & rmask[None, :], other=0.0)
            w1 = tl.load(WKB + g * s_wg + (r0 + offs_rk[:, None]) * s_wr + offs_half[None, :],
                         mask=rmask[:, None], other=0.0)
            w2 = tl.load(WKB + g * s_wg + (r0 + offs_rk[:, None]) * s_wr + HALF + offs_half[None, :],
                         mask=rmask[:, None], other=0.0)
            k1 += tl.dot(c, w1)
            k2 += tl.dot(c, w2)
        if HAS_BIAS:
            k1 += b1[None, :]
            k2 += b2[None, :]
        if HAS_KNORM:
            ms = (tl.sum(k1 * k1, 1) + tl.sum(k2 * k2, 1)) / (2 * HALF)
            r = 1.0 / tl.sqrt(ms + eps)
            k1 = k1 * r[:, None] * n1[None, :]
            k2 = k2 * r[:, None] * n2[None, :]
        ang = offs_n.to(tl.float32)[:, None] * inv[None, :]
        cos = tl.cos(ang) * rope_scale
        sin = tl.sin(ang) * rope_scale
        r1 = k1 * cos - k2 * sin
        r2 = k2 * cos + k1 * sin
        s = (tl.dot(q1, tl.trans(r1.to(q1.dtype))) + tl.dot(q2, tl.trans(r2.to(q2.dtype)))) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        v = tl.load(CV + b * s_vb + offs_n[:, None] * s_vn + offs_rv[None, :],
                    mask=nmask[:, None] & (offs_rv[None, :] < RV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    tl.store(ACC + b * s_ab + heads[:, None] * s_ah + sp * s_as + offs_rv[None, :], acc,
             mask=hmask[:, None] & (offs_rv[None, :] < RV))
    tl.store(M + b * s_mb + heads * s_mh + sp, m_i, mask=hmask)
    tl.store(L + b * s_mb + heads * s_mh + sp, l_i, mask=hmask)


def mla_decode_keep(q: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor, w_kb: torch.Tensor,
                    inv_freq: torch.Tensor, scale: float, b_k: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, eps: float = 1e-6, rope_scale: float = 1.0,
                    num_splits: int | None = None, block_n: int = 32, block_rk: int = 64,
                    num_warps: int = 4, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct-then-RoPE MLA decode (``seq_lens`` as in :func:`mla_decode_absorbed`).

    q [B, H, d] (RoPE'd), c_k [B, S, r_K], c_v [B, S, r_V], w_kb [G, r_K, d] (group g's key up-projection,
    k = c_K @ w_kb[g]), inv_freq [d/2], b_k [G, d] or None, k_norm [d] or None -> out_lat [B, H, r_V] (float32).
    Keys sit at positions 0..S-1.
    """
    bsz, heads, d = q.shape
    groups, r_k, _ = w_kb.shape
    _, length, r_v = c_v.shape
    assert d & (d - 1) == 0 and d >= 32, "head_dim must be a power of two >= 32"
    nrep = heads // groups
    q, c_k, c_v, w_kb = q.contiguous(), c_k.contiguous(), c_v.contiguous(), w_kb.contiguous()
    split_len, splits, acc, m, l = _split_buffers(bsz, heads, length, r_v, block_n,
                                                  num_splits or _num_splits(bsz, groups, length, block_n), q.device)
    dummy = inv_freq
    _keep_kernel[(bsz, groups, splits)](
        q, c_k, c_v, w_kb, b_k if b_k is not None else dummy, inv_freq.float().contiguous(),
        k_norm if k_norm is not None else dummy, acc, m, l,
        length, seq_lens.to(torch.int32) if seq_lens is not None else dummy,
        r_k, r_v, nrep, split_len, scale * LOG2E, rope_scale, eps,
        q.stride(0), q.stride(1), c_k.stride(0), c_k.stride(1), c_v.stride(0), c_v.stride(1),
        w_kb.stride(0), w_kb.stride(1), acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        HALF=d // 2, BLOCK_REP=_pow2(nrep), BLOCK_N=block_n, BLOCK_RK=min(block_rk, _pow2(r_k)), BLOCK_RV=_pow2(r_v),
        HAS_BIAS=b_k is not None, HAS_KNORM=k_norm is not None, HAS_LENS=seq_lens is not None, num_warps=num_warps)
    return _combine(acc, m, l)


def mla_decode_keep_reference(q: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor, w_kb: torch.Tensor,
                              inv_freq: torch.Tensor, scale: float, b_k: torch.Tensor | None = None,
                              k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                              rope_scale: float = 1.0, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`mla_decode_keep` (float32)."""
    groups = w_kb.shape[0]
    k = torch.einsum("bsr,grd->bgsd", c_k.float(), w_kb.float())
    if b_k is not None:
        k = k + b_k.float()[None, :, None]
    if k_norm is not None:
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm.float()
    pos = torch.arange(c_k.shape[1], device=c_k.device, dtype=torch.float32)
    ang = pos[:, None] * inv_freq.float()[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1) * rope_scale, torch.cat([ang.sin()] * 2, -1) * rope_scale
    half = k.shape[-1] // 2
    k = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
    k = k.repeat_interleave(q.shape[1] // groups, dim=1)  # [B, H, S, d]
    s = _length_mask(torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale, seq_lens)
    return torch.einsum("bhs,bsr->bhr", torch.softmax(s, -1), c_v.float())


def gqa_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain GQA decode with SDPA: q [B, H, d], k/v [B, G, S, d] -> [B, H, d] (the baseline the kernels replace)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale,
                                                           enable_gqa=True)
    return out[:, :, 0]
