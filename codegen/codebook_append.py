"""Append for the codebook caches (MILLION, CQ with 8-bit codes) as one Triton launch, registered as
``kvpass::codebook_append``: a decode step's few tokens (T <= 16), with the nearest-centroid search in the
kernel.

One program per (batch, kv head) takes the new tokens in order, as :meth:`ChannelGroupVQ._append` does:
token p goes to the sink if p < sink; else, with a window of W = residual slots, the token it pushes out
(position p - residual, same ring slot) is encoded into its code row if it is past the sink, then the new
token takes the slot; with no window it is encoded directly. Encoding scores every centroid of every channel
group — |c|^2 - 2 x.c, the reference's expression — 32 centroids at a time, and keeps the first minimum.
The position comes from the length tensor on the device, so a captured decode step needs no host value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .decode import nonempty

MAX_TOKENS = 16       # larger appends (prefills) take the PyTorch path
CENTROIDS_PER_STEP = 32
# parallel: encode in a launch of programs over (channel groups of `channels` channels, batch x kv head), every
# centroid at once, instead of one program a head scanning 32 centroids a step (a chain of 16 dependent loads
# per token: 35-39 us a decode step on the H200 at batch 8, decode_attention.json)
TUNING = {"parallel": True, "channels": 32, "num_warps": 4}


@triton.jit
def _encode(x, book, D: tl.constexpr, C: tl.constexpr, K: tl.constexpr):
    """Nearest-centroid codes (D // C,) int32 of one head vector x (D,) float32 (in group-major (G, C)
    order) against ``book`` (this head's (G, K, C) fp16 codebook)."""
    G: tl.constexpr = D // C
    J: tl.constexpr = 32
    g = tl.arange(0, G)
    c = tl.arange(0, C)
    xg = tl.reshape(x, (G, C))
    best = tl.full((G,), float("inf"), tl.float32)
    code = tl.zeros((G,), tl.int32)
    for j0 in tl.static_range(0, K, J):
        j = j0 + tl.arange(0, J)
        cent = tl.load(book + (g[:, None, None] * K + j[None, :, None]) * C + c[None, None, :]).to(tl.float32)
        score = tl.sum(cent * cent, 2) - 2 * tl.sum(cent * xg[:, None, :], 2)                # (G, J)
        low = tl.min(score, 1)
        at = tl.argmin(score, 1).to(tl.int32) + j0
        better = low < best
        code = tl.where(better, at, code)
        best = tl.where(better, low, best)
    return code


@triton.jit
def _encode_groups(x, book, g, C: tl.constexpr):
    """Nearest-centroid codes (GB,) int32 of the vector slice x (GB, C) float32 of channel groups g (GB,) against
    ``book`` (this head's (G, 256, C) fp16 codebook), all 256 centroids at once: |c|^2 - 2 x.c, first minimum."""
    j = tl.arange(0, 256)
    c = tl.arange(0, C)
    cent = tl.load(book + (g[:, None, None] * 256 + j[None, :, None]) * C + c[None, None, :]).to(tl.float32)
    score = tl.sum(cent * cent, 2) - 2 * tl.sum(cent * x[:, None, :], 2)                 # (GB, 256)
    return tl.argmin(score, 1).to(tl.int32)


@triton.jit
def _codebook_encode_kernel(K, V, LEN, KC, VC, KW, VW, KB, VB,
                            T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, CAP: tl.constexpr,
                            NC: tl.constexpr, SINK: tl.constexpr, RESIDUAL: tl.constexpr, WIN: tl.constexpr,
                            BOOK_PER_HEAD: tl.constexpr, GB: tl.constexpr):
    """The codes a step's T <= WIN new tokens produce, program (groups [GB * program_id(0), + GB), (batch, kv head)
    program_id(1)): each token past the sink pushes out the window token T slots behind it (its slot is not
    rewritten by this step's earlier tokens since T <= WIN), which is encoded into its code row; with no window
    the new token itself is. The window and sink writes follow in :func:`_codebook_append_kernel` (ENCODE
    False), launched after this."""
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    G: tl.constexpr = D // C
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    ch = g[:, None] * C + tl.arange(0, C)[None, :]                                     # (GB, C)
    book_at = (h if BOOK_PER_HEAD else 0) * G * 256 * C
    start = tl.load(LEN).to(tl.int32)
    if start + T <= CAP:
        for i in tl.static_range(T):
            p = start + i
            if RESIDUAL == 0:
                if p >= SINK:
                    kx = tl.load(K + (bh * T + i) * D + ch).to(tl.float32)
                    vx = tl.load(V + (bh * T + i) * D + ch).to(tl.float32)
                    tl.store(KC + (bh * NC + p - SINK) * G + g, _encode_groups(kx, KB + book_at, g, C))
                    tl.store(VC + (bh * NC + p - SINK) * G + g, _encode_groups(vx, VB + book_at, g, C))
            else:
                leaving = p - RESIDUAL
                if leaving >= SINK:
                    slot = p % WIN
                    kx = tl.load(KW + (bh * WIN + slot) * D + ch).to(tl.float32)
                    vx = tl.load(VW + (bh * WIN + slot) * D + ch).to(tl.float32)
                    tl.store(KC + (bh * NC + leaving - SINK) * G + g, _encode_groups(kx, KB + book_at, g, C))
                    tl.store(VC + (bh * NC + leaving - SINK) * G + g, _encode_groups(vx, VB + book_at, g, C))


@triton.jit
def _codebook_append_kernel(K, V, LEN, KC, VC, KS, VS, KW, VW, KB, VB,
                            T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                            CAP: tl.constexpr, NC: tl.constexpr, SINK: tl.constexpr, SINK_CAP: tl.constexpr,
                            RESIDUAL: tl.constexpr, WIN: tl.constexpr, BOOK_PER_HEAD: tl.constexpr,
                            ENCODE: tl.constexpr):
    """The new tokens in order, one program per (batch, kv head); ENCODE False: only the sink and window
    stores (the codes were written by :func:`_codebook_encode_kernel`)."""
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    G: tl.constexpr = D // C
    KCENT: tl.constexpr = 256
    start = tl.load(LEN).to(tl.int32)
    d = tl.arange(0, D)
    g = tl.arange(0, G)
    book_at = (h if BOOK_PER_HEAD else 0) * G * KCENT * C
    if start + T <= CAP:                           # past the capacity (a captured step flags it): no writes
        for i in tl.static_range(T):
            p = start + i
            kx = tl.load(K + (bh * T + i) * D + d)
            vx = tl.load(V + (bh * T + i) * D + d)
            if p < SINK:
                tl.store(KS + (bh * SINK_CAP + p) * D + d, kx)
                tl.store(VS + (bh * SINK_CAP + p) * D + d, vx)
            elif RESIDUAL == 0:
                if ENCODE:
                    kcode = _encode(kx.to(tl.float32), KB + book_at, D, C, KCENT)
                    tl.store(KC + (bh * NC + p - SINK) * G + g, kcode)
                    tl.store(VC + (bh * NC + p - SINK) * G + g, _encode(vx.to(tl.float32), VB + book_at, D, C, KCENT))
            else:
                slot = p % WIN
                leaving = p - RESIDUAL
                if ENCODE and leaving >= SINK:
                    old_k = tl.load(KW + (bh * WIN + slot) * D + d).to(tl.float32)
                    old_v = tl.load(VW + (bh * WIN + slot) * D + d).to(tl.float32)
                    tl.store(KC + (bh * NC + leaving - SINK) * G + g, _encode(old_k, KB + book_at, D, C, KCENT))
                    tl.store(VC + (bh * NC + leaving - SINK) * G + g, _encode(old_v, VB + book_at, D, C, KCENT))
                tl.debug_barrier()                 # the slot is read above before it is overwritten here
                tl.store(KW + (bh * WIN + slot) * D + d, kx)
                tl.store(VW + (bh * WIN + slot) * D + d, vx)
            tl.debug_barrier()


@triton_op("kvpass::codebook_append", mutates_args={"k_codes", "v_codes", "k_sink", "v_sink", "k_window",
                                                     "v_window"})
def codebook_append(k: torch.Tensor, v: torch.Tensor, length: torch.Tensor, k_codes: torch.Tensor,
                    v_codes: torch.Tensor, k_sink: torch.Tensor, v_sink: torch.Tensor, k_window: torch.Tensor,
                    v_window: torch.Tensor, k_codebook: torch.Tensor, v_codebook: torch.Tensor, sink: int,
                    residual: int, capacity: int) -> None:
    """Append k, v (B, H, T, D) contiguous, T <= 16, to a codebook cache of ``capacity`` tokens (buffers as in
    :mod:`kvpass.methods._vq`, 8-bit codes, codebooks (Hc, D / c, 256, c)) holding ``length`` (0-d int64,
    not updated here) tokens."""
    b, h, t, d = k.shape
    c = k_codebook.shape[-1]
    win = max(k_window.shape[2], 1)
    common = dict(T=t, H=h, D=d, C=c, CAP=capacity, NC=k_codes.shape[2], SINK=sink, RESIDUAL=residual, WIN=win,
                  BOOK_PER_HEAD=k_codebook.shape[0] > 1)
    # the codes in parallel over channel groups when no new token pushes out another (T <= window), then the
    # sink / window stores; else one program a head does it all in order
    parallel = TUNING["parallel"] and (residual == 0 or t <= win)
    if parallel:
        gb = max(1, min(TUNING["channels"], d) // c)
        wrap_triton(_codebook_encode_kernel)[(d // c // gb, b * h)](
            k, v, length, nonempty(k_codes), nonempty(v_codes), nonempty(k_window), nonempty(v_window),
            k_codebook, v_codebook, GB=gb, num_warps=TUNING["num_warps"], **common)
    wrap_triton(_codebook_append_kernel)[(1, b * h)](
        k, v, length, nonempty(k_codes), nonempty(v_codes), nonempty(k_sink), nonempty(v_sink),
        nonempty(k_window), nonempty(v_window), k_codebook, v_codebook, SINK_CAP=max(k_sink.shape[2], 1),
        ENCODE=not parallel, num_warps=4, **common)


def supports(scheme, k: torch.Tensor) -> bool:
    """Whether :func:`append` covers this scheme and input: 8-bit codes over a power-of-two number of
    channels, a power-of-two head_dim, at most 16 new tokens."""
    d, c = k.shape[-1], scheme.vq_channels
    return (scheme.vq_bits == 8 and c & (c - 1) == 0 and d % c == 0 and d & (d - 1) == 0 and d // c >= 2
            and k.shape[2] <= MAX_TOKENS)


def append(scheme, state, k: torch.Tensor, v: torch.Tensor) -> None:
    """:meth:`ChannelGroupVQ._append` through the kernel (k, v validated by :meth:`Scheme.append`)."""
    codebook_append(k.contiguous(), v.contiguous(), state.length_tensor, state["k_codes"], state["v_codes"],
                    state["k_sink"], state["v_sink"], state["k_window"], state["v_window"], state["k_codebook"],
                    state["v_codebook"], scheme.sink, scheme.residual, state.shape.capacity)
