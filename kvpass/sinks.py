"""Learned attention sinks (gpt-oss): one logit per query head that joins every row's softmax as an extra
column whose value vector is zero.

With the row's scores s_1..s_n and the head's sink logit g, softmax over [s, g] gives each key
exp(s_i) / (sum_j exp(s_j) + exp(g)): the plain attention output scaled by
sum_j exp(s_j) / (sum_j exp(s_j) + exp(g)) = sigmoid(lse - g), lse the log-sum-exp of the row's scores.
So a site with sinks runs the scheme's attention that also returns its log-sum-exp (the kernels' LSE
variants, the reference's ``return_lse``) and scales each row; nothing in the cache changes. A row that
sees no key (lse = -inf) gets zeros, as the model's softmax puts all its weight on the sink.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import dense_attention_lse
from .errors import KVPassError

PROMPT_SCORES = 2 ** 28   # float32 scores one block of the prompt's attention may hold (1 GiB)


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """out (B, Hq, T, D) float32 and its lse (B, Hq, T) (natural log, -inf where no key is visible),
    sinks (Hq,): the attention with the sink column, float32 (B, Hq, T, D)."""
    if sinks.shape != (out.shape[1],):
        raise KVPassError(f"attention sinks: expected one logit per query head ({out.shape[1]}), got "
                          f"{tuple(sinks.shape)}")
    weight = torch.sigmoid(lse - sinks.float().view(1, -1, 1))
    return out * weight.unsqueeze(-1)


def prompt_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                         attn_mask: Tensor | None, softcap: float | None) -> tuple[Tensor, Tensor]:
    """(out float32, lse) of a fresh prompt q (B, Hq, T, D) over its own k, v (B, Hkv, T, D), a block of
    queries at a time: each block attends over the keys up to its last query, and holds at most
    PROMPT_SCORES scores (B x Hq x block x T). ``attn_mask`` (B, 1|Hq, T, T) as the site passes it."""
    b, hq, t, _ = q.shape
    block = max(1, min(t, PROMPT_SCORES // max(1, b * hq * t)))
    outs, lses = [], []
    for lo in range(0, t, block):
        hi = min(lo + block, t)
        rows = slice(lo, hi) if attn_mask is not None and attn_mask.shape[-2] != 1 else slice(None)
        mask = None if attn_mask is None else attn_mask[..., rows, :hi]
        o, l = dense_attention_lse(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], scale=scale, causal=causal,
                                   attn_mask=mask, softcap=softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _check_scheme(scheme) -> None:
    from .methods.base import Scheme
    if type(scheme).step is not Scheme.step or scheme.policy:
        raise KVPassError(f"attention sinks (a learned logit per head, as in gpt-oss) are served for plain "
                          f"schemes only; {scheme.name} splits or distributes its heads or positions "
                          f"(compile with heads='full', without parallel=)")
    if scheme.name == "qaq":
        raise KVPassError("attention sinks: qaq's attention does not return the log-sum-exp they need")


def step_with_sinks(scheme, state, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, *, k_pre: Tensor | None,
                    rotary, fresh: bool, scale: float, causal: bool, attn_mask: Tensor | None,
                    softcap: float | None) -> Tensor:
    """:meth:`Scheme.step` of a site with sinks (Hq,): store the new k, v (B, Hkv, T, D) and attend
    q (B, Hq, T, D) with the sink column. Returns (B, Hq, T, D) in q.dtype."""
    _check_scheme(scheme)
    kw = dict(scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
    cached_k = k_pre if k_pre is not None else k
    if fresh:
        out, lse = prompt_attention_lse(q, k, v, **kw)
        scheme.append(state, cached_k, v, rotary=rotary)
    else:
        scheme.append(state, cached_k, v, rotary=rotary)
        from .codegen import try_attend_lse      # imports triton: only once a cache is attended
        got = try_attend_lse(scheme, state, q, **kw)
        out, lse = got if got is not None else scheme.attend(state, q, return_lse=True, **kw)
    return apply_sinks(out, lse, sinks).to(q.dtype)


def captured_step_with_sinks(scheme, state, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, *, rotary,
                             scale: float, causal: bool, attn_mask: Tensor | None, softcap: float | None) -> Tensor:
    """:meth:`Scheme.captured_step` of a site with sinks: the append at the device length, then a kernel
    that returns its log-sum-exp (no host reads while a CUDA graph records)."""
    _check_scheme(scheme)
    scheme.append(state, k, v, rotary=rotary)
    from .codegen import try_attend_lse
    got = try_attend_lse(scheme, state, q, scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
    if got is None:
        raise KVPassError(f"{scheme.name}: no decode kernel with a log-sum-exp covers this site with attention "
                          f"sinks, so its decode step cannot be captured in a CUDA graph; run it eagerly")
    return apply_sinks(*got, sinks).to(q.dtype)
