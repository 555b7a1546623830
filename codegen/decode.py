"""What every split-K (flash-decoding) attention kernel of kvpass shares: the split plan, the query-row
layout, the mask argument and the log-sum-exp merge kernel.

A decode-attention kernel runs one program per (split, batch x kv head). A program owns the R = Hq / Hkv
query heads of its kv head times the T new query tokens as the rows of one tile (row i = head r * T + t,
padded to ``rows_pad`` >= 16 for tensor-core dots), so each K/V tile it reads is shared by its GQA group.
It writes, per row, the running max ``m``, the softmax denominator ``l`` and the unnormalized output
``acc`` of its span of positions (scores in base 2: exp2 is one instruction);
:func:`merge_splits` combines the splits exactly (the same algebra as
:func:`kvpass.attention.merge_partials`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvpass.errors import ShapeError


@dataclass(frozen=True)
class SplitPlan:
    """How a decode-attention launch cuts the cached positions: ``splits`` spans of ``chunk`` positions
    (a multiple of ``block_n``) per (batch, kv head); ``rows`` real query rows padded to ``rows_pad``."""

    splits: int
    chunk: int
    block_n: int
    rows: int
    rows_pad: int


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 on the CPU, where the interpreter runs the kernels)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


class WarpPlan(NamedTuple):
    """A Gluon main launch whose warps each run their own split: ``programs`` per (batch, kv head), each warp
    taking ``chunk`` code positions (a multiple of 32); rows_pad as :class:`SplitPlan`'s (the other launches')."""
    programs: int
    chunk: int
    rows_pad: int


def warp_plan(batch_heads: int, coded: int, rows: int, device: torch.device, warps: int, programs_per_sm: int,
              min_warp_tokens: int) -> WarpPlan:
    """Programs of ``warps`` warps for ``coded`` code positions of each of ``batch_heads`` caches: one wave of the
    SMs (programs_per_sm each), fewer where a warp would take under min_warp_tokens positions."""
    programs = max(1, min(sm_count(device) * programs_per_sm // batch_heads,
                          math.ceil(coded / (warps * min_warp_tokens))))
    chunk = math.ceil(coded / (programs * warps) / 32) * 32
    return WarpPlan(programs, chunk, max(16, triton.next_power_of_2(rows)))


def plan_splits(batch_heads: int, length: int, rows: int, block_n: int, device: torch.device,
                programs_per_sm: int = 4) -> SplitPlan:
    """Enough splits to give every SM ``programs_per_sm`` programs, no more than one block of positions per
    split.

    batch_heads: B * Hkv programs per split; length: positions to cover (0 gives no split); rows: R * T.
    """
    rows_pad = max(16, triton.next_power_of_2(rows))
    if length <= 0:
        return SplitPlan(0, block_n, block_n, rows, rows_pad)
    want = max(1, math.ceil(programs_per_sm * sm_count(device) / batch_heads))
    blocks = math.ceil(length / block_n)
    per_split = math.ceil(blocks / min(want, blocks))
    chunk = per_split * block_n
    return SplitPlan(math.ceil(length / chunk), chunk, block_n, rows, rows_pad)


def kernel_mask(attn_mask: torch.Tensor | None, batch: int, queries: int,
                length: int | None, additive: bool = False) -> torch.Tensor | None:
    """The kernels' mask, (B, T, L) contiguous, from a mask broadcastable to (B, 1, T, W) cut to the first
    L = ``length`` positions (None: kept whole, W wide): bool (True = attend) stays bool — the kernels turn
    it into 0 / -inf as they load it, so no float copy is built per layer — anything else becomes float32
    added to the scores. ``additive``: bool masks become float32 0 / -inf too (kernels bound by bandwidth:
    see kvpass.codegen.scaled). Raises ShapeError for per-head masks (callers fall back)."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise ShapeError(f"decode kernels take masks shared by all heads, got {tuple(m.shape)}")
        m = m[:, 0]
    if length is not None:
        m = m[..., :length]
    if m.dtype == torch.bool and additive:
        m = torch.where(m, 0.0, float("-inf"))
    elif m.dtype != torch.bool:
        m = m.float()
    return m.expand(batch, queries, m.shape[-1]).contiguous()


