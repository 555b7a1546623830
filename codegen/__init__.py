"""kvpass.codegen: Triton kernels for the schemes and their torch.library registration.

Installed as ``kvpass.codegen``. Every kernel has a PyTorch reference in :mod:`kvpass.methods` (the
scheme's own ``attend``); tests run both under ``TRITON_INTERPRET=1`` on the CPU. The compiled model
calls :func:`try_attend` first: on CUDA tensors, for schemes and options a kernel covers, attention runs
in the kernel; anywhere else (CPU, an option no kernel takes) it returns None and the reference runs.
Set ``KVPASS_KERNELS=0`` to force the reference on the GPU too, ``KVPASS_KERNELS=all`` to also take the
kernels not yet verified on a GPU (``_UNVERIFIED``).
"""

from __future__ import annotations

import importlib
import os

import torch

# scheme name -> module in this package that defines supports(), attend() and TUNING
_KERNELS = {"kivi": "kivi", "int8": "scaled", "fp8": "scaled", "fp16": "scaled", "million": "codebook",
            "cq": "codebook", "kvquant": "kvquant", "qaq": "qaq", "duo": "duo"}
# kernels checked only under the Triton interpreter so far: a compiled model takes them on the GPU only with
# KVPASS_KERNELS=all (kernel_attend and the tests call them directly)
# (empty now: every kernel has run correctly on the H200 — bench/results/decode_attention*.json, and duo's
# KIVI one-launch kernel in tests/test_kernels.py, tests/test_graphs.py and bench/results/duo_speed.json;
# a module can also hold back some of its variants with verified(scheme): codegen.duo's _UNVERIFIED_INNER)
_UNVERIFIED: set[str] = set()
_UNVERIFIED_APPEND: set[str] = set()
# scheme name -> module that defines supports(scheme, k) and append(scheme, state, k, v)
# attend_lse(): the merged splits' log-sum-exp too (sequence-parallel parts)
_LSE_KERNELS = {"kivi", "int8", "fp8", "fp16", "million", "cq", "kvquant"}
_APPEND_KERNELS = {"kivi": "kivi_append", "million": "codebook_append", "cq": "codebook_append"}


# query rows one program holds (GQA group x new tokens): decode steps and short multi-token steps; a longer
# call (a chunk of prompt attended over a filled cache) would not fit one tile, and takes the reference
MAX_QUERY_ROWS = 64


def _module(name: str):
    return importlib.import_module(f"{__name__}.{_KERNELS[name]}")


def has_append_kernel(scheme) -> bool:
    """Whether an append kernel exists for ``scheme``'s method."""
    return scheme.name in _APPEND_KERNELS


def append_supports(scheme, k: torch.Tensor) -> bool:
    """Whether the scheme's append kernel covers new keys shaped like ``k`` (B, Hkv, T, D)."""
    return has_append_kernel(scheme) and importlib.import_module(
        f"{__name__}.{_APPEND_KERNELS[scheme.name]}").supports(scheme, k)


def kernel_attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
                  attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over ``state`` through the scheme's Triton kernel, whatever the
    device (on the CPU it needs ``TRITON_INTERPRET=1``). ``length``: the state's length if known on the
    host (no device sync: CUDA-graph capturable). Returns (B, Hq, T, D) in q.dtype."""
    _check_mask_device(q, attn_mask)
    return _module(scheme.name).attend(scheme, state, q, scale=scale, causal=causal, attn_mask=attn_mask,
                                       length=length)


def _check_mask_device(q: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
    # a kernel handed a mask on another device fails deep in Triton's launcher with a pointer error
    if attn_mask is not None and attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but the queries are on {q.device}")


def kernel_applies(scheme, q: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   sliding_window: int | None = None, softcap: float | None = None, kv_heads: int | None = None,
                   table=_KERNELS) -> bool:
    """Whether :func:`try_attend` would run a kernel for this call (CUDA tensors, a covered scheme and
    options, verified on a GPU or ``KVPASS_KERNELS=all``, at most MAX_QUERY_ROWS query rows per KV head
    when ``kv_heads`` is given). ``table``: the kernels to look in (:data:`_LSE_KERNELS` for
    :func:`try_attend_lse`)."""
    mode = os.environ.get("KVPASS_KERNELS", "1")
    if (not q.is_cuda or mode == "0" or scheme.name not in table
            or (scheme.name in _UNVERIFIED and mode != "all")):
        return False
    if kv_heads is not None and q.shape[1] // kv_heads * q.shape[2] > MAX_QUERY_ROWS:
        return False
    module = _module(scheme.name)
    if mode != "all" and not getattr(module, "verified", lambda _: True)(scheme):
        return False             # a module's unverified variants (codegen.duo._UNVERIFIED_INNER)
    return module.supports(scheme, q, attn_mask, sliding_window, softcap)


def try_attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
               softcap: float | None = None) -> torch.Tensor | None:
    """The kernel's output when one applies (CUDA tensors, a covered scheme and options, a decode-sized
    query: :func:`kernel_applies`), else None."""
    if not kernel_applies(scheme, q, attn_mask, sliding_window, softcap, state.shape.kv_heads):
        return None
    _check_mask_device(q, attn_mask)
    return _module(scheme.name).attend(scheme, state, q, scale=scale, causal=causal, attn_mask=attn_mask)


def try_attend_lse(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
                   attn_mask: torch.Tensor | None = None, softcap: float | None = None, length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kernel's (out float32, lse) — ``Scheme.attend(..., return_lse=True)`` — where a kernel returns
    its log-sum-exp (every scheme but QAQ) and covers the call (:func:`kernel_applies`), else None.
    ``length``: the state's length if known on the host (no device sync)."""
    if not kernel_applies(scheme, q, attn_mask, None, softcap, state.shape.kv_heads, _LSE_KERNELS):
        return None
    _check_mask_device(q, attn_mask)
    return _module(scheme.name).attend_lse(scheme, state, q, scale=scale, causal=causal, attn_mask=attn_mask,
                                           length=length)


def try_append(scheme, state, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Append validated k, v (B, H, T, D) through the scheme's append kernel when one applies (CUDA tensors,
    a covered scheme and options); False if the caller must run the reference ``_append``. The state's
    length is not updated here."""
    mode = os.environ.get("KVPASS_KERNELS", "1")
    if (not k.is_cuda or mode == "0" or scheme.name not in _APPEND_KERNELS
            or (scheme.name in _UNVERIFIED_APPEND and mode != "all")):
        return False
    mod = importlib.import_module(f"{__name__}.{_APPEND_KERNELS[scheme.name]}")
    if not mod.supports(scheme, k):
        return False
    mod.append(scheme, state, k, v)
    return True


def tuning_of(name: str) -> dict:
    """The mutable launch-parameter table of ``name``'s kernels (benchmarks sweep it)."""
    return _module(name).TUNING
