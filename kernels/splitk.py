"""The split-K online softmax shared by the decode-attention kernels (INT2 paged cache, MLA absorbed and keep).

Each program of a split-K decode kernel walks one slice of the context, keeping per query row a running maximum ``m``
and sum ``l`` of the exponentials and an unnormalised output ``acc``; a merge weighs the per-split partials
``(acc, m, l)`` into the softmax output. Scores are in the base-2 domain (the caller folds ``log2(e)`` into the softmax
scale), so ``exp2`` is used throughout and the stored maxima are base-2 logits.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def softmax_step(s, m_i, l_i):
    """One online-softmax step over a tile of base-2 scores ``s`` [R, N] (masked entries ``-inf``).

    Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalised probabilities, the factor that rescales the running
    output (``acc = acc * alpha[:, None] + p @ v``), and the updated running maximum and sum.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@triton.jit
def merge_weights(m, l_):
    """Weights of split partials with base-2 maxima ``m`` [S] and sums ``l_`` [S] (empty splits: ``m = -inf``).

    Returns ``(w, denom)``: the output is ``sum_s w[s] * acc[s] / denom``.
    """
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    return w, tl.sum(w * l_, axis=0)
