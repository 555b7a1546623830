"""Decode attention over a StreamingLLM ring (:class:`kvpass.methods.streaming.StreamingRing`) as one Triton
program, for split kernels that serve a duo layer's streaming heads in a launch of its retrieval heads
(:mod:`.duo`: ahead of the split programs of KIVI's main launch or of the scaled kernel's one launch).

The ring of one (batch, kv head) holds the sink — positions 0..SINK-1 in slots 0..SINK-1 — and the newest
RECENT positions, position p in ring slot (p - SINK) % RECENT. After the newest token (position
``length - 1``) is stored, slot i holds position ``p_i = length - 1 - ((length - 1 - SINK - i) mod RECENT)``,
visible when it was written (``p_i >= SINK``); sink slot j is visible when ``j < length``. The program
attends its R query rows (one new token) over both, fp16 tiles of RING_N slots, and writes the normalized
output to the rows' query heads: there is one split, so no merge. The reference is
:meth:`StreamingRing.store_attend_at` (store, then attend).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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
def ring_program(Q, OUT, K_SINK, V_SINK, K_RING, V_RING, S_MAP, MASK, LEN, n_rings, qk_scale, mask_w, stride_qb,
                 stride_qh, stride_ob, stride_oh, HS: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr,
                 D: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr, RING_N: tl.constexpr,
                 HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """A program of a split launch's leading ring rows: the ring numbered by its place in those rows
    (:func:`ring_attend`), or nothing past the n_rings = B * HS rings."""
    idx = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if idx < n_rings:
        ring_attend(Q, OUT, K_SINK, V_SINK, K_RING, V_RING, S_MAP, MASK, idx, tl.load(LEN).to(tl.int32), qk_scale,
                    mask_w, stride_qb, stride_qh, stride_ob, stride_oh, HS, R, ROWS, D, SINK, RECENT, RING_N,
                    HAS_MASK, PREC)


class RingPart(NamedTuple):
    """A duo layer's streaming heads for a split launch that also attends them: the cache of that launch
    holds the retrieval heads ``kv_map`` (int32, model kv head of each cache head), the ring (sink
    (B, HS, SINK, D) and recent (B, HS, RECENT, D) buffers) the heads ``s_map``; the ring programs write their
    rows of ``out`` (B, Hq, 1, D)."""
    kv_map: torch.Tensor
    k_sink: torch.Tensor
    v_sink: torch.Tensor
    k_ring: torch.Tensor
    v_ring: torch.Tensor
    s_map: torch.Tensor
    out: torch.Tensor


def ring_arguments(ring: RingPart | None, placeholder: torch.Tensor, q: torch.Tensor) -> tuple[tuple, dict]:
    """(KV_MAP, K_SINK, V_SINK, K_RING, V_RING, S_MAP, OUT, stride_ob, stride_oh) and the constexprs
    (MAPPED, HS, SINK, RECENT, RING_N) of a split kernel that takes :func:`ring_attend` programs;
    without a ring, ``placeholder`` stands for the tensors (never read) and q for the output."""
    if ring is None:
        p = placeholder
        return (p, p, p, p, p, p, q, 0, 0), dict(MAPPED=False, HS=0, SINK=0, RECENT=0, RING_N=16)
    sink, recent = ring.k_sink.shape[2], ring.k_ring.shape[2]
    k_sink = ring.k_sink if sink else ring.k_ring        # a zero-size sink is never read: any real pointer
    v_sink = ring.v_sink if sink else ring.v_ring
    return ((ring.kv_map, k_sink, v_sink, ring.k_ring, ring.v_ring, ring.s_map, ring.out, ring.out.stride(0),
             ring.out.stride(1)),
            dict(MAPPED=True, HS=ring.s_map.shape[0], SINK=sink, RECENT=recent,
                 RING_N=ring_tile_size(sink, recent)))


def ring_tile_size(sink: int, recent: int) -> int:
    """The slots a ring program attends per step: 32 (the KIVI tail's own tile: with 64 the sm_90 build of the
    tail launch spills at 2 warps), or fewer for a small window (at least 16)."""
    return max(16, min(32, triton.next_power_of_2(max(sink, recent))))