def mask_kind(attn_mask: torch.Tensor | None) -> int:
    """The kernels' HAS_MASK constexpr for a :func:`kernel_mask`: 0 none, 1 additive float32, 2 bool."""
    return 0 if attn_mask is None else 2 if attn_mask.dtype == torch.bool else 1


def nonempty(x: torch.Tensor) -> torch.Tensor:
    """A zero-size buffer (a capacity inside the window) is never read, but the launcher wants a real
    pointer: give it a one-element stand-in."""
    return x if x.numel() else x.new_zeros(1)


def workspace(splits: int, rows: int, batch_heads: int, head_dim: int, device: torch.device):
    """(acc (BH, S, rows, D), m (BH, S, rows), l (BH, S, rows)) float32 buffers for one launch."""
    acc = torch.empty(batch_heads, splits, rows, head_dim, dtype=torch.float32, device=device)
    ml = torch.empty(2, batch_heads, splits, rows, dtype=torch.float32, device=device)
    return acc, ml[0], ml[1]


LOG2E = 1.4426950408889634   # kernels keep scores in base 2 (exp2 is the hardware's instruction)


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One flash step on base-2 scores s (M, N) float32 (already multiplied by scale * log2 e), -inf where
    hidden; returns (p, alpha, m, l): the accumulator must be rescaled by alpha before adding p @ v.
    Rows with nothing visible yet keep m = -inf."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_splits, rows, ROWS: tl.constexpr, D: tl.constexpr):
    """Write one program's (acc, m, l) for its real rows into the workspace."""
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    ok = r < rows
    base = (bh * n_splits + split) * rows
    tl.store(ACC + (base + r)[:, None] * D + d[None, :], acc, mask=ok[:, None])
    tl.store(M + base + r, m_i, mask=ok)
    tl.store(L + base + r, l_i, mask=ok)


@triton.jit
def _merge_kernel(ACC, M, L, OUT, KV_MAP, n_splits, rows, T, R, H, stride_ob, stride_oh, stride_ot,
                  D: tl.constexpr, DC: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                  MAPPED: tl.constexpr):
    """One program per (batch x kv head, query row, DC channels): the row's splits weighted by
    exp2(m - max m) and summed BLOCK_S splits at a time (independent loads, not one serial chain over
    hundreds of splits). MAPPED: the workspace's kv head h is the model's kv head KV_MAP[h] (a head group of
    a duo layer)."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    b = bh // H
    h = bh % H
    if MAPPED:
        h = tl.load(KV_MAP + h)
    s = tl.arange(0, SPLITS)
    d = tl.program_id(2) * DC + tl.arange(0, DC)
    row = bh * n_splits * rows + r            # workspace index of split 0's entry for this row
    m = tl.load(M + row + s * rows, mask=s < n_splits, other=float("-inf"))      # (SPLITS,), base 2
    l = tl.load(L + row + s * rows, mask=s < n_splits, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    denom = tl.sum(tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe)) * l, 0)
    acc = tl.zeros((DC,), dtype=tl.float32)
    sb = tl.arange(0, BLOCK_S)
    for first in range(0, n_splits, BLOCK_S):
        i = first + sb
        ok = i < n_splits
        mi = tl.load(M + row + i * rows, mask=ok, other=float("-inf"))
        wi = tl.where(mi == float("-inf"), 0.0, tl.exp2(mi - m_safe))
        part = tl.load(ACC + (row + i * rows)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(wi[:, None] * part, 0)
    out = acc / tl.where(denom == 0.0, 1.0, denom)          # a fully masked row: 0
    ptr = OUT + b * stride_ob + (h * R + r // T) * stride_oh + (r % T) * stride_ot + d
    tl.store(ptr, out.to(OUT.dtype.element_ty))


MERGE_PROGRAMS = 512    # the merge splits the head dimension until it has about this many programs


def merge_splits(acc, m, l, out: torch.Tensor, rows_pad: int, kv_heads: int, queries: int, launch,
                 kv_map: torch.Tensor | None = None) -> None:
    """Combine the splits of the workspace (acc, m, l) into ``out`` (B, Hq, T, D) (any float dtype).
    ``launch`` wraps a Triton kernel for the current context (``torch.library.wrap_triton`` inside a
    triton_op). ``rows_pad`` is the split kernels' padded row count (unused here: one program per real row).
    ``kv_map``: None, or int32 (kv_heads,) — workspace head h goes to the model's kv head kv_map[h] of out.

    At batch 1 a (batch x kv head, row) grid is a few dozen programs, each summing hundreds of splits one
    after another (measured on the H200: 21 us at 1 x 32K, 35 us at 1 x 128K, Llama-3-8B shapes), so the
    head dimension is cut into slices of at least 16 channels until the grid nears MERGE_PROGRAMS."""
    bh, splits, rows, d = acc.shape
    dc = d
    while dc > 16 and bh * rows * (d // dc) < MERGE_PROGRAMS:
        dc //= 2
    split_pow = max(2, triton.next_power_of_2(splits))
    launch(_merge_kernel)[(bh, rows, d // dc)](
        acc, m, l, out, m if kv_map is None else kv_map, splits, rows, queries, rows // queries, kv_heads,
        out.stride(0), out.stride(1), out.stride(2),
        D=d, DC=dc, SPLITS=split_pow, BLOCK_S=min(split_pow, 2048 // dc), MAPPED=kv_map is not None)


@triton.jit
def query_tile(Q, length, stride_qb, stride_qh, stride_qt, H: tl.constexpr, R: tl.constexpr, T: tl.constexpr,
               ROWS: tl.constexpr, D: tl.constexpr):
    """This program's (batch x kv head) — ``program_id(1)`` — and its query rows (row i = query head
    h * R + i // T, new token i % T): returns (bh, b, h, row_ok, tt, qpos, q_row, q), q (ROWS, D) in Q's
    dtype (padded rows zero), qpos the rows' positions when the cache holds ``length`` tokens."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row_ok, tt, qpos, q_row, q = query_rows(Q, b, h, length, stride_qb, stride_qh, stride_qt, R, T, ROWS, D)
    return bh, b, h, row_ok, tt, qpos, q_row, q


