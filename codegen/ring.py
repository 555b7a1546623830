"""Decode attention over a StreamingLLM ring (:class:`kvpass.methods.streaming.StreamingRing`) as one Triton
program, for kernels that serve a duo layer's streaming heads in the launch of its retrieval heads
(:mod:`.duo`).

The ring of one (batch, kv head) holds the sink — positions 0..SINK-1 in slots 0..SINK-1 — and the newest
RECENT positions, position p in ring slot (p - SINK) % RECENT. After the newest token (position
``length - 1``) is stored, slot i holds position ``p_i = length - 1 - ((length - 1 - SINK - i) mod RECENT)``,
visible when it was written (``p_i >= SINK``); sink slot j is visible when ``j < length``. The program
attends its R query rows (one new token) over both, fp16 tiles of RING_N slots, and writes the normalized
output to the rows' query heads: there is one split, so no merge. The reference is
:meth:`StreamingRing.store_attend_at` (store, then attend).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import hide, online_softmax_step, query_rows


@triton.jit
def _ring_tile(q, acc, m_i, l_i, K, V, slot, pos, ok, row_ok, b, mask_w, qk_scale, MASK, D: tl.constexpr,
               HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """One flash step over the slots ``slot`` (N,) of K/V (slot-major, D channels) holding positions ``pos``,
    those with ``ok`` visible."""
    d = tl.arange(0, D)
    k = tl.load(K + slot[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
    tt = tl.zeros_like(m_i).to(tl.int32)
    s = hide(s, row_ok[:, None] & ok[None, :], pos, b, tt, mask_w, MASK, 1, HAS_MASK)
    p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
    v = tl.load(V + slot[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
    return acc, m_i, l_i


@triton.jit
def ring_attend(Q, OUT, K_SINK, V_SINK, K_RING, V_RING, S_MAP, MASK, idx, length, qk_scale, mask_w,
                stride_qb, stride_qh, stride_ob, stride_oh, HS: tl.constexpr, R: tl.constexpr,
                ROWS: tl.constexpr, D: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr,
                RING_N: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """Program ``idx`` = b * HS + h of the ring part (HS streaming kv heads; the model's kv head S_MAP[h]):
    its R query rows of Q (B, Hq, 1, D) over its sink (SINK slots) and ring (RECENT slots) when the layer
    holds ``length`` tokens, the newest included; the output rows go to OUT (B, Hq, 1, D)."""
    b = idx // HS
    h = idx % HS
    head = tl.load(S_MAP + h)
    row_ok, tt, qpos, q_row, q = query_rows(Q, b, head, length, stride_qb, stride_qh, 0, R, 1, ROWS, D)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    n = tl.arange(0, RING_N)
    newest = length - 1
    base = idx.to(tl.int64)
    if SINK > 0:
        for start in range(0, SINK, RING_N):
            slot = start + n
            ok = (slot < SINK) & (slot <= newest)
            acc, m_i, l_i = _ring_tile(q, acc, m_i, l_i, K_SINK + base * SINK * D, V_SINK + base * SINK * D,
                                       slot, slot, ok, row_ok, b, mask_w, qk_scale, MASK, D, HAS_MASK, PREC)
    for start in range(0, RECENT, RING_N):
        slot = start + n
        back = (newest - SINK - slot) % RECENT
        back = tl.where(back < 0, back + RECENT, back)          # Triton's % keeps the dividend's sign
        pos = newest - back
        ok = (slot < RECENT) & (pos >= SINK)
        acc, m_i, l_i = _ring_tile(q, acc, m_i, l_i, K_RING + base * RECENT * D, V_RING + base * RECENT * D,
                                   slot, pos, ok, row_ok, b, mask_w, qk_scale, MASK, D, HAS_MASK, PREC)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    d = tl.arange(0, D)
    rows = tl.arange(0, ROWS)
    ptr = OUT + b * stride_ob + (head * R + rows)[:, None] * stride_oh + d[None, :]
    tl.store(ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _ring_kernel(Q, OUT, K_SINK, V_SINK, K_RING, V_RING, S_MAP, MASK, LEN, qk_scale, mask_w, stride_qb, stride_qh,
                 stride_ob, stride_oh, HS: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                 SINK: tl.constexpr, RECENT: tl.constexpr, RING_N: tl.constexpr, HAS_MASK: tl.constexpr,
                 PREC: tl.constexpr):
    """Program b * HS + h: :func:`ring_attend` of streaming head h of batch b, the layer holding LEN tokens."""
    ring_attend(Q, OUT, K_SINK, V_SINK, K_RING, V_RING, S_MAP, MASK, tl.program_id(0), tl.load(LEN).to(tl.int32),
                qk_scale, mask_w, stride_qb, stride_qh, stride_ob, stride_oh, HS, R, ROWS, D, SINK, RECENT, RING_N,
                HAS_MASK, PREC)


def launch_rings(q, out, k_sink, v_sink, k_ring, v_ring, s_map, length, mask, mask_w: int, mask_kind: int,
                 qk_scale: float, r: int, rows_pad: int, prec: str, launch) -> None:
    """Attend the streaming heads ``s_map`` (int32 (HS,), model kv heads) of q (B, Hq, 1, D), R = ``r`` query
    heads each, over their sinks (B, HS, SINK, D) and rings (B, HS, RECENT, D), one program each, writing
    their rows of ``out`` (B, Hq, 1, D). ``mask``, ``mask_w``, ``mask_kind``: as the split kernels take them
    (:func:`.decode.mask_argument`); ``qk_scale``: the softmax scale times log2 e; ``rows_pad``: R padded to a
    tile; ``prec``: the dots' precision; ``launch``: :func:`torch.library.wrap_triton` inside a triton_op."""
    b, d = q.shape[0], q.shape[3]
    hs, sink, recent = s_map.shape[0], k_sink.shape[2], k_ring.shape[2]
    launch(_ring_kernel)[(b * hs,)](
        q, out, k_sink if sink else k_ring, v_sink if sink else v_ring, k_ring, v_ring, s_map, mask, length,
        qk_scale, mask_w, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        HS=hs, R=r, ROWS=rows_pad, D=d, SINK=sink, RECENT=recent, RING_N=ring_tile_size(sink, recent),
        HAS_MASK=mask_kind, PREC=prec, num_warps=2)


def ring_tile_size(sink: int, recent: int) -> int:
    """The slots a ring program attends per step: 32 (the KIVI tail's own tile: with 64 the sm_90 build of the
    tail launch spills at 2 warps), or fewer for a small window (at least 16)."""
    return max(16, min(32, triton.next_power_of_2(max(sink, recent))))
