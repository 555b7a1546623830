"""The kvpass custom ops: what a rewritten attention site calls.

``kvpass::attention`` appends a site's new keys/values to its compressed cache and attends over it. The
compressed state is passed as tensors the op mutates (so torch.compile, functionalization and export see
the mutation), and the scheme is named by a JSON ``spec`` string, so the op is self-describing: the same
graph runs wherever kvpass is installed, and exporters can read the spec.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch
from torch import Tensor

from .attention import dense_attention
from .errors import KVPassError
from .methods import CacheShape, KVState, Scheme, get_scheme


def scheme_spec(scheme: Scheme, layer: int, capacity: int) -> str:
    """The JSON spec naming ``scheme`` (with its options) for one layer and cache capacity."""
    opts = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in scheme.options().items()}
    return json.dumps({"method": scheme.name, "options": opts, "layer": layer, "capacity": capacity},
                      sort_keys=True)


@functools.lru_cache(maxsize=None)
def scheme_from_spec(spec: str) -> tuple[Scheme, int, int]:
    """(scheme, layer, capacity) for a spec made by :func:`scheme_spec`."""
    d = json.loads(spec)
    opts = {k: (getattr(torch, v[len("torch."):]) if isinstance(v, str) and v.startswith("torch.") else v)
            for k, v in d["options"].items()}
    return get_scheme(d["method"], **opts), d["layer"], d["capacity"]


def _state(spec: str, buffers: list[Tensor], length: Tensor, k: Tensor) -> KVState:
    scheme, layer, capacity = scheme_from_spec(spec)
    shape = CacheShape(k.shape[0], k.shape[1], k.shape[3], capacity, k.dtype, layer)
    names = sorted(scheme.full_layout(shape))
    if len(names) != len(buffers):
        raise KVPassError(f"{scheme.name} layer {layer}: expected {len(names)} cache buffers, got {len(buffers)}")
    return KVState(scheme, shape, dict(zip(names, buffers)), length.device, length_tensor=length)


@torch.library.custom_op("kvpass::attention", mutates_args=("buffers", "length"))
def attention(buffers: list[Tensor], length: Tensor, q: Tensor, k: Tensor, v: Tensor, start: Tensor,
              attn_mask: Optional[Tensor], scale: float, causal: bool, softcap: float, windowed: bool,
              spec: str) -> Tensor:
    """Append k, v (B, Hkv, T, D) at position ``start`` to the compressed cache and attend q (B, Hq, T, D).

    ``start`` (0-d int64) is where the model says the new tokens go: 0 starts a new sequence (the cache is
    reset), anything else must equal the cached length — except for ``windowed`` sites, whose model keeps
    only its last tokens (a sliding-window cache) and so counts positions within that window. A fresh
    prefill attends over the prompt's own full-precision k/v (as every KV-quantization method does) and
    then compresses it; later calls attend over the compressed cache. ``attn_mask`` is over key positions
    (additive, or bool True = attend): a longer mask (a static cache's) covers positions from 0, a shorter
    one (a sliding window's) the newest keys, older keys being out of the window. ``softcap`` 0 = none.
    Returns (B, Hq, T, D) in q.dtype.
    """
    state = _state(spec, buffers, length, k)
    s, held = int(start), state.length
    if s == 0:
        length.zero_()
        held = 0
    elif s != held and not (windowed and s < held):
        raise KVPassError(f"layer {state.shape.layer}: the model continues at position {s} but the kvpass "
                          f"cache holds {held} tokens; compressed caches cannot rewind or skip")
    total = held + k.shape[2]
    mask = None if attn_mask is None else _align_mask(attn_mask, total, windowed)
    kw = dict(scale=scale, causal=causal, attn_mask=mask, softcap=softcap or None)
    if held == 0:
        out = dense_attention(q, k, v, **kw)
        state.scheme.append(state, k, v)
        return out
    state.scheme.append(state, k, v)
    return state.scheme.attend(state, q, **kw)


def _align_mask(mask: Tensor, total: int, windowed: bool) -> Tensor:
    width = mask.shape[-1]
    if width >= total:
        return mask[..., :total]
    if not windowed:
        raise KVPassError(f"attention mask covers {width} keys but the cache holds {total}")
    # keys older than the model's window are outside it: hide them
    fill = False if mask.dtype == torch.bool else float("-inf")
    hidden = torch.full(mask.shape[:-1] + (total - width,), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([hidden, mask], dim=-1)


@attention.register_fake
def _(buffers, length, q, k, v, start, attn_mask, scale, causal, softcap, windowed, spec):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))
