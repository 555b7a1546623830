"""Honest ("decode") perplexity: prefill a prompt, then feed the rest one token at a time through the cache.

This is what a user's generation sees (BENCHMARKS.md, "Quality"): the prompt is run once with
``use_cache=True``, then every following token is fed alone with the cache the previous call returned
(teacher forcing), and the negative log-likelihood of each token after the prompt is summed. The same code
measures a plain transformers model (its own cache) and a model returned by :func:`kvpass.compile` (the
model's cache then holds placeholders and the K/V live in kvpass's real compressed buffers, appended token
by token, with the scheme's full-precision window as in real decoding).

For the fast alternative (one full forward per window through the compressed buffers) see
:func:`kvpass.simulate.perplexity` ("sim" mode).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import KVPassError, ShapeError


def decode_perplexity(model: torch.nn.Module, ids: torch.Tensor, prefill: int,
                      progress: bool | Callable[[int], object] = True, batch_size: int | None = None,
                      desc: str = "decode ppl") -> dict:
    """Honest-mode perplexity of ``model`` on the windows ``ids``.

    model: a causal LM taking ``input_ids``, ``use_cache`` and its cache (``cache``, or
    ``past_key_values`` before transformers deprecated that name) and returning ``.logits`` and the cache
    (a transformers model, plain or compiled by :func:`kvpass.compile`); in eval mode.
    ids: LongTensor (n, T), one independent window per row (equal lengths, no padding).
    prefill: prompt tokens per window, 1 <= prefill < T. The prompt ids[:, :prefill] is run once; the token
    at position ``prefill`` is predicted by the prompt's last logit, and every later token by the logit of
    the single-token call before it, so ``T - prefill`` tokens per window are scored.
    progress: True shows a tqdm bar over scored tokens, False nothing; a callable is called with the number
    of tokens scored after each step (e.g. an outer bar's ``update``).
    batch_size: windows run together (default: all n at once). Each batch starts a new sequence (a call at
    cache position 0), so a kvpass cache is reset between batches.
    desc: label of the progress bar.
    returns: dict with ``ppl`` (exp of the mean NLL), ``nll`` (mean, nats), ``tokens`` (scored tokens,
    n * (T - prefill)), ``windows``, ``window``, ``prefill``, ``mode`` ("decode").
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        raise ShapeError(f"ids must be a LongTensor (n_windows, window), got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    n, length = ids.shape
    if isinstance(prefill, bool) or not isinstance(prefill, int) or not 1 <= prefill < length:
        raise KVPassError(f"prefill must be an int in [1, {length - 1}] for windows of {length} tokens, "
                          f"got {prefill!r}")
    if n < 1:
        raise ShapeError("need at least one window")
    if batch_size is None:
        batch_size = n
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KVPassError(f"batch_size must be a positive int, got {batch_size!r}")
    if model.training:
        raise KVPassError("put the model in eval mode (model.eval()) before measuring perplexity")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ShapeError(f"token ids must lie in [0, {vocab}) for this model")
    device = next(model.parameters()).device
    # only the prompt's last logit is needed: skip the LM head over the rest of the prompt when we can
    params = _parameters(model.forward)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = cache_argument(model)
    scored = n * (length - prefill)

    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=scored, unit="tok", desc=desc, dynamic_ncols=True)
        update = bar.update
    elif callable(progress):
        update = progress
    else:
        update = None

    total = 0.0
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                rows = ids[i:i + batch_size].to(device)
                out = model(input_ids=rows[:, :prefill], use_cache=True, **extra)
                total += _nll(out.logits[:, -1], rows[:, prefill], i)
                if update is not None:
                    update(len(rows))
                past = _returned_cache(out)
                for t in range(prefill, length - 1):
                    out = model(input_ids=rows[:, t:t + 1], use_cache=True, **extra, **{cache_arg: past})
                    past = _returned_cache(out)
                    total += _nll(out.logits[:, -1], rows[:, t + 1], i)
                    if update is not None:
                        update(len(rows))
                del out, past
    finally:
        if bar is not None:
            bar.close()
    nll = total / scored
    return {"mode": "decode", "ppl": math.exp(nll), "nll": nll, "tokens": scored, "windows": n,
            "window": length, "prefill": prefill}


def cache_argument(model) -> str:
    """The name ``model.forward`` takes its cache by: transformers >= 5.2x says ``cache`` (``past_key_values``
    is deprecated there), older versions only ``past_key_values``."""
    return "cache" if "cache" in _parameters(model.forward) else "past_key_values"


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise KVPassError("the model returned no cache (``cache`` / ``past_key_values``) with use_cache=True")
    return cache


def _nll(logits: torch.Tensor, target: torch.Tensor, first_window: int) -> float:
    """Summed NLL of ``target`` (B,) under ``logits`` (B, vocab); raises on a non-finite loss."""
    nll = F.cross_entropy(logits.float(), target, reduction="sum")
    if not torch.isfinite(nll):
        raise KVPassError(f"non-finite loss in the batch starting at window {first_window}")
    return float(nll)
