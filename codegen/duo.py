"""A duo layer's decode attention — retrieval heads in a KIVI, int8, fp8 or fp16 cache and the streaming heads'
rings — in a few launches, registered as ``kvpass::duo_kivi_attention`` and ``kvpass::duo_scaled_attention``.

The head groups are indexed, not gathered: the split programs read the query rows of their model kv head
(``kv_map``) and the merge writes them back there; the main launch (KIVI's, or the scaled kernel's one split
launch) carries one more program per (batch, streaming head), ahead of its split programs, that attends that
head's sink + ring (:func:`.ring.ring_attend`) and writes its rows of the output directly. Three launches
with KIVI (main splits + rings, tail, merge), two with an int8 / fp8 / fp16 cache (:mod:`.scaled`: splits +
rings, merge), replace the group path's gathers of q, the inner kernel's launches, the ring's attention and
the scatters of both outputs. The reference is :meth:`kvpass.methods.duo.DuoHeads.attend` (after the new token
is stored).
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from . import kivi, scaled
from .decode import call_length, kernel_mask, merge_splits
from .ring import RingPart

TUNING = kivi.TUNING          # the KIVI kernel's launch parameters
SCALED = ("int8", "fp8", "fp16")
# inner schemes whose one-launch path has run only under the Triton interpreter so far: a compiled model
# takes it on the GPU only with KVPASS_KERNELS=all (:func:`verified`). Empty now: KIVI and int8/fp8/fp16
# have run correctly on the H200 (tests/test_kernels.py -k duo, bench/results/duo_speed.json).
_UNVERIFIED_INNER: set[str] = set()


@triton_op("kvpass::duo_kivi_attention", mutates_args={})
def duo_kivi_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                       k_window: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                       v_window: torch.Tensor, length: torch.Tensor, attn_mask: torch.Tensor | None,
                       k_sink: torch.Tensor, v_sink: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                       retrieval: torch.Tensor, streaming: torch.Tensor, bits: int, group_size: int, residual: int,
                       length_hint: int, scale: float) -> torch.Tensor:
    """Decode attention of q (B, Hq, 1, D) over a duo layer holding ``length`` tokens (the newest stored):
    the kv heads ``retrieval`` (int32 (Hr,)) in a KIVI cache (buffers as for ``kvpass::kivi_attention``,
    (B, Hr, ...)), the kv heads ``streaming`` (int32 (Hs,)) in sink (B, Hs, SINK, D) and ring (B, Hs, RECENT, D)
    buffers in q's dtype. ``attn_mask``, ``length_hint``: as for ``kvpass::kivi_attention``. Returns
    (B, Hq, 1, D) in q.dtype."""
    out = torch.empty_like(q)
    ring = RingPart(retrieval, k_sink, v_sink, k_ring, v_ring, streaming, out)
    acc, m, l, rows_pad = kivi._kivi_splits(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero,
                                            v_window, length, attn_mask, bits, group_size, residual, length_hint,
                                            scale, True, ring)
    merge_splits(acc, m, l, out, rows_pad, k_window.shape[1], 1, wrap_triton, retrieval)
    return out


@triton_op("kvpass::duo_scaled_attention", mutates_args={})
def duo_scaled_attention(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None, v: torch.Tensor,
                         v_scale: torch.Tensor | None, length: torch.Tensor, attn_mask: torch.Tensor | None,
                         k_sink: torch.Tensor, v_sink: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                         retrieval: torch.Tensor, streaming: torch.Tensor, length_hint: int,
                         scale: float) -> torch.Tensor:
    """:func:`duo_kivi_attention` with the retrieval heads in an int8 / fp8 / fp16 cache: k, v (B, Hr, C, D)
    codes or values and their scales as ``kvpass::scaled_attention`` takes them; ``attn_mask`` None or an
    additive float32 (B, 1, W) mask. Returns (B, Hq, 1, D) in q.dtype."""
    out = torch.empty_like(q)
    ring = RingPart(retrieval, k_sink, v_sink, k_ring, v_ring, streaming, out)
    acc, m, l, rows_pad = scaled._scaled_splits(q, k, k_scale, v, v_scale, length, attn_mask, length_hint, scale,
                                                True, ring)
    merge_splits(acc, m, l, out, rows_pad, k.shape[1], 1, wrap_triton, retrieval)
    return out


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call: retrieval heads in a cache the KIVI or the int8 / fp8 / fp16
    kernel covers, one new token, fp16/bf16 queries, a mask shared by all heads."""
    inner = getattr(scheme, "inner", None)
    if inner is None or q.shape[2] != 1 or q.dtype == torch.float32:
        return False
    if inner.name == "kivi":
        return kivi.supports(inner, q, attn_mask, sliding_window, softcap)
    return inner.name in SCALED and scaled.supports(inner, q, attn_mask, sliding_window, softcap)


def verified(scheme) -> bool:
    """Whether this scheme's one-launch path has run correctly on a GPU (else it is taken there only with
    ``KVPASS_KERNELS=all``; :func:`kvpass.codegen.kernel_applies`)."""
    return getattr(scheme, "inner", None) is None or scheme.inner.name not in _UNVERIFIED_INNER


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`DuoHeads.attend` of one new token through :func:`duo_kivi_attention` (a layer with heads in
    both groups; else the group path runs): q (B, Hq, 1, D) -> (B, Hq, 1, D) in q.dtype."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "KIVI, int8, fp8 or fp16 retrieval heads (as their kernels take them), one new token, "
                         "fp16/bf16 queries and masks shared by all heads")
    ret, stream = scheme.parts(state)
    retrieval, streaming = scheme.head_maps(state.shape.layer, state.shape.kv_heads, q.device)
    inner = scheme.inner
    b, _, t, d = q.shape
    no_sink = q.new_empty(b, streaming.shape[0], 0, d)
    rings = (stream["k_sink"] if "k_sink" in stream.buffers else no_sink,
             stream["v_sink"] if "v_sink" in stream.buffers else no_sink, stream["k_ring"], stream["v_ring"])
    hint, scale = -1 if length is None else length, d ** -0.5 if scale is None else float(scale)
    if inner.name in SCALED:
        k, k_scale, v, v_scale = scaled.cache_tensors(inner, ret)
        return duo_scaled_attention(q, k, k_scale, v, v_scale, state.length_tensor,
                                    kernel_mask(attn_mask, b, t, length, additive=True), *rings, retrieval,
                                    streaming, hint, scale)
    return duo_kivi_attention(
        q, ret["k_codes"], ret["k_scale"], ret["k_zero"], ret["k_window"], ret["v_codes"], ret["v_scale"],
        ret["v_zero"], ret["v_window"], state.length_tensor, kernel_mask(attn_mask, b, t, length), *rings,
        retrieval, streaming, inner.bits, inner.group_size, inner.residual, hint, scale)
