"""Decode attention over caches of scaled 8-bit codes — int8 (one scale per token and head) and fp8 e4m3
(one scale per sequence and head) — and over the plain fp16/bf16/fp32 cache (no scale), registered as
``kvpass::scaled_attention``.

Split-K like every kvpass decode kernel (:mod:`.decode`): one program per (span of positions, batch x kv
head), the GQA group's query rows sharing each K/V tile. Codes are converted to the query dtype exactly
(|int8| <= 127 and every e4m3 value are representable in fp16/bf16) and fed to the tensor-core dots as
they are; the scales never touch the tile: q . (s_t * c_t) = s_t * (q . c_t) scales the score columns, and
sum_t p_t * s_t * c_t folds s_t into p. The fp16 cache is the unscaled case: its keys and values are
the "codes", read over the KV heads without the copies ``repeat_kv`` makes. Positions at or past the
fill length are masked, so the same plan serves a CUDA-graph capture (planned for the capacity). The
references are :meth:`Int8.attend`, :meth:`FP8.attend` and :meth:`FP16.attend` (the scheme's decode then
dense attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .decode import (LOG2E, call_length, dot_precision, flash_init, hide, kernel_mask, mask_argument, mask_kind,
                     merged_output, merged_output_lse, online_softmax_step, plan_splits, query_rows, store_split,
                     visible, workspace)
from .ring import RingPart, ring_arguments, ring_program

TUNING = {"block_n": 64, "num_warps": 2, "num_stages": 3, "programs_per_sm": 16}


@triton.jit
def _scaled_split_kernel(
        Q, KC, KS, VC, VS, LEN, MASK, ACC, M, L,
        KV_MAP, K_SINK, V_SINK, K_RING, V_RING, S_MAP, OUT, stride_ob, stride_oh, ring_rows, n_rings,
        stride_qb, stride_qh, stride_qt, n_splits, chunk, qk_scale, mask_w,
        H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
        CAP: tl.constexpr, BLOCK: tl.constexpr, SCALES: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr, PREC: tl.constexpr, MAPPED: tl.constexpr, HS: tl.constexpr,
        SINK: tl.constexpr, RECENT: tl.constexpr, RING_N: tl.constexpr):
    """Program (split, b * H + h): positions [split * chunk, +chunk) of cache head h. MAPPED (a duo layer's
    retrieval heads): cache head h is the model's kv head KV_MAP[h], whose query rows it reads. HS > 0 (its
    streaming heads): the grid's first ``ring_rows`` rows come before those, and their first n_rings = B * HS
    programs each attend one ring (:func:`.ring.ring_attend`, writing OUT). They come first so that they
    are scheduled first: a ring is a few dependent tile steps that would otherwise trail the split programs."""
    if HS > 0 and tl.program_id(1) < ring_rows:
        ring_program(Q, OUT, K_SINK, V_SINK, K_RING, V_RING, S_MAP, MASK, LEN, n_rings, qk_scale, mask_w, stride_qb,
                     stride_qh, stride_ob, stride_oh, HS, R, ROWS, D, SINK, RECENT, RING_N, HAS_MASK, PREC)
    else:
        _scaled_split(Q, KC, KS, VC, VS, LEN, MASK, ACC, M, L, KV_MAP, tl.program_id(0),
                      tl.program_id(1) - ring_rows if HS > 0 else tl.program_id(1), stride_qb, stride_qh, stride_qt,
                      n_splits, chunk, qk_scale, mask_w, H, R, T, ROWS, D, CAP, BLOCK, SCALES, CAUSAL, HAS_MASK,
                      PREC, MAPPED)


@triton.jit
def _scaled_split(Q, KC, KS, VC, VS, LEN, MASK, ACC, M, L, KV_MAP, split, bh,
                  stride_qb, stride_qh, stride_qt, n_splits, chunk, qk_scale, mask_w,
                  H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                  CAP: tl.constexpr, BLOCK: tl.constexpr, SCALES: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_MASK: tl.constexpr, PREC: tl.constexpr, MAPPED: tl.constexpr):
    """Split ``split`` of (batch x cache head) ``bh``: its flash state over positions [split * chunk, +chunk),
    written to the workspace."""
    length = tl.minimum(tl.load(LEN).to(tl.int32), CAP)
    b = bh // H
    head = bh % H
    if MAPPED:
        head = tl.load(KV_MAP + head)
    row_ok, tt, qpos, q_row, q = query_rows(Q, b, head, length, stride_qb, stride_qh, stride_qt, R, T, ROWS, D)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK)
    dt = q.dtype
    bh64 = bh.to(tl.int64)
    kc_base = KC + bh64 * CAP * D
    vc_base = VC + bh64 * CAP * D
    # SCALES: 2 one per token, 1 one per head, 0 none (fp16: KS and VS are never read)
    if SCALES == 2:
        ks_base = KS + bh64 * CAP
        vs_base = VS + bh64 * CAP
    elif SCALES == 1:
        k_head = tl.load(KS + bh64).to(tl.float32)
        v_head = tl.load(VS + bh64).to(tl.float32)
    m_i, l_i, acc = flash_init(ROWS, D)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    for start in range(lo, hi, BLOCK):
        pos = start + n
        valid = pos < hi
        kc = tl.load(kc_base + pos[:, None] * D + d[None, :], mask=valid[:, None], other=0.0).to(dt)
        s = tl.dot(q, tl.trans(kc), input_precision=PREC)
        if SCALES == 2:
            s = s * (tl.load(ks_base + pos, mask=valid, other=0.0).to(tl.float32) * qk_scale)[None, :]
        elif SCALES == 1:
            s = s * (k_head * qk_scale)
        else:
            s = s * qk_scale
        s = hide(s, visible(row_ok, valid, pos, qpos, CAUSAL), pos, b, tt, mask_w, MASK, T, HAS_MASK)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        vc = tl.load(vc_base + pos[:, None] * D + d[None, :], mask=valid[:, None], other=0.0).to(dt)
        if SCALES == 2:
            pv = p * tl.load(vs_base + pos, mask=valid, other=0.0).to(tl.float32)[None, :]
        elif SCALES == 1:
            pv = p * v_head
        else:
            pv = p
        acc = acc * alpha[:, None] + tl.dot(pv.to(dt), vc, input_precision=PREC)
    store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_splits, R * T, ROWS, D)


@triton_op("kvpass::scaled_attention", mutates_args={})
def scaled_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor | None,
                     v_codes: torch.Tensor, v_scale: torch.Tensor | None, length: torch.Tensor,
                     attn_mask: torch.Tensor | None, length_hint: int, scale: float, causal: bool) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over 8-bit codes (B, Hkv, C, D) (int8 or float8_e4m3fn) times their scales:
    (B, Hkv, C, 1) per token or (B, Hkv, 1, 1) per head, any float dtype — or over plain keys and values
    (B, Hkv, C, D) in a float dtype with both scales None; ``length`` (0-d int64) tokens held,
    the T queries being the last T. ``attn_mask``: None or float32 (B, T, W) added to the scores of positions
    < W. ``length_hint``: the length on the host (sizes the split plan), -1 when unknown (a CUDA-graph
    capture: the plan covers the capacity C). Returns (B, Hq, T, D) in q.dtype."""
    acc, m, l, rows_pad = _scaled_splits(q, k_codes, k_scale, v_codes, v_scale, length, attn_mask, length_hint,
                                         scale, causal)
    return merged_output(acc, m, l, q, rows_pad, k_codes.shape[1], wrap_triton)


