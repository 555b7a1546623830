"""Dense reference attention: what every compressed attention must equal on the decoded K/V."""

from __future__ import annotations

import math
import weakref

import torch

from .errors import ShapeError

Tensor = torch.Tensor


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    causal: bool = True, attn_mask: torch.Tensor | None = None,
                    sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention computed in float32, GQA by head grouping (no K/V copies).

    q: (B, Hq, Tq, D); k, v: (B, Hkv, L, D) with Hq % Hkv == 0 and Tq <= L. Queries are the last Tq
    positions: query i sits at position L - Tq + i. ``causal`` hides later keys; ``sliding_window`` w
    keeps only keys at positions > pos - w; ``softcap`` c applies c*tanh(s/c) to the scaled scores;
    ``attn_mask`` (broadcastable to (B, Hq, Tq, L)) is boolean (True = keep) or additive.
    returns: (B, Hq, Tq, D) in q.dtype.
    """
    b, hq, tq, d = q.shape
    if k.dim() != 4 or k.shape != v.shape[:3] + (k.shape[3],) or k.shape[0] != b:
        raise ShapeError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    probs = attention_probs(q, k, scale=scale, causal=causal, attn_mask=attn_mask,
                            sliding_window=sliding_window, softcap=softcap)
    hkv, length = k.shape[1], k.shape[2]
    out = torch.einsum("bhgtl,bhld->bhgtd", probs.reshape(b, hkv, hq // hkv, tq, length), v.float())
    return out.reshape(b, hq, tq, v.shape[-1]).to(q.dtype)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_comp: torch.Tensor,
                       v_comp: torch.Tensor, k_exact: torch.Tensor, v_exact: torch.Tensor, *,
                       scale: float | None = None, causal: bool = True, attn_mask: torch.Tensor | None = None,
                       sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """:func:`dense_attention` where each query sees, per key position, either the exact key/value (k, v)
    or the compressed one (k_comp, v_comp; all (B, Hkv, L, D)): ``k_exact`` / ``v_exact`` (Tq, L) bool say
    which, per query row. It is what a compressed cache with a full-precision window gives each query when
    the tokens are decoded one at a time (:mod:`kvpass.simulate`). Returns (B, Hq, Tq, D) in q.dtype."""
    b, hq, tq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.where(k_exact, _scores(q, k, scale, softcap), _scores(q, k_comp, scale, softcap))
    probs = _masked_softmax(scores, causal=causal, attn_mask=attn_mask, sliding_window=sliding_window)
    hkv, length = k.shape[1], k.shape[2]
    grouped = (b, hkv, hq // hkv, tq, length)
    out = (torch.einsum("bhgtl,bhld->bhgtd", (probs * v_exact).reshape(grouped), v.float())
           + torch.einsum("bhgtl,bhld->bhgtd", (probs * ~v_exact).reshape(grouped), v_comp.float()))
    return out.reshape(b, hq, tq, v.shape[-1]).to(q.dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, causal: bool = True,
                    attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Softmax weights (B, Hq, Tq, L) float32 of q (B, Hq, Tq, D) over k (B, Hkv, L, D), with the masking
    rules of :func:`dense_attention`; a fully masked row is zeros, a NaN anywhere else stays visible."""
    b, hq, tq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ShapeError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if tq > length:
        raise ShapeError(f"{tq} queries but only {length} keys")
    scores = _scores(q, k, 1.0 / math.sqrt(d) if scale is None else scale, softcap)
    return _masked_softmax(scores, causal=causal, attn_mask=attn_mask, sliding_window=sliding_window)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Scaled (and soft-capped) float32 scores (B, Hq, Tq, L) of q (B, Hq, Tq, D) against k (B, Hkv, L, D)."""
    b, hq, tq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qg = q.float().reshape(b, hkv, hq // hkv, tq, d)
    scores = torch.einsum("bhgtd,bhld->bhgtl", qg, k.float()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.reshape(b, hq, tq, length)


def _masked_softmax(scores: torch.Tensor, *, causal: bool, attn_mask: torch.Tensor | None,
                    sliding_window: int | None) -> torch.Tensor:
    """Softmax over the last dim of scores (B, Hq, Tq, L) (queries the last Tq positions) with the masking
    rules of :func:`dense_attention`; a fully masked row is zeros."""
    tq, length = scores.shape[-2:]
    device = scores.device
    qpos = torch.arange(length - tq, length, device=device).unsqueeze(1)
    kpos = torch.arange(length, device=device).unsqueeze(0)
    keep = torch.ones(tq, length, dtype=torch.bool, device=device)
    if causal:
        keep &= kpos <= qpos
    if sliding_window is not None:
        keep &= kpos > qpos - sliding_window
    scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = torch.softmax(scores, dim=-1)
    return probs.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor,
                      query_pos: torch.Tensor, *, scale: float, causal: bool = True,
                      attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one *part* of the cache (e.g. the quantized tokens, or the fp16 window).

    q: (B, Hq, Tq, D); k, v: (B, Hkv, N, D); key_pos: (N,) positions of those keys; query_pos: (Tq,).
    attn_mask, if given, is over all cache positions (..., Tq, L) and is indexed at key_pos.
    returns (out, lse): out (B, Hq, Tq, D) float32, normalized within the part; lse (B, Hq, Tq)
    float32 log-sum-exp of the part's scores (-inf where the part has no visible key).
    Parts combine exactly with :func:`merge_partials` — the flash-decoding split the kernels use.
    """
    b, hq, tq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = q.float().reshape(b, hkv, hq // hkv, tq, d)
    scores = torch.einsum("bhgtd,bhnd->bhgtn", qg, k.float()).reshape(b, hq, tq, n)
    return attention_from_scores(scores, v, key_pos, query_pos, scale=scale, causal=causal,
                                 attn_mask=attn_mask, sliding_window=sliding_window, softcap=softcap)


def attention_from_scores(scores: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor,
                          query_pos: torch.Tensor, *, scale: float, causal: bool = True,
                          attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                          softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial_attention` from raw q.k products ``scores`` (B, Hq, Tq, N) float32 — for schemes
    that score keys without decoding them (lookup tables). v: (B, Hkv, N, Dv). Returns (out, lse)."""
    b, hq, tq, n = scores.shape
    hkv = v.shape[1]
    scores = scores * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = torch.ones(tq, n, dtype=torch.bool, device=scores.device)
    if causal:
        keep &= key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        keep &= key_pos[None, :] > query_pos[:, None] - sliding_window
    scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        m = attn_mask[..., key_pos]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse).unsqueeze(-1)             # no visible key in this part
    probs = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(empty, 0.0)
    out = torch.einsum("bhgtn,bhnd->bhgtd", probs.reshape(b, hkv, hq // hkv, tq, n), v.float())
    return out.reshape(b, hq, tq, v.shape[-1]), lse


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]], return_lse: bool = False):
    """Combine (out, lse) pairs of disjoint key sets into the attention over their union.

    Each out: (B, Hq, Tq, D) float32; lse: (B, Hq, Tq). returns (B, Hq, Tq, D) float32 — with
    ``return_lse``, the pair (out, lse of the union) (B, Hq, Tq) float32, itself a part that merges again
    (how :mod:`kvpass.distributed` merges the parts of several ranks).
    """
    lses = torch.stack([lse for _, lse in parts])                    # (P, B, Hq, Tq)
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).masked_fill(torch.isneginf(total), 0.0).unsqueeze(-1)  # all-masked rows -> 0
    out = sum(w * out for w, (out, _) in zip(weights, parts))
    return (out, total) if return_lse else out


def merged(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, return_lse: bool = False):
    """What a scheme's split ``attend`` returns from its parts: the merged output in ``dtype``, or with
    ``return_lse`` the float32 pair (out (B, Hq, Tq, D), lse (B, Hq, Tq)) for a caller that merges further."""
    if return_lse:
        return merge_partials(parts, return_lse=True)
    return merge_partials(parts).to(dtype)


def dense_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        causal: bool = True, attn_mask: torch.Tensor | None = None,
                        sliding_window: int | None = None, softcap: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dense_attention` that also returns the log-sum-exp of each row's scores: q (B, Hq, Tq, D)
    over k, v (B, Hkv, L, D), the queries the last Tq positions (Tq may exceed L: then they sit after
    every key). Returns (out (B, Hq, Tq, D) float32, lse (B, Hq, Tq) float32, -inf where no key is
    visible and out is zero there)."""
    length, tq = k.shape[2], q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    key_pos = torch.arange(length, device=q.device)
    query_pos = torch.arange(length - tq, length, device=q.device)
    return partial_attention(q, k, v, key_pos, query_pos, scale=scale, causal=causal, attn_mask=attn_mask,
                             sliding_window=sliding_window, softcap=softcap)


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, attn_mask: Tensor | None,
                     softcap: float | None) -> Tensor:
    """Attention of a fresh prompt over its own full-precision k, v (B, Hkv, T, D): on CUDA through
    ``scaled_dot_product_attention`` (flash / memory-efficient kernels: a long prompt never materializes
    its T x T scores), elsewhere — and with soft-capping, which SDPA lacks — the float32 reference."""
    if not q.is_cuda or softcap is not None:
        return dense_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
    mask, causal, dead = sdpa_arguments(q, k, attn_mask, causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])
    return out if dead is None else out.masked_fill(dead, 0.0)


def sdpa_arguments(q: Tensor, k: Tensor, attn_mask: Tensor | None, causal: bool
                   ) -> tuple[Tensor | None, bool, Tensor | None]:
    """(mask, is_causal, dead rows) for ``scaled_dot_product_attention`` of q (B, Hq, T, D) over k
    (B, Hkv, K, D) meaning what ``dense_attention(causal=causal, attn_mask=attn_mask)`` means. A mask that
    is just the causal pattern spelled out (transformers builds one under torch.compile and then calls the
    site non-causal) becomes ``is_causal`` with no mask, which SDPA's flash kernels take (they skip the
    hidden half; a mask sends it to slower kernels). Otherwise causality is folded into the mask, and rows
    that see no key (left padding; SDPA would give NaN, the reference zeros) are returned as ``dead``
    (B, 1|H, T, 1) bool, unmasked in the mask so the caller can zero them."""
    if attn_mask is None:
        return None, causal, None
    t, length = q.shape[2], k.shape[2]
    if _is_only_causal(attn_mask, t, length):
        return None, True, None
    keep = _causal_keep(t, length, q.device)
    mask = attn_mask
    if causal:
        mask = (mask & keep) if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
    visible = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    dead = ~visible.any(-1, keepdim=True)
    mask = (mask | dead) if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0).to(q.dtype)
    return mask, False, dead


def _causal_keep(t: int, length: int, device: torch.device) -> Tensor:
    """(t, length) bool: query i (the last t of ``length`` positions) sees keys 0 .. length - t + i."""
    cols = torch.arange(length, device=device)
    return cols[None, :] <= torch.arange(length - t, length, device=device)[:, None]


# The verdict on the last mask checked: transformers hands every layer of one forward the same mask object,
# so a 32-layer prompt reads it once instead of 32 times (at 32K tokens each read is a 1 GiB pass).
_last_verdict: tuple = (None, -1, None, False)


def _is_only_causal(mask: Tensor, t: int, length: int) -> bool:
    """:func:`_is_only` against the causal pattern of t queries over ``length`` keys, remembered for the same
    mask object at the same version (any in-place write, through a view too, bumps the version; inference
    tensors carry none and are read every time). A remembered verdict builds no pattern either."""
    global _last_verdict
    ref, version, shape, verdict = _last_verdict
    try:
        now = mask._version
    except RuntimeError:          # an inference-mode tensor
        return _is_only(mask, _causal_keep(t, length, mask.device))
    if ref is not None and ref() is mask and version == now and shape == (t, length):
        return verdict
    verdict = _is_only(mask, _causal_keep(t, length, mask.device))
    _last_verdict = (weakref.ref(mask), now, (t, length), verdict)
    return verdict


def _is_only(mask: Tensor, keep: Tensor) -> bool:
    """Whether ``mask`` (bool, or additive with -inf = hidden; (..., T, K)) allows exactly the keys ``keep``
    (T, K) allows, in every batch row and head: then it adds nothing to ``is_causal`` and SDPA may take its
    flash kernel, which takes no mask. Reads the mask once (a host sync: prompts only)."""
    visible = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    if visible.shape[-2:] != keep.shape:
        return False
    return bool((visible == keep).all())


def visible_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, *, scale: float | None,
                      attn_mask: Tensor | None, softcap: float | None) -> Tensor:
    """Attention of q (B, Hq, T, D) over k, v (B, Hkv, S, D) where only the keys ``visible`` (bool,
    broadcastable to (B, 1, T, S)) count, further masked by ``attn_mask`` (bool or additive, (B, 1|Hq, T, S)).
    No host reads: the path of a step recorded in a CUDA graph, whose cache length lives on the device.
    On CUDA through SDPA (the new token always sees itself, so no row is empty), else the float32 reference.
    Returns (B, Hq, T, D) in q.dtype."""
    mask = visible
    if attn_mask is not None:
        mask = (attn_mask & visible) if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~visible,
                                                                                                float("-inf"))
    if not q.is_cuda or softcap is not None:
        return dense_attention(q, k, v, scale=scale, causal=False, attn_mask=mask, softcap=softcap)
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def key_columns(attn_mask: Tensor | None, positions: Tensor) -> Tensor | None:
    """The columns of a static cache's mask (..., W) at key ``positions`` (S,) int64 (clamped into the
    mask: positions past it are hidden by the caller's visibility), or None."""
    if attn_mask is None:
        return None
    return attn_mask.index_select(-1, positions.clamp(0, attn_mask.shape[-1] - 1))
