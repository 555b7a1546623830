"""QAQ decode attention over the variable-width arena, registered as ``kvpass::qaq_attention``; it also
returns what QAQ's bit allocation needs: each cached token's attention weight.

Every cached token has one record per tensor in the sequence's byte arena (:mod:`kvpass.methods.qaq`): its
H x D codes at the token's own width w (1..8 bits), bit-packed from byte ``off``. For a tile of positions a
program (split-K, one per span of positions x (batch, kv head)) loads each token's width and offset, finds
channel c of head h at bit (h * D + c) * w of the record — a code may straddle two bytes — and dequantizes
with the token's per-head scale and zero, putting its exact outliers back. The tiles feed the tensor-core
dots; the splits merge by log-sum-exp (:mod:`.decode`).

The statistic: the kernel also writes every (query row, position) score (base 2, -inf where hidden); with
the merged row maxima and denominators they give the softmax weights, whose max over the query heads and
queries is the per-token weight :meth:`QAQ.record_attention` pushes into the tokens' histories — exactly
what the reference :meth:`QAQ.attend` records.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .decode import (LOG2E, call_length, dot_precision, flash_init, hide, kernel_mask, mask_argument, mask_kind,
                     merged_output, online_softmax_step, plan_splits, query_tile, restore_outliers, store_split,
                     visible, workspace)

TUNING = {"block_n": 32, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4}


@triton.jit
def _record_tile(ARENA, arena_base, OFF, BITS, SCALE, ZERO, OUT, IDX, tok, sh, valid, h, d,
                 D: tl.constexpr, O: tl.constexpr, A: tl.constexpr):
    """Float32 (N, D) head-``h`` vectors of tokens ``tok`` (N,) from their arena records; ``sh``: the
    tokens' offset in the (B, H, C) scale/zero/outlier buffers for this head."""
    w = tl.load(BITS + tok, mask=valid, other=0).to(tl.int32)
    off = tl.load(OFF + tok, mask=valid, other=0)
    bit = (h * D + d)[None, :] * w[:, None]
    byte = off[:, None] + bit // 8
    live = valid[:, None] & (w > 0)[:, None]
    b0 = tl.load(ARENA + arena_base + byte, mask=live, other=0).to(tl.int32)
    b1 = tl.load(ARENA + arena_base + byte + 1, mask=live & (byte + 1 < A), other=0).to(tl.int32)
    code = ((b0 | (b1 << 8)) >> (bit % 8)) & ((1 << w[:, None]) - 1)
    scale = tl.load(SCALE + sh, mask=valid, other=0.0).to(tl.float32)
    zero = tl.load(ZERO + sh, mask=valid, other=0.0).to(tl.float32)
    return restore_outliers(code.to(tl.float32) * scale[:, None] + zero[:, None], d, OUT, IDX, sh, valid, O)


@triton.jit
def _qaq_kernel(Q, ARENA, KOFF, KBITS, KSC, KZR, KOUT, KIDX, VOFF, VBITS, VSC, VZR, VOUT, VIDX, LEN, MASK,
                ACC, M, L, SCORES, stride_qb, stride_qh, stride_qt, n_splits, chunk, qk_scale, mask_w, scores_w,
                H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                C: tl.constexpr, A: tl.constexpr, O: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    split = tl.program_id(0)
    length = tl.minimum(tl.load(LEN).to(tl.int32), C)
    bh, b, h, row_ok, tt, qpos, q_row, q = query_tile(Q, length, stride_qb, stride_qh, stride_qt, H, R, T, ROWS, D)
    rows = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK)
    dt = q.dtype
    b64 = b.to(tl.int64)
    bh64 = bh.to(tl.int64)
    m_i, l_i, acc = flash_init(ROWS, D)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    for start in range(lo, hi, BLOCK):
        pos = start + n
        valid = pos < hi
        tok = b64 * C + pos
        sh = bh64 * C + pos
        k = _record_tile(ARENA, b64 * A, KOFF, KBITS, KSC, KZR, KOUT, KIDX, tok, sh, valid, h, d, D, O, A).to(dt)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
        s = hide(s, visible(row_ok, valid, pos, qpos, CAUSAL), pos, b, tt, mask_w, MASK, T, HAS_MASK)
        tl.store(SCORES + (bh64 * (R * T) + rows)[:, None] * scores_w + pos[None, :], s,
                 mask=row_ok[:, None] & valid[None, :])
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = _record_tile(ARENA, b64 * A, VOFF, VBITS, VSC, VZR, VOUT, VIDX, tok, sh, valid, h, d, D, O, A).to(dt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC).to(tl.float32)
    store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_splits, R * T, ROWS, D)


