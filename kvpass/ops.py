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

from .errors import KVPassError
from .graphs import capturing, flag_position
from .methods import CacheShape, KVState, Scheme, get_scheme
from .rotary import Rotary
from .sinks import captured_step_with_sinks, step_with_sinks


_OBJECTS: dict[str, object] = {}      # options that are objects (calibrations), by spec key


def scheme_spec(scheme: Scheme, layer: int, capacity: int) -> str:
    """The JSON spec naming ``scheme`` (with its options) for one layer and cache capacity. Options
    that are objects (a calibration) are registered in this process and named by a key."""
    opts = {}
    for k, v in scheme.options().items():
        if isinstance(v, torch.dtype):
            v = str(v)
        elif v is not None and not isinstance(v, (bool, int, float, str)):
            key = f"object:{type(v).__name__}:{id(v)}"
            _OBJECTS[key] = v
            v = key
        opts[k] = v
    return json.dumps({"method": scheme.name, "options": opts, "layer": layer, "capacity": capacity},
                      sort_keys=True)


@functools.lru_cache(maxsize=None)
def scheme_from_spec(spec: str) -> tuple[Scheme, int, int]:
    """(scheme, layer, capacity) for a spec made by :func:`scheme_spec`."""
    d = json.loads(spec)
    opts = {}
    for k, v in d["options"].items():
        if isinstance(v, str) and v.startswith("torch."):
            v = getattr(torch, v[len("torch."):])
        elif isinstance(v, str) and v.startswith("object:"):
            if v not in _OBJECTS:
                raise KVPassError(f"the graph names {v}, which this process does not hold (a calibration "
                                  f"from another session?); compile the model again")
            v = _OBJECTS[v]
        opts[k] = v
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
              k_pre: Optional[Tensor], inv_freq: Optional[Tensor], rope_scale: float, spec: str,
              sinks: Optional[Tensor] = None) -> Tensor:
    """Append k, v (B, Hkv, T, D) at position ``start`` to the compressed cache and attend q (B, Hq, T, D).

    ``start`` (0-d int64) is where the model says the new tokens go: 0 starts a new sequence (the cache is
    reset), anything else must equal the cached length — except for ``windowed`` sites, whose model keeps
    only its last tokens (a sliding-window cache) and so counts positions within that window. A fresh
    prefill attends over the prompt's own full-precision k/v (as every KV-quantization method does) and
    then compresses it; later calls attend over the compressed cache. ``attn_mask`` is over key positions
    (additive, or bool True = attend): a longer mask (a static cache's) covers positions from 0, a shorter
    one (a sliding window's) the newest keys, older keys being out of the window. ``softcap`` 0 = none.
    Schemes that cache keys before RoPE get ``k_pre`` (the new keys before RoPE) and the model's rotary
    frequencies ``inv_freq`` (rotated_dims/2,) and ``rope_scale`` (None: a model without RoPE).
    ``sinks``: None, or one learned logit per query head (Hq,) joining every row's softmax
    (:mod:`kvpass.sinks`). Returns (B, Hq, T, D) in q.dtype.
    """
    state = _state(spec, buffers, length, k)
    scheme = state.scheme
    rotary = None
    if scheme.key_space == "pre_rope":
        if k_pre is None:
            raise KVPassError(f"{scheme.name} caches keys before RoPE but the site passed none")
        freq = inv_freq if inv_freq is not None else k.new_zeros(0, dtype=torch.float32)
        rotary = Rotary(freq.reshape(-1), rope_scale)
        state.rotary_dims = rotary.dims          # the op rebuilds its state each call: the host fact rides along
    if capturing(q):
        return _token_major(_captured_decode(scheme, state, q, k, v, start, attn_mask, windowed, rotary,
                                             k_pre if rotary is not None else k,
                                             dict(scale=scale, causal=causal, softcap=softcap or None), sinks))
    s, held = int(start), state.length
    if s == 0:
        length.zero_()
        held = 0
    elif s != held and not (windowed and s < held):
        raise KVPassError(f"layer {state.shape.layer}: the model continues at position {s} but the kvpass "
                          f"cache holds {held} tokens; compressed caches cannot rewind or skip")
    if windowed and scheme.policy:
        raise KVPassError(f"layer {state.shape.layer}: the {scheme.name} head policy does not cover sliding-window "
                          f"layers (their model keeps its own window); compile with heads='full'")
    total = held + k.shape[2]
    mask = None if attn_mask is None else _align_mask(attn_mask, total, windowed)
    kw = dict(k_pre=k_pre if rotary is not None else None, rotary=rotary, fresh=held == 0, scale=scale,
              causal=causal, attn_mask=mask, softcap=softcap or None)
    if sinks is not None:
        return _token_major(step_with_sinks(scheme, state, q, k, v, sinks, **kw))
    return _token_major(scheme.step(state, q, k, v, **kw))


