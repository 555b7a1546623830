"""What the Gluon main loops whose warps each run their own split share (:mod:`.codebook_gluon`,
:mod:`.kvquant_gluon`): the masked online-softmax step on transposed scores and the store of a warp's split.

Both loops keep scores transposed, (W warps, 32 tokens, 8 query rows) in an ``mma.sync`` layout with the warp as
dimension 0, in base 2, and accumulate O^T (W, 128, 8) whose row m is channel 16 (m & 7) + 2 (m >> 4) +
((m >> 3) & 1) (a lane's 16 rows are whole codes).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def query_indices(W: gl.constexpr, D: gl.constexpr, b_op: gl.constexpr):
    """Index tensors of q^T (W, D k, 8 rows) in the key product's B-operand layout ``b_op``: (k (1, D, 1), row
    (1, 1, 8), warp (W, 1, 1))."""
    qk = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(2, b_op)))[None, :, None]
    qn = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, b_op)))[None, None, :]
    qw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, b_op)))[:, None, None]
    return qk, qn, qw


@gluon.jit
def softmax_step(s, pos, hi, m_i, l_i, MASK, b, mask_w, HAS_MASK: gl.constexpr):
    """One flash step on base-2 scores s (W, 32, 8) float32 of positions ``pos`` (W, 32), those >= ``hi`` (W, 1)
    hidden; HAS_MASK (:func:`.decode.mask_kind`): MASK (B, 1, mask_w) added to the scores (1: float32, 2: bool,
    False hides), positions past its width unmasked. Returns (p, alpha, m, l) as :func:`.decode.online_softmax_step`:
    rows with nothing visible yet keep m = -inf."""
    if HAS_MASK:
        inside = pos < mask_w
        if HAS_MASK == 2:
            add = gl.where(gl.load(MASK + b * mask_w + pos, mask=inside, other=1) != 0, 0.0, float("-inf"))
        else:
            add = gl.load(MASK + b * mask_w + pos, mask=inside, other=0.0) * 1.4426950408889634
        s = s + add[:, :, None]
    s = gl.where((pos < hi)[:, :, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - m_safe[:, None, :])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def store_warp_splits(ACC, M, L, o, m_i, l_i, bh, pid, n_splits, R: gl.constexpr, W: gl.constexpr,
                      mma: gl.constexpr):
    """Warp w's (O^T (W, 128, 8), m, l (W, 8)) into workspace split pid * W + w of (batch x kv head) ``bh``, rows < R
    (acc (B*H, n_splits, R, 128), m, l (B*H, n_splits, R) float32)."""
    om = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma)))[None, :, None]
    on = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, mma)))[None, None, :]
    ow = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, mma)))[:, None, None]
    och = 16 * (om & 7) + 2 * (om >> 4) + ((om >> 3) & 1)
    row = (bh * n_splits + pid * W + ow) * R + on
    gl.store(ACC + row * 128 + och, o, mask=on < R)
    ml_w = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(1, mma)))[:, None]
    ml_n = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, mma)))[None, :]
    ml_row = (bh * n_splits + pid * W + ml_w) * R + ml_n
    gl.store(M + ml_row, m_i, mask=ml_n < R)
    gl.store(L + ml_row, l_i, mask=ml_n < R)
