"""One launch for the checks a CUDA-graph decode step makes on the device (:mod:`kvpass.graphs`).

Eager mode checks new keys and values for NaN/inf, the cache's room and the model's position on the host.
While a graph records, those checks become flags in the device status tensor. Written with torch ops they
cost about a dozen tiny kernels a layer (isfinite, all, and, not, casts, adds, compares, or): some 0.9 ms of
a 14.7 ms Llama-3-8B step at 8 x 32K on the H200 (bench/results/e2e_decode.json, profile). Here each check
is one kernel: every program scans a block of the new keys and values, program 0 also compares the length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
_EXPONENT = 0x7F800000


@triton.jit
def _guard_kernel(K, V, LEN, START, STATUS, n_k, n_v, new, capacity,
                  NONFINITE: tl.constexpr, OVERFLOW: tl.constexpr, POSITION: tl.constexpr,
                  CHECK_KV: tl.constexpr, CHECK_START: tl.constexpr, BLOCK: tl.constexpr, EXPONENT: tl.constexpr):
    pid = tl.program_id(0)
    if CHECK_KV:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        k = tl.load(K + offs, mask=offs < n_k, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
        v = tl.load(V + offs, mask=offs < n_v, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
        # NaN and +-inf are the float32 values with every exponent bit set: a bit test, because the GPU
        # build folded a NaN-aware comparison (not(|x| <= max)) into one that NaN passes
        bad = tl.sum(((k & EXPONENT) == EXPONENT).to(tl.int32) + ((v & EXPONENT) == EXPONENT).to(tl.int32), 0)
        if bad > 0:
            tl.atomic_or(STATUS + NONFINITE, 1)
    if pid == 0:
        length = tl.load(LEN)
        if CHECK_KV:
            if length + new > capacity:
                tl.atomic_or(STATUS + OVERFLOW, 1)
        if CHECK_START:
            if tl.load(START) != length:
                tl.atomic_or(STATUS + POSITION, 1)


def guard_append(status: torch.Tensor, length: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 capacity: int, codes: tuple[int, int]) -> None:
    """Set ``status[codes[0]]`` (int32, on k's device) if k or v (any shape, float dtype) hold NaN or inf,
    and ``status[codes[1]]`` if the 0-d int64 ``length`` plus k's token count (dim 2) passes ``capacity``;
    no host read, one launch."""
    kf, vf = k.reshape(-1), v.reshape(-1)
    grid = (max(1, triton.cdiv(max(kf.numel(), vf.numel()), BLOCK)),)
    _guard_kernel[grid](kf, vf, length, length, status, kf.numel(), vf.numel(), k.shape[2], capacity,
                        NONFINITE=codes[0], OVERFLOW=codes[1], POSITION=0, CHECK_KV=True, CHECK_START=False,
                        BLOCK=BLOCK, EXPONENT=_EXPONENT)


def guard_position(status: torch.Tensor, length: torch.Tensor, start: torch.Tensor, code: int) -> None:
    """Set ``status[code]`` (int32) if the model's position ``start`` (one int64 element) is not the 0-d
    int64 ``length``; no host read, one launch."""
    _guard_kernel[(1,)](length, length, length, start.reshape(-1), status, 0, 0, 0, 0,
                        NONFINITE=0, OVERFLOW=0, POSITION=code, CHECK_KV=False, CHECK_START=True,
                        BLOCK=BLOCK, EXPONENT=_EXPONENT)
