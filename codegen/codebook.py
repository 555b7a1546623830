"""Decode attention over the codebook caches — MILLION's product quantization and CQ's coupled codebooks,
one 8-bit code per group of c channels — registered as ``kvpass::codebook_attention``.

The cached positions split three ways (:meth:`ChannelGroupVQ.spans`): the first ``sink`` tokens exact,
codes for [s, n), the newest tokens exact in a ring. Programs 0..S-1 (split-K) each take a span of the
codes: for a tile of positions they load the code bytes and gather the centroids they name from the
layer's (or head's) codebook — c channels each, fp16, a 16-256 KB table that stays in L1/L2 — into a
(BLOCK, D) key and value tile in registers, then run the tensor-core dots; no fp16 copy of the cache is
written. A second launch, one program per (batch, kv head), takes the sink and the window. The splits
merge by log-sum-exp (:mod:`.decode`).

The reference (:meth:`ChannelGroupVQ.attend`) scores keys through a per-query table q_g . centroid_j; the kernels
gather the centroids instead, which gives the same scores (up to float32 summation order) and keeps the GQA group
on the tensor cores (a table would take R = 4 gathers per code at GQA 4, and 256 KB per program for MILLION-4).

Where it applies (head_dim 128, one new token, C = 2, 4 or 8: :func:`.codebook_gluon.applies`) the code splits run
the Gluon main loop of :mod:`.codebook_gluon` instead of this file's: the codebooks sit in shared memory, so a
gather costs a bank conflict at most instead of one cache line a lane. On the H200 (bench/results/
decode_attention.json ``codebook_gluon_run``, Llama-3-8B shapes) MILLION-4 went from 0.18-0.26x bf16 SDPA to
0.84-1.36x and CQ-1 from 0.37-0.44x to 0.98-2.12x. This file's loop stays for head_dim 64 and the other widths,
multi-token steps and the CPU interpreter; it is bound by those global gathers (32 lanes, 32 cache lines).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .decode import (LOG2E, call_length, dot_precision, flash_init, hide, kernel_mask, mask_argument, mask_kind,
                     merged_output, merged_output_lse, nonempty, online_softmax_step, plan_splits, query_tile,
                     store_split, visible, warp_plan, WarpPlan, workspace)

try:
    from . import codebook_gluon
except ImportError:           # a Triton without Gluon: the Triton main loop runs everywhere
    codebook_gluon = None

# gluon: the Gluon main loop (codebook_gluon: head_dim 128, single tokens, C = 2, 4 or 8) instead of the Triton one
# where it applies; warps a program (each its own split), programs an SM (the two codebooks take 128 KB of shared
# memory: one), the fewest code positions a warp takes (fewer programs for short caches: each fills 128 KB), and
# whether each tile's code loads are issued a step ahead.
TUNING = {"block_n": 16, "num_warps": 2, "num_stages": 2, "tail_n": 32, "programs_per_sm": 16,
          "gluon": {"on": True, "warps": 16, "programs_per_sm": 1, "min_warp_tokens": 64, "prefetch": False}}


@triton.jit
def _spans(LEN, SINK: tl.constexpr, RESIDUAL: tl.constexpr, NC: tl.constexpr):
    """(length, s, n) on the device: sink positions [0, s), codes [s, n), window [n, length)."""
    length = tl.minimum(tl.load(LEN).to(tl.int32), NC + SINK + RESIDUAL)
    s = tl.minimum(length, SINK)
    n = tl.maximum(length - RESIDUAL, s)
    return length, s, n


@triton.jit
def _codebook_main_kernel(
        Q, KC, KB, VC, VB, LEN, MASK, ACC, M, L,
        stride_qb, stride_qh, stride_qt, n_splits, chunk, qk_scale, mask_w,
        H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
        C: tl.constexpr, GP: tl.constexpr, NC: tl.constexpr, SINK: tl.constexpr, RESIDUAL: tl.constexpr,
        BOOK_PER_HEAD: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        PREC: tl.constexpr):
    """Split ``split`` of the code positions [s, n): ``chunk`` positions from s + split * chunk."""
    split = tl.program_id(0)
    length, s0, n_end = _spans(LEN, SINK, RESIDUAL, NC)
    bh, b, h, row_ok, tt, qpos, q_row, q = query_tile(Q, length, stride_qb, stride_qh, stride_qt, H, R, T, ROWS, D)
    d = tl.arange(0, D)
    dt = q.dtype
    bh64 = bh.to(tl.int64)
    kc_base = KC + bh64 * NC * GP
    vc_base = VC + bh64 * NC * GP
    book = (h if BOOK_PER_HEAD else 0) * (D // C) * 256 * C
    # channel d sits in group d // C, at d % C of its centroid
    centroid = (d // C) * 256 * C + d % C
    n = tl.arange(0, BLOCK)
    m_i, l_i, acc = flash_init(ROWS, D)
    lo = s0 + split * chunk
    hi = tl.minimum(lo + chunk, n_end)
    for start in range(lo, hi, BLOCK):
        pos = start + n
        valid = pos < hi
        code_at = (pos - SINK)[:, None] * GP + (d // C)[None, :]            # (BLOCK, D): each byte C times
        kcode = tl.load(kc_base + code_at, mask=valid[:, None], other=0).to(tl.int32)
        k = tl.load(KB + book + kcode * C + centroid[None, :]).to(dt)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = hide(s, visible(row_ok, valid, pos, qpos, CAUSAL), pos, b, tt, mask_w, MASK, T, HAS_MASK)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        vcode = tl.load(vc_base + code_at, mask=valid[:, None], other=0).to(tl.int32)
        v = tl.load(VB + book + vcode * C + centroid[None, :]).to(dt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC)
    store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_splits, R * T, ROWS, D)


@triton.jit
def _exact_span(q, acc, m_i, l_i, kx, vx, lo, hi, slot_mod, qpos, row_ok, b, tt, mask_w, MASK, qk_scale,
                D: tl.constexpr, N: tl.constexpr, T: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                PREC: tl.constexpr):
    """Flash steps over positions [lo, hi) of an exact buffer (kx, vx point at this head's (slots, D)), the
    slot of position p being p % slot_mod."""
    d = tl.arange(0, D)
    for start in range(lo, hi, N):
        pos = start + tl.arange(0, N)
        valid = pos < hi
        slot = (pos % slot_mod)[:, None] * D + d[None, :]
        k = tl.load(kx + slot, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
        s = hide(s, visible(row_ok, valid, pos, qpos, CAUSAL), pos, b, tt, mask_w, MASK, T, HAS_MASK)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(vx + slot, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PREC).to(tl.float32)
    return acc, m_i, l_i


@triton.jit
def _codebook_tail_kernel(
        Q, KS, VS, KW, VW, LEN, MASK, ACC, M, L,
        stride_qb, stride_qh, stride_qt, n_splits, qk_scale, mask_w,
        H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
        NC: tl.constexpr, SINK: tl.constexpr, RESIDUAL: tl.constexpr, SINK_CAP: tl.constexpr,
        WIN_CAP: tl.constexpr, N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """The sink [0, s) and the window [n, length), written as split n_splits - 1."""
    length, s0, n_end = _spans(LEN, SINK, RESIDUAL, NC)
    bh, b, h, row_ok, tt, qpos, q_row, q = query_tile(Q, length, stride_qb, stride_qh, stride_qt, H, R, T, ROWS, D)
    bh64 = bh.to(tl.int64)
    m_i, l_i, acc = flash_init(ROWS, D)
    acc, m_i, l_i = _exact_span(q, acc, m_i, l_i, KS + bh64 * SINK_CAP * D, VS + bh64 * SINK_CAP * D, 0, s0,
                                SINK_CAP, qpos, row_ok, b, tt, mask_w, MASK, qk_scale, D, N, T, CAUSAL, HAS_MASK,
                                PREC)
    acc, m_i, l_i = _exact_span(q, acc, m_i, l_i, KW + bh64 * WIN_CAP * D, VW + bh64 * WIN_CAP * D, n_end,
                                length, WIN_CAP, qpos, row_ok, b, tt, mask_w, MASK, qk_scale, D, N, T, CAUSAL,
                                HAS_MASK, PREC)
    store_split(ACC, M, L, acc, m_i, l_i, bh, n_splits - 1, n_splits, R * T, ROWS, D)


@triton_op("kvpass::codebook_attention", mutates_args={})
def codebook_attention(q: torch.Tensor, k_codes: torch.Tensor, k_codebook: torch.Tensor, k_sink: torch.Tensor,
                       k_window: torch.Tensor, v_codes: torch.Tensor, v_codebook: torch.Tensor,
                       v_sink: torch.Tensor, v_window: torch.Tensor, length: torch.Tensor,
                       attn_mask: torch.Tensor | None, sink: int, residual: int, length_hint: int, scale: float,
                       causal: bool) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over a codebook cache (buffers as in :mod:`kvpass.methods._vq`, 8-bit
    codes, codebooks (Hc, D / c, 256, c) fp16) holding ``length`` (0-d int64) tokens; the T queries are the
    last T positions. ``attn_mask``: None or float32 (B, T, W) added to the scores of positions < W.
    ``length_hint``: the length on the host (sizes the split plan), -1 when unknown (a CUDA-graph capture:
    the plan covers the capacity). Returns (B, Hq, T, D) in q.dtype."""
    acc, m, l, rows_pad = _codebook_splits(q, k_codes, k_codebook, k_sink, k_window, v_codes, v_codebook, v_sink,
                                           v_window, length, attn_mask, sink, residual, length_hint, scale, causal)
    return merged_output(acc, m, l, q, rows_pad, k_codes.shape[1], wrap_triton)


@triton_op("kvpass::codebook_attention_lse", mutates_args={})
def codebook_attention_lse(q: torch.Tensor, k_codes: torch.Tensor, k_codebook: torch.Tensor, k_sink: torch.Tensor,
                           k_window: torch.Tensor, v_codes: torch.Tensor, v_codebook: torch.Tensor,
                           v_sink: torch.Tensor, v_window: torch.Tensor, length: torch.Tensor,
                           attn_mask: torch.Tensor | None, sink: int, residual: int, length_hint: int, scale: float,
                           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`codebook_attention` as one part of a larger key set (a sequence-parallel rank's slice): returns
    (out (B, Hq, T, D) float32, lse (B, Hq, T) float32, natural log; -inf and zeros where no key is visible)."""
    acc, m, l, _ = _codebook_splits(q, k_codes, k_codebook, k_sink, k_window, v_codes, v_codebook, v_sink,
                                    v_window, length, attn_mask, sink, residual, length_hint, scale, causal)
    return merged_output_lse(acc, m, l, q.shape, k_codes.shape[1])


def _codebook_splits(q, k_codes, k_codebook, k_sink, k_window, v_codes, v_codebook, v_sink, v_window, length,
                     attn_mask, sink, residual, length_hint, scale, causal):
    """Launch the code splits and the sink + window program; returns the workspace (acc, m, l) and the
    padded row count."""
    b, hq, t, d = q.shape
    h, nc, gp = k_codes.shape[1], k_codes.shape[2], k_codes.shape[3]
    c = k_codebook.shape[-1]
    r = hq // h
    block = TUNING["block_n"]
    coded = nc if length_hint < 0 else max(min(length_hint - residual, nc + sink) - min(length_hint, sink), 0)
    gluon = TUNING["gluon"]
    use_gluon = (gluon["on"] and codebook_gluon is not None and coded > 0
                 and codebook_gluon.applies(q, k_codes, k_codebook, v_codebook, r))
    if use_gluon:
        plan = gluon_plan(b * h, coded, r * t, q.device)
        splits = plan.programs * gluon["warps"] + 1
    else:
        plan = plan_splits(b * h, coded, r * t, block, q.device, TUNING["programs_per_sm"])
        splits = plan.splits + 1                   # the last one: sink and window
    acc, m, l = workspace(splits, r * t, b * h, d, q.device)
    mask, mask_w = mask_argument(attn_mask, q)
    common = dict(H=h, R=r, T=t, ROWS=plan.rows_pad, D=d, NC=nc, SINK=sink, RESIDUAL=residual, CAUSAL=causal,
                  HAS_MASK=mask_kind(attn_mask), PREC=dot_precision(q),
                  num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"])
    if use_gluon:
        torch.ops.kvpass.codebook_gluon_main(q, k_codes, k_codebook, v_codes, v_codebook, length, acc, m, l,
                                             attn_mask, r, plan.programs, plan.chunk, sink, residual, scale * LOG2E,
                                             gluon["warps"], gluon["prefetch"])
    elif plan.splits:
        wrap_triton(_codebook_main_kernel)[(plan.splits, b * h)](
            q, nonempty(k_codes), k_codebook, nonempty(v_codes), v_codebook, length, mask, acc, m, l,
            q.stride(0), q.stride(1), q.stride(2), splits, plan.chunk, scale * LOG2E, mask_w,
            C=c, GP=gp, BOOK_PER_HEAD=k_codebook.shape[0] > 1, BLOCK=block, **common)
    wrap_triton(_codebook_tail_kernel)[(1, b * h)](
        q, nonempty(k_sink), nonempty(v_sink), nonempty(k_window), nonempty(v_window), length, mask, acc, m, l,
        q.stride(0), q.stride(1), q.stride(2), splits, scale * LOG2E, mask_w,
        SINK_CAP=max(k_sink.shape[2], 1), WIN_CAP=max(k_window.shape[2], 1), N=TUNING["tail_n"], **common)
    return acc, m, l, plan.rows_pad


def gluon_plan(batch_heads: int, coded: int, rows: int, device: torch.device) -> WarpPlan:
    """The Gluon main launch for ``coded`` code positions of each of ``batch_heads`` caches
    (:func:`.decode.warp_plan` with TUNING["gluon"]'s warps, programs an SM and fewest positions a warp)."""
    tune = TUNING["gluon"]
    return warp_plan(batch_heads, coded, rows, device, tune["warps"], tune["programs_per_sm"],
                     tune["min_warp_tokens"])


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call: post-RoPE keys, 8-bit codes over a power-of-two number of
    channels, a power-of-two head_dim, masks shared by all heads, no sliding window or soft-capping."""
    d, c = q.shape[-1], scheme.vq_channels
    return (scheme.key_space == "post_rope" and scheme.vq_bits == 8 and c & (c - 1) == 0 and d % c == 0
            and d >= 16 and d & (d - 1) == 0 and sliding_window is None and softcap is None
            and (attn_mask is None or attn_mask.dim() != 4 or attn_mask.shape[1] == 1))


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`ChannelGroupVQ.attend` through the kernel: q (B, Hq, T, D) -> (B, Hq, T, D) in q.dtype.
    ``length``: the cached length if known on the host; while a CUDA graph records it is never read."""
    return codebook_attention(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def attend_lse(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` returning the float32 pair (out, lse) of ``Scheme.attend(..., return_lse=True)``."""
    return codebook_attention_lse(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def _op_arguments(scheme, state, q, scale, causal, attn_mask, length) -> tuple:
    """The arguments of ``kvpass::codebook_attention`` / ``codebook_attention_lse``."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "post-RoPE keys, 8-bit codes over a power-of-two number of channels, a power-of-two "
                         "head_dim and masks shared by all heads")
    b, _, t, d = q.shape
    return (q, state["k_codes"], state["k_codebook"], state["k_sink"], state["k_window"], state["v_codes"],
            state["v_codebook"], state["v_sink"], state["v_window"], state.length_tensor,
            kernel_mask(attn_mask, b, t, length), scheme.sink, scheme.residual, -1 if length is None else length,
            d ** -0.5 if scale is None else float(scale), causal)