def _token_major_empty(shape, like: Tensor) -> Tensor:
    b, h, t, d = shape
    return like.new_empty(b, t, h, d).transpose(1, 2)


def _token_major(out: Tensor) -> Tensor:
    """``out`` (B, H, T, D) in the layout the fake kernel promises: (B, T, H, D) in memory, which flash SDPA
    returns and the model's next ``transpose(1, 2).reshape`` wants. Inductor checks the strides, so any other
    layout is copied (a decode step's (B, H, 1, D) output is already one: only its strides are restated)."""
    b, h, t, d = out.shape
    want = (t * h * d, d, h * d, 1)
    if out.transpose(1, 2).is_contiguous():
        return out.as_strided(out.shape, want)
    return _token_major_empty(out.shape, out).copy_(out)


def _captured_decode(scheme, state, q, k, v, start, attn_mask, windowed, rotary, cached_k, kw,
                     sinks: Tensor | None = None) -> Tensor:
    """The decode path while a CUDA graph records (:mod:`kvpass.graphs`): no host reads of the cache. The
    step is taken to continue a cache that holds the prompt (a fresh prompt is never captured); a position
    other than the cache's length raises a device flag instead of an error here, and the mask goes to the
    scheme whole (a static cache's mask covers every position from 0)."""
    if windowed and scheme.policy:
        raise KVPassError(f"layer {state.shape.layer}: the {scheme.name} head policy does not cover sliding-window "
                          f"layers (their model keeps its own window); compile with heads='full'")
    if not windowed:
        flag_position(state.length_tensor, start)
    if sinks is not None:
        return captured_step_with_sinks(scheme, state, q, cached_k, v, sinks, rotary=rotary, attn_mask=attn_mask,
                                        **kw)
    return scheme.captured_step(state, q, cached_k, v, rotary=rotary, attn_mask=attn_mask, **kw)


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


@torch.library.custom_op("kvpass::shared_mask", mutates_args=())
def shared_mask(mask: Tensor) -> Tensor:
    """A contiguous copy of an attention mask (B, 1|H, T, K), bool or additive, that every site reading the
    mask shares. Inductor otherwise inlines a mask built from index comparisons into each consumer and, the
    consumer being an opaque op, materializes it once per layer (32 passes of T x K at prefill); an op's
    output is one buffer. The sites then also get the same tensor object, so the prompt path's check
    that the mask only spells out causality runs once per forward (attention.sdpa_arguments)."""
    return mask.clone(memory_format=torch.contiguous_format)


@shared_mask.register_fake
def _(mask):
    return torch.empty(mask.shape, dtype=mask.dtype, device=mask.device)


@attention.register_fake
def _(buffers, length, q, k, v, start, attn_mask, scale, causal, softcap, windowed, k_pre, inv_freq, rope_scale,
      spec, sinks=None):
    return _token_major_empty(q.shape[:-1] + (v.shape[-1],), q)
