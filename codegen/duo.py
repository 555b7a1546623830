"""A duo layer's decode attention — KIVI retrieval heads and streaming heads' rings — in the launches of one
KIVI call, registered as ``kvpass::duo_kivi_attention``.

The head groups are indexed, not gathered: the KIVI programs read the query rows of their model kv head
(``kv_map``) and the merge writes them back there; the tail launch carries one more program per (batch,
streaming head) that attends that head's sink + ring (:func:`.ring.ring_attend`) and writes its rows of the
output directly. Three launches (main splits, tail + rings, merge) replace the group path's gathers of q,
KIVI's three launches, the ring's attention and the scatters of both outputs. The reference is
:meth:`kvpass.methods.duo.DuoHeads.attend` (after the new token is stored).
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from . import kivi
from .decode import call_length, kernel_mask, merge_splits

TUNING = kivi.TUNING          # the KIVI kernel's launch parameters


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
    ring = kivi.RingPart(retrieval, k_sink, v_sink, k_ring, v_ring, streaming, out)
    acc, m, l, rows_pad = kivi._kivi_splits(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero,
                                            v_window, length, attn_mask, bits, group_size, residual, length_hint,
                                            scale, True, ring)
    merge_splits(acc, m, l, out, rows_pad, k_window.shape[1], 1, wrap_triton, retrieval)
    return out


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call: KIVI retrieval heads the KIVI kernel covers, one new token,
    a mask shared by all heads."""
    inner = getattr(scheme, "inner", None)
    return (inner is not None and inner.name == "kivi" and q.shape[2] == 1 and q.dtype != torch.float32
            and kivi.supports(inner, q, attn_mask, sliding_window, softcap))


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`DuoHeads.attend` of one new token through :func:`duo_kivi_attention` (a layer with heads in
    both groups; else the group path runs): q (B, Hq, 1, D) -> (B, Hq, 1, D) in q.dtype."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "KIVI retrieval heads (as its kernel takes them), one new token, fp16/bf16 queries and "
                         "masks shared by all heads")
    ret, stream = scheme.parts(state)
    retrieval, streaming = scheme.head_maps(state.shape.layer, state.shape.kv_heads, q.device)
    inner = scheme.inner
    b, _, t, d = q.shape
    return duo_kivi_attention(
        q, ret["k_codes"], ret["k_scale"], ret["k_zero"], ret["k_window"], ret["v_codes"], ret["v_scale"],
        ret["v_zero"], ret["v_window"], state.length_tensor, kernel_mask(attn_mask, b, t, length),
        stream["k_sink"] if "k_sink" in stream.buffers else q.new_empty(b, streaming.shape[0], 0, d),
        stream["v_sink"] if "v_sink" in stream.buffers else q.new_empty(b, streaming.shape[0], 0, d),
        stream["k_ring"], stream["v_ring"], retrieval, streaming, inner.bits, inner.group_size, inner.residual,
        -1 if length is None else length, d ** -0.5 if scale is None else float(scale))
