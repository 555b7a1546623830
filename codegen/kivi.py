"""KIVI decode attention as one split-K Triton kernel (plus the shared merge), registered as
``kvpass::kivi_attention`` with :func:`torch.library.triton_op` so Inductor can see into it.

Programs 0..S-1 each own a span of whole blocks of GPB key groups below ``nk`` (the first position whose
key is still in the full-precision ring): there keys and values are both quantized, so the loop has no
position masks. It loads packed codes and dequantizes them in registers — keys per channel with the
scale/zero of their group of G tokens, values per token with one scale/zero per G channels — and feeds
them to the tensor-core dots; no fp16 copy of the cache is ever written. The last program takes the rest:
leftover groups, keys in the ring, values quantized below ``nv`` and then in the ring, each position
picking its source by masked loads (masked-off lanes read no memory). The splits merge by log-sum-exp
(:mod:`.decode`). The reference is :meth:`kvpass.methods.kivi.KIVI.attend`.

Measured on the H200 (bench/results/decode_attention.json) this kernel is still slower than bf16 SDPA
although it reads 5.3x fewer bytes: it is bound by the per-element unpack/dequantize instructions, not by
memory. Folding the scales into q and p and converting codes without int->float instructions are the
next steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kvpass.errors import ShapeError

from .decode import (LOG2E, additive_mask, merge_splits, nonempty, online_softmax_step, plan_splits,
                     store_split, workspace)

# launch parameters, tuned on the H200 by bench/decode_attention.py --tune
# (groups_per_block 4, 4 warps, 2 stages: best of a sweep at 128K, batch 1 and 8;
# bench/results/decode_attention.json)
# slot_dots: the shuffle-free main loop (_kivi_main_slots), not yet measured on the GPU
TUNING = {"groups_per_block": 4, "num_warps": 4, "num_stages": 2, "slot_dots": False}


@triton.jit
def _unpack_tile(packed, BITS: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """(N, D*BITS/8) uint8 bytes -> (N, D) int32 codes of the planar packing
    (:func:`kvpass.packing.pack_planar`): code i*PK + j sits in byte j at bit i*BITS."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        out = packed.to(tl.int32)
    else:
        shifts = tl.arange(0, PER) * BITS
        codes = (packed.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        out = tl.reshape(codes, (N, D))
    return out


@triton.jit
def _expand_rows(x, A: tl.constexpr, REP: tl.constexpr, C: tl.constexpr):
    """(A, C) -> (A * REP, C): each row repeated REP times (in registers)."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (A, REP, C)), (A * REP, C))


@triton.jit
def _expand_cols(x, N: tl.constexpr, A: tl.constexpr, REP: tl.constexpr):
    """(N, A) -> (N, A * REP): each column repeated REP times (in registers)."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (N, A, REP)), (N, A * REP))


@triton.jit
def _softmax_block(s, pos, qpos, row_ok, tt, b, length, MASK, m_i, l_i, T: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr):
    """Main-loop flash step on base-2 scores s (ROWS, BLOCK) of fully valid positions: causal hiding
    (only with several new tokens), the additive mask (B, T, length) if any, then the online softmax."""
    if CAUSAL and T > 1:
        s = tl.where(pos[None, :] <= qpos[:, None], s, float("-inf"))
    if HAS_MASK:
        s += tl.load(MASK + (b * T + tt)[:, None] * length + pos[None, :], mask=row_ok[:, None],
                     other=0.0) * 1.4426950408889634
    return online_softmax_step(s, m_i, l_i)


@triton.jit
def _kivi_main(q, qpos, row_ok, tt, b, length, start_pos, end_pos, qk_scale, MASK, kc_base, ks_base,
               vc_base, vs_base, KS, KZ, VS, VZ, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
               G: tl.constexpr, GPB: tl.constexpr, T: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """Positions [start_pos, end_pos), whole blocks of GPB key groups: keys and values both quantized,
    no position masks. Returns the program's (acc, m, l)."""
    PK: tl.constexpr = D * BITS // 8
    GV: tl.constexpr = D // G
    BLOCK: tl.constexpr = GPB * G
    dt = q.dtype
    d = tl.arange(0, D)
    byte = tl.arange(0, PK)
    n = tl.arange(0, BLOCK)
    gk = tl.arange(0, GPB)
    gv = tl.arange(0, GV)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for start in range(start_pos, end_pos, BLOCK):
        pos = start + n
        # keys: per channel, one scale/zero per group of G tokens, broadcast over the group in registers
        kcodes = _unpack_tile(tl.load(kc_base + pos[:, None] * PK + byte[None, :]), BITS, BLOCK, D)
        ksz = ks_base + (start // G + gk)[:, None] * D + d[None, :]
        k_s = _expand_rows(tl.load(KS + ksz).to(tl.float32), GPB, G, D)
        k_z = _expand_rows(tl.load(KZ + ksz).to(tl.float32), GPB, G, D)
        k = (kcodes.to(tl.float32) * k_s + k_z).to(dt)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
        p, alpha, m_i, l_i = _softmax_block(s, pos, qpos, row_ok, tt, b, length, MASK, m_i, l_i, T, CAUSAL, HAS_MASK)
        # values: per token, one scale/zero per G channels, broadcast across the channels in registers
        vcodes = _unpack_tile(tl.load(vc_base + pos[:, None] * PK + byte[None, :]), BITS, BLOCK, D)
        vsz = vs_base + pos[:, None] * GV + gv[None, :]
        v_s = _expand_cols(tl.load(VS + vsz).to(tl.float32), BLOCK, GV, G)
        v_z = _expand_cols(tl.load(VZ + vsz).to(tl.float32), BLOCK, GV, G)
        v = (vcodes.to(tl.float32) * v_s + v_z).to(dt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC).to(tl.float32)
    return acc, m_i, l_i


@triton.jit
def _kivi_main_slots(q_row, row_ok, qpos, tt, b, length, start_pos, end_pos, qk_scale, MASK, kc_base, ks_base,
                     vc_base, vs_base, KS, KZ, VS, VZ, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                     G: tl.constexpr, GPB: tl.constexpr, T: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """:func:`_kivi_main` without register shuffles: each bit slot i of the planar bytes is the run of
    channels [i*PK, (i+1)*PK), so its codes come from the loaded byte tile with one shift and mask, in the
    tile's own layout, and feed their own tensor-core dot (keys: scores += q_i . k_i; values: one
    accumulator per slot). Scales are loaded per slot instead of broadcast by reshapes. At most 4 slots
    (2, 4 or 8 bits). Returns (acc slots 0..3 (ROWS, PK), m, l)."""
    PK: tl.constexpr = D * BITS // 8
    PER: tl.constexpr = 8 // BITS
    GV: tl.constexpr = D // G
    BLOCK: tl.constexpr = GPB * G
    CMASK: tl.constexpr = (1 << BITS) - 1
    dt = q_row.dtype.element_ty
    j = tl.arange(0, PK)
    n = tl.arange(0, BLOCK)
    q0 = tl.load(q_row[:, None] + j[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(q_row[:, None] + (PK % D) + j[None, :], mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_row[:, None] + (2 * PK % D) + j[None, :], mask=row_ok[:, None], other=0.0)
    q3 = tl.load(q_row[:, None] + (3 * PK % D) + j[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc0 = tl.zeros((ROWS, PK), tl.float32)
    acc1 = tl.zeros((ROWS, PK), tl.float32)
    acc2 = tl.zeros((ROWS, PK), tl.float32)
    acc3 = tl.zeros((ROWS, PK), tl.float32)
    for start in range(start_pos, end_pos, BLOCK):
        pos = start + n
        kb = tl.load(kc_base + pos[:, None] * PK + j[None, :]).to(tl.int32)           # (BLOCK, PK)
        kgrp = ks_base + (pos // G)[:, None] * D + j[None, :]
        s = tl.zeros((ROWS, BLOCK), tl.float32)
        for i in tl.static_range(PER):
            if i == 0:
                qi = q0
            elif i == 1:
                qi = q1
            elif i == 2:
                qi = q2
            else:
                qi = q3
            c = ((kb >> (i * BITS)) & CMASK).to(tl.float32)
            k = (c * tl.load(KS + kgrp + i * PK).to(tl.float32) + tl.load(KZ + kgrp + i * PK).to(tl.float32))
            s += tl.dot(qi, tl.trans(k.to(dt)), input_precision=PREC)
        p, alpha, m_i, l_i = _softmax_block(s * qk_scale, pos, qpos, row_ok, tt, b, length, MASK, m_i, l_i, T,
                                            CAUSAL, HAS_MASK)
        pd = p.to(dt)
        vb = tl.load(vc_base + pos[:, None] * PK + j[None, :]).to(tl.int32)
        for i in tl.static_range(PER):
            c = ((vb >> (i * BITS)) & CMASK).to(tl.float32)
            if PK <= G:     # the slot lies in one value-scale group: one scale per token
                vsz = vs_base + pos * GV + (i * PK) // G
                v = c * tl.load(VS + vsz).to(tl.float32)[:, None] + tl.load(VZ + vsz).to(tl.float32)[:, None]
            else:
                vsz = vs_base + pos[:, None] * GV + ((i * PK + j) // G)[None, :]
                v = c * tl.load(VS + vsz).to(tl.float32) + tl.load(VZ + vsz).to(tl.float32)
            part = tl.dot(pd, v.to(dt), input_precision=PREC)
            if i == 0:
                acc0 = acc0 * alpha[:, None] + part
            elif i == 1:
                acc1 = acc1 * alpha[:, None] + part
            elif i == 2:
                acc2 = acc2 * alpha[:, None] + part
            else:
                acc3 = acc3 * alpha[:, None] + part
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _kivi_tail(q, qpos, row_ok, tt, b, length, start_pos, nk, nv, qk_scale, MASK, kc_base, ks_base,
               vc_base, vs_base, kw_base, vw_base, KS, KZ, VS, VZ, ROWS: tl.constexpr, D: tl.constexpr,
               BITS: tl.constexpr, G: tl.constexpr, WK: tl.constexpr, WV: tl.constexpr, T: tl.constexpr,
               TAIL_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """Positions [start_pos, length): leftover key groups, keys in the ring from nk, values quantized
    below nv, then the ring; every position picks its source by masked loads (masked-off lanes read no
    memory). Returns the program's (acc, m, l)."""
    PK: tl.constexpr = D * BITS // 8
    GV: tl.constexpr = D // G
    dt = q.dtype
    d = tl.arange(0, D)
    byte = d % PK                 # planar packing: channel d is in byte d % PK at bit (d // PK) * BITS
    shift = (d // PK) * BITS
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for start in range(start_pos, length, TAIL_N):
        pos = start + tl.arange(0, TAIL_N)
        valid = pos < length
        kq = valid & (pos < nk)
        kb = tl.load(kc_base + pos[:, None] * PK + byte[None, :], mask=kq[:, None], other=0)
        kcodes = (kb.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
        ksz = ks_base + (pos // G)[:, None] * D + d[None, :]
        k_s = tl.load(KS + ksz, mask=kq[:, None], other=0.0).to(tl.float32)
        k_z = tl.load(KZ + ksz, mask=kq[:, None], other=0.0).to(tl.float32)
        kwin = tl.load(kw_base + (pos % WK)[:, None] * D + d[None, :], mask=(valid & (pos >= nk))[:, None],
                       other=0.0)
        k = tl.where(kq[:, None], (kcodes.to(tl.float32) * k_s + k_z).to(dt), kwin)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
        keep = row_ok[:, None] & valid[None, :]
        if CAUSAL:
            keep = keep & (pos[None, :] <= qpos[:, None])
        if HAS_MASK:
            s += tl.load(MASK + (b * T + tt)[:, None] * length + pos[None, :], mask=keep,
                         other=0.0) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        vq = valid & (pos < nv)
        vb = tl.load(vc_base + pos[:, None] * PK + byte[None, :], mask=vq[:, None], other=0)
        vcodes = (vb.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
        vsz = vs_base + pos[:, None] * GV + (d // G)[None, :]
        v_s = tl.load(VS + vsz, mask=vq[:, None], other=0.0).to(tl.float32)
        v_z = tl.load(VZ + vsz, mask=vq[:, None], other=0.0).to(tl.float32)
        vwin = tl.load(vw_base + (pos % WV)[:, None] * D + d[None, :], mask=(valid & (pos >= nv))[:, None],
                       other=0.0)
        v = tl.where(vq[:, None], (vcodes.to(tl.float32) * v_s + v_z).to(dt), vwin)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC).to(tl.float32)
    return acc, m_i, l_i


@triton.jit
def _kivi_split_kernel(
        Q, KC, KS, KZ, KW, VC, VS, VZ, VW, LEN, MASK, ACC, M, L,
        stride_qb, stride_qh, stride_qt, n_main, chunk, qk_scale,
        H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
        BITS: tl.constexpr, G: tl.constexpr, RESIDUAL: tl.constexpr, NK_CAP: tl.constexpr,
        NV_CAP: tl.constexpr, WK: tl.constexpr, WV: tl.constexpr, GPB: tl.constexpr, TAIL_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, SLOTS: tl.constexpr):
    """Programs 0..n_main-1: ``chunk`` positions each of the whole GPB-group blocks below nk
    (:func:`_kivi_main`, or :func:`_kivi_main_slots` with SLOTS); program n_main: everything after them
    (:func:`_kivi_tail`)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.load(LEN).to(tl.int32)
    held = tl.maximum(length - RESIDUAL, 0)
    nk = held // G * G
    nv = held
    nk_main = nk // (GPB * G) * (GPB * G)

    PK: tl.constexpr = D * BITS // 8
    rows = tl.arange(0, ROWS)
    row_ok = rows < R * T
    rr = rows // T
    tt = rows % T
    qpos = length - T + tt
    d = tl.arange(0, D)
    q_row = Q + b * stride_qb + (h * R + rr) * stride_qh + tt * stride_qt
    q = tl.load(q_row[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    bh64 = bh.to(tl.int64)
    kc_base = KC + bh64 * NK_CAP * PK
    ks_base = bh64 * (NK_CAP // G) * D
    vc_base = VC + bh64 * NV_CAP * PK
    vs_base = bh64 * NV_CAP * (D // G)
    if split < n_main:
        lo = split * chunk
        hi = tl.minimum(lo + chunk, nk_main)
        if SLOTS:
            a0, a1, a2, a3, m_s, l_s = _kivi_main_slots(
                q_row, row_ok, qpos, tt, b, length, lo, hi, qk_scale, MASK, kc_base, ks_base, vc_base, vs_base,
                KS, KZ, VS, VZ, ROWS, D, BITS, G, GPB, T, CAUSAL, HAS_MASK, PREC)
            _store_slots(ACC, M, L, a0, a1, a2, a3, m_s, l_s, bh, split, n_main + 1, R * T, ROWS, D, PK)
        else:
            acc, m_i, l_i = _kivi_main(q, qpos, row_ok, tt, b, length, lo, hi, qk_scale, MASK, kc_base, ks_base,
                                       vc_base, vs_base, KS, KZ, VS, VZ, ROWS, D, BITS, G, GPB, T, CAUSAL,
                                       HAS_MASK, PREC)
            store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_main + 1, R * T, ROWS, D)
    else:
        acc_t, m_t, l_t = _kivi_tail(q, qpos, row_ok, tt, b, length, nk_main, nk, nv, qk_scale, MASK, kc_base,
                                     ks_base, vc_base, vs_base, KW + bh64 * WK * D, VW + bh64 * WV * D,
                                     KS, KZ, VS, VZ, ROWS, D, BITS, G, WK, WV, T, TAIL_N, CAUSAL, HAS_MASK, PREC)
        store_split(ACC, M, L, acc_t, m_t, l_t, bh, split, n_main + 1, R * T, ROWS, D)


@triton.jit
def _store_slots(ACC, M, L, a0, a1, a2, a3, m_i, l_i, bh, split, n_splits, rows, ROWS: tl.constexpr,
                 D: tl.constexpr, PK: tl.constexpr):
    """store_split for slot accumulators: slot i holds channels [i*PK, (i+1)*PK)."""
    r = tl.arange(0, ROWS)
    j = tl.arange(0, PK)
    ok = r < rows
    base = (bh * n_splits + split) * rows
    out = ACC + (base + r)[:, None] * D + j[None, :]
    tl.store(out, a0, mask=ok[:, None])
    if D // PK > 1:
        tl.store(out + PK, a1, mask=ok[:, None])
    if D // PK > 2:
        tl.store(out + 2 * PK, a2, mask=ok[:, None])
    if D // PK > 3:
        tl.store(out + 3 * PK, a3, mask=ok[:, None])
    tl.store(M + base + r, m_i, mask=ok)
    tl.store(L + base + r, l_i, mask=ok)


@triton_op("kvpass::kivi_attention", mutates_args={})
def kivi_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                   k_window: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                   v_window: torch.Tensor, length: torch.Tensor, attn_mask: torch.Tensor | None,
                   bits: int, group_size: int, residual: int, length_hint: int, scale: float,
                   causal: bool) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over a KIVI cache (buffers as in :mod:`kvpass.methods.kivi`, contiguous,
    window dtype == q dtype) holding ``length`` (0-d int64 tensor) tokens; the T queries are the last T
    positions. ``attn_mask``: None or float32 (B, T, length) added to the scores. ``length_hint``: the
    length on the host (sizes the split plan; the kernel reads ``length``). Returns (B, Hq, T, D) q.dtype.
    """
    b, hq, t, d = q.shape
    h = k_window.shape[1]
    r = hq // h
    gpb = TUNING["groups_per_block"]
    nk = max(length_hint - residual, 0) // group_size * group_size
    block = gpb * group_size
    plan = plan_splits(b * h, nk // block * block, r * t, block, q.device)
    acc, m, l = workspace(plan.splits + 1, r * t, b * h, d, q.device)
    mask = attn_mask if attn_mask is not None else q.new_empty(1, dtype=torch.float32)
    wrap_triton(_kivi_split_kernel)[(plan.splits + 1, b * h)](
        q, nonempty(k_codes), nonempty(k_scale), nonempty(k_zero), nonempty(k_window), nonempty(v_codes),
        nonempty(v_scale), nonempty(v_zero), nonempty(v_window), length, mask, acc, m, l,
        q.stride(0), q.stride(1), q.stride(2), plan.splits, plan.chunk, scale * LOG2E,
        H=h, R=r, T=t, ROWS=plan.rows_pad, D=d, BITS=bits, G=group_size, RESIDUAL=residual,
        NK_CAP=k_codes.shape[2], NV_CAP=v_codes.shape[2], WK=max(k_window.shape[2], 1),
        WV=max(v_window.shape[2], 1), GPB=gpb, TAIL_N=32, CAUSAL=causal, HAS_MASK=attn_mask is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",   # fp32 caches: no tf32 rounding
        SLOTS=TUNING["slot_dots"] and bits >= 2 and d * bits // 8 >= 16,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"])
    out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    merge_splits(acc, m, l, out, plan.rows_pad, h, t, wrap_triton)
    return out


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call (else the caller uses the PyTorch reference)."""
    d = q.shape[-1]
    g = scheme.group_size
    return (scheme.bits in (1, 2, 4, 8) and sliding_window is None and softcap is None
            and d >= 16 and d & (d - 1) == 0 and 16 <= g <= d and g & (g - 1) == 0
            and d * scheme.bits // 8 >= 2
            and (attn_mask is None or attn_mask.dim() != 4 or attn_mask.shape[1] == 1))


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`KIVI.attend` through the kernel: q (B, Hq, T, D) -> (B, Hq, T, D) in q.dtype. ``length``: the
    cached length if the caller knows it on the host (saves a device sync; must equal the state's)."""
    length = state.length if length is None else length
    if not supports(scheme, q, attn_mask, None, None):
        raise ShapeError(f"the kivi kernel does not cover {scheme} with head_dim {q.shape[-1]} (it takes 1, 2, 4 or "
                         f"8 bits, power-of-two head_dim, power-of-two group_size in [16, head_dim], masks shared "
                         f"by all heads); use scheme.attend")
    if q.device != state["k_window"].device:
        raise ShapeError(f"kivi kernel: query on {q.device} but the cache on {state['k_window'].device}")
    if q.dtype != state["k_window"].dtype:
        raise ShapeError(f"kivi kernel: query dtype {q.dtype} differs from the cache's {state['k_window'].dtype}")
    b, _, t, d = q.shape
    return kivi_attention(q, state["k_codes"], state["k_scale"], state["k_zero"], state["k_window"],
                          state["v_codes"], state["v_scale"], state["v_zero"], state["v_window"],
                          state.length_tensor, additive_mask(attn_mask, b, t, length), scheme.bits,
                          scheme.group_size, scheme.residual, length,
                          d ** -0.5 if scale is None else float(scale), causal)