@triton_op("kvpass::qaq_attention", mutates_args={})
def qaq_attention(q: torch.Tensor, arena: torch.Tensor, k_off: torch.Tensor, k_bits: torch.Tensor,
                  k_scale: torch.Tensor, k_zero: torch.Tensor, k_out: torch.Tensor, k_out_idx: torch.Tensor,
                  v_off: torch.Tensor, v_bits: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                  v_out: torch.Tensor, v_out_idx: torch.Tensor, length: torch.Tensor, attn_mask: torch.Tensor | None,
                  length_hint: int, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, T, D) over a QAQ cache (buffers as in :mod:`kvpass.methods.qaq`) holding
    ``length`` tokens (0-d int64; ``length_hint`` = the same on the host); the T queries are the last T.
    ``attn_mask``: None or float32 (B, T, W) added to the scores of positions < W. Returns the output
    (B, Hq, T, D) in q.dtype and each cached token's attention weight (B, length) float32: the max of its
    softmax weight over the query heads and queries."""
    b, hq, t, d = q.shape
    h, cap = k_scale.shape[1], k_scale.shape[2]
    r = hq // h
    block = TUNING["block_n"]
    plan = plan_splits(b * h, length_hint, r * t, block, q.device, TUNING["programs_per_sm"])
    splits = max(plan.splits, 1)
    acc, m, l = workspace(splits, r * t, b * h, d, q.device)
    scores = torch.full((b * h, r * t, max(length_hint, 1)), float("-inf"), dtype=torch.float32, device=q.device)
    mask, mask_w = mask_argument(attn_mask, q)
    o = k_out.shape[-1]
    stand_in = q.new_zeros(1, dtype=torch.uint8)
    wrap_triton(_qaq_kernel)[(splits, b * h)](
        q, arena, k_off, k_bits, k_scale, k_zero, k_out if o else k_scale, k_out_idx if o else stand_in,
        v_off, v_bits, v_scale, v_zero, v_out if o else v_scale, v_out_idx if o else stand_in, length, mask,
        acc, m, l, scores, q.stride(0), q.stride(1), q.stride(2), splits, plan.chunk, scale * LOG2E, mask_w,
        scores.shape[-1],
        H=h, R=r, T=t, ROWS=plan.rows_pad, D=d, C=cap, A=arena.shape[1], O=o, BLOCK=block, CAUSAL=causal,
        HAS_MASK=mask_kind(attn_mask), PREC=dot_precision(q),
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"])
    out = merged_output(acc, m, l, q, plan.rows_pad, h, wrap_triton)
    # the merged softmax statistics per row (base 2), then the weights' max over heads and queries
    m_row = m.amax(1, keepdim=True)                                                    # (BH, 1, rows)
    m_safe = torch.where(torch.isneginf(m_row), torch.zeros_like(m_row), m_row)
    denom = (l * torch.exp2(m - m_safe)).sum(1)                                        # (BH, rows)
    probs = torch.exp2(scores - m_safe.transpose(1, 2)) / torch.where(denom == 0, 1.0, denom)[..., None]
    weights = probs.reshape(b, h * r * t, -1).amax(1)[:, :length_hint]
    return out, weights


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call: power-of-two head_dim <= 256, masks shared by all heads, no
    sliding window or soft-capping, not inside a CUDA-graph capture (QAQ plans widths on the host)."""
    from kvpass.graphs import capturing
    d = q.shape[-1]
    return (16 <= d <= 256 and d & (d - 1) == 0 and sliding_window is None and softcap is None
            and not capturing(q) and (attn_mask is None or attn_mask.dim() != 4 or attn_mask.shape[1] == 1))


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`QAQ.attend` through the kernel, recording the tokens' attention weights as the reference does:
    q (B, Hq, T, D) -> (B, Hq, T, D) in q.dtype."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "a power-of-two head_dim in [16, 256] and masks shared by all heads, outside CUDA-graph "
                         "captures")
    b, _, t, d = q.shape
    names = ("arena", "k_off", "k_bits", "k_scale", "k_zero", "k_out", "k_out_idx", "v_off", "v_bits", "v_scale",
             "v_zero", "v_out", "v_out_idx")
    out, weights = qaq_attention(q, *(state[n] for n in names), state.length_tensor,
                                 kernel_mask(attn_mask, b, t, length), length,
                                 d ** -0.5 if scale is None else float(scale), causal)
    scheme.record_attention(state, weights)
    return out