@triton.jit
def query_rows(Q, b, head, length, stride_qb, stride_qh, stride_qt, R: tl.constexpr, T: tl.constexpr,
               ROWS: tl.constexpr, D: tl.constexpr):
    """The query rows of batch b's kv head ``head`` (row i = query head head * R + i // T, token i % T):
    (row_ok, tt, qpos, q_row, q) as in :func:`query_tile`."""
    rows = tl.arange(0, ROWS)
    row_ok = rows < R * T
    rr = rows // T
    tt = rows % T
    qpos = length - T + tt
    d = tl.arange(0, D)
    q_row = Q + b * stride_qb + (head * R + rr) * stride_qh + tt * stride_qt
    q = tl.load(q_row[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    return row_ok, tt, qpos, q_row, q


@triton.jit
def flash_init(ROWS: tl.constexpr, D: tl.constexpr):
    """A program's empty flash state: (m, l, acc) = (-inf, 0, 0) for ROWS rows of D channels, float32."""
    return (tl.full((ROWS,), float("-inf"), tl.float32), tl.zeros((ROWS,), tl.float32),
            tl.zeros((ROWS, D), tl.float32))


@triton.jit
def restore_outliers(x, ch, OUT, IDX, rows, valid, O: tl.constexpr):
    """Put the exact outliers back into dequantized (N, D) rows: row r's j-th outlier (value OUT[r * O + j],
    channel IDX[r * O + j]) replaces column c where ch[c] is that channel."""
    for j in tl.static_range(O):
        at = tl.load(IDX + rows * O + j, mask=valid, other=0).to(tl.int32)
        val = tl.load(OUT + rows * O + j, mask=valid, other=0.0).to(tl.float32)
        x = tl.where(ch[None, :] == at[:, None], val[:, None], x)
    return x


@triton.jit
def visible(row_ok, valid, pos, qpos, CAUSAL: tl.constexpr):
    """(ROWS, N) which positions each real row may see: valid ones, not after the row's own (causal)."""
    keep = row_ok[:, None] & valid[None, :]
    if CAUSAL:
        keep = keep & (pos[None, :] <= qpos[:, None])
    return keep


@triton.jit
def hide(s, keep, pos, b, tt, mask_w, MASK, T: tl.constexpr, HAS_MASK: tl.constexpr):
    """Base-2 scores s (ROWS, N) plus the mask (B, T, mask_w) where given (HAS_MASK: :func:`mask_kind`;
    positions past its width unmasked), -inf where ``keep`` is false."""
    if HAS_MASK:
        s += mask_block(MASK, b, tt, pos, mask_w, keep, T, HAS_MASK)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def mask_block(MASK, b, tt, pos, mask_w, keep, T: tl.constexpr, KIND: tl.constexpr):
    """The mask (B, T, mask_w) at positions ``pos`` for each row as base-2 score offsets: KIND 1 additive
    float32 (times log2 e), KIND 2 bool (0 where True, -inf where False); 0 past its width, and 0 where
    ``keep`` is false except with one new token (callers hide those scores or drop those rows). With one new
    token every row reads the same mask row, so it is loaded once as a (1, N) vector: a (ROWS, N) load
    repeats it for each of the 16 padded rows, and that took 20% of a KIVI-2 call on the H200."""
    # (static if/else, no early return: Triton compiles the code after a return too, and the shapes differ)
    if T == 1:
        offs = b * mask_w + pos[None, :]
        inside = (pos < mask_w)[None, :]
    else:
        offs = (b * T + tt)[:, None] * mask_w + pos[None, :]
        inside = keep & (pos < mask_w)[None, :]
    if KIND == 2:
        add = tl.where(tl.load(MASK + offs, mask=inside, other=1) != 0, 0.0, float("-inf"))
    else:
        add = tl.load(MASK + offs, mask=inside, other=0.0) * 1.4426950408889634
    return add


def mask_argument(attn_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer tensor, row width) to pass a kernel for a :func:`kernel_mask` or None (width 0, never read)."""
    if attn_mask is None:
        return q.new_empty(1, dtype=torch.float32), 0
    return attn_mask, attn_mask.shape[-1]


def dot_precision(q: torch.Tensor) -> str:
    """The kernels' tl.dot precision: float32 caches get IEEE (no tf32 rounding)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def merged_output(acc, m, l, q: torch.Tensor, rows_pad: int, kv_heads: int, launch) -> torch.Tensor:
    """The workspace's splits merged into a new (B, Hq, T, D) tensor in q's dtype."""
    out = torch.empty_like(q)
    merge_splits(acc, m, l, out, rows_pad, kv_heads, q.shape[2], launch)
    return out


def merged_output_lse(acc, m, l, q_shape, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The workspace's splits merged in PyTorch into (out (B, Hq, T, D) float32, lse (B, Hq, T) float32,
    natural log): the attention over the launch's positions as one part of a larger key set
    (:func:`kvpass.attention.merge_partials`). Rows with no visible position get out 0, lse -inf. The
    workspace is (B*Hkv, S, R*T[, D]) — row r * T + t is query head h * R + r, token t."""
    b, hq, t, d = q_shape
    m_max = m.amax(1, keepdim=True)
    m_safe = torch.where(torch.isneginf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.where(torch.isneginf(m), torch.zeros_like(m), torch.exp2(m - m_safe))       # (BH, S, rows)
    denom = (w * l).sum(1)                                                                  # (BH, rows)
    out = (w.unsqueeze(-1) * acc).sum(1) / torch.where(denom == 0, torch.ones_like(denom), denom).unsqueeze(-1)
    lse = (m_safe.squeeze(1) + torch.log2(denom)) / LOG2E            # log2 -> ln; log2(0) = -inf for empty rows
    return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)


def call_length(scheme, state, q: torch.Tensor, attn_mask, length: int | None, supported: bool,
                requirement: str) -> int | None:
    """Check an ``attend`` call of a kernel module and return the cached length to plan with: the caller's
    host value, else the state's — or None while a CUDA graph records (never read on the host then).
    ``supported``: the module's ``supports`` verdict; ``requirement``: what the kernel takes, for the
    error."""
    from kvpass.graphs import capturing
    if not supported:
        raise ShapeError(f"the {scheme.name} kernel takes {requirement}; {scheme} with head_dim {q.shape[-1]} "
                         f"is not covered; use scheme.attend")
    if q.device != state.device:
        raise ShapeError(f"{scheme.name} kernel: query on {q.device} but the cache on {state.device}")
    if q.dtype != state.shape.dtype:
        raise ShapeError(f"{scheme.name} kernel: query dtype {q.dtype} differs from the cache's {state.shape.dtype}")
    if capturing(q):
        return None
    return state.length if length is None else length