@triton_op("kvpass::scaled_attention_lse", mutates_args={})
def scaled_attention_lse(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor | None,
                         v_codes: torch.Tensor, v_scale: torch.Tensor | None, length: torch.Tensor,
                         attn_mask: torch.Tensor | None, length_hint: int, scale: float, causal: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scaled_attention` as one part of a larger key set (a sequence-parallel rank's slice): returns
    (out (B, Hq, T, D) float32, lse (B, Hq, T) float32, natural log; -inf and zeros where no key is visible)."""
    acc, m, l, _ = _scaled_splits(q, k_codes, k_scale, v_codes, v_scale, length, attn_mask, length_hint, scale,
                                  causal)
    return merged_output_lse(acc, m, l, q.shape, k_codes.shape[1])


def _scaled_splits(q, k_codes, k_scale, v_codes, v_scale, length, attn_mask, length_hint, scale, causal,
                   ring: RingPart | None = None):
    """Launch the split programs; returns their workspace (acc, m, l) and the padded row count. ``ring``: a
    duo layer's streaming heads (their rings attended in the same launch, written to ``ring.out``) and the
    model kv head of each cache head (``ring.kv_map``), whose query rows a program reads."""
    b, hq, t, d = q.shape
    h, cap = k_codes.shape[1], k_codes.shape[2]
    r = hq // (h if ring is None else h + ring.s_map.shape[0])
    block = TUNING["block_n"]
    plan = plan_splits(b * h, cap if length_hint < 0 else length_hint, r * t, block, q.device,
                       TUNING["programs_per_sm"])
    splits = max(plan.splits, 1)
    acc, m, l = workspace(splits, r * t, b * h, d, q.device)
    mask, mask_w = mask_argument(attn_mask, q)
    scales = 0 if k_scale is None else 2 if k_scale.shape[2] == cap else 1
    ring_args, ring_consts = ring_arguments(ring, m, q)
    n_rings = 0 if ring is None else b * ring_consts["HS"]
    ring_rows = -(-n_rings // splits)
    wrap_triton(_scaled_split_kernel)[(splits, ring_rows + b * h)](
        q, k_codes, k_codes if k_scale is None else k_scale, v_codes, v_codes if v_scale is None else v_scale,
        length, mask, acc, m, l, *ring_args, ring_rows, n_rings,
        q.stride(0), q.stride(1), q.stride(2), splits, plan.chunk, scale * LOG2E, mask_w,
        H=h, R=r, T=t, ROWS=plan.rows_pad, D=d, CAP=cap, BLOCK=block, SCALES=scales,
        CAUSAL=causal, HAS_MASK=mask_kind(attn_mask), PREC=dot_precision(q), **ring_consts,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"])
    return acc, m, l, plan.rows_pad


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call (else the caller uses the PyTorch reference)."""
    d = q.shape[-1]
    return (sliding_window is None and softcap is None and d >= 16 and d & (d - 1) == 0
            and (attn_mask is None or attn_mask.dim() != 4 or attn_mask.shape[1] == 1))


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`Scheme.attend` of an int8, fp8 or fp16 cache through the kernel: q (B, Hq, T, D) ->
    (B, Hq, T, D) in q.dtype. ``length``: the cached length if known on the host; while a CUDA graph records
    it is never read."""
    return scaled_attention(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def attend_lse(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` returning the float32 pair (out, lse) of ``Scheme.attend(..., return_lse=True)``."""
    return scaled_attention_lse(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def cache_tensors(scheme, state) -> tuple:
    """(k, k_scale, v, v_scale) of an int8 / fp8 / fp16 state as ``kvpass::scaled_attention`` takes them
    (the scales None for fp16)."""
    if scheme.name == "fp16":
        return state["k"], None, state["v"], None
    return state["k_codes"], state["k_scale"], state["v_codes"], state["v_scale"]


def _op_arguments(scheme, state, q, scale, causal, attn_mask, length) -> tuple:
    """The arguments of ``kvpass::scaled_attention`` / ``scaled_attention_lse``."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "a power-of-two head_dim >= 16 and masks shared by all heads")
    b, _, t, d = q.shape
    k, k_scale, v, v_scale = cache_tensors(scheme, state)
    # an additive float mask, not a bool one: this loop streams K/V at the copy bandwidth, and one byte a
    # position is too narrow for the asynchronous copies that pipeline it — on the H200 at 8 x 32K the fp16
    # cache took 358 us with a bool mask, 267 us with a float one, 261 us with none (decode_attention.json)
    return (q, k, k_scale, v, v_scale, state.length_tensor,
            kernel_mask(attn_mask, b, t, length, additive=True), -1 if length is None else length,
            d ** -0.5 if scale is None else float(scale), causal)
