"""StreamingLLM's head policy (Xiao et al., 2023): every head keeps the first ``sink`` tokens and a ring of the
``recent`` newest ones, in the cache dtype, whatever the context length.

A query at position p sees the sink keys and the keys in (p - recent, p]. Token p lives in the sink when
p < sink, else in ring slot (p - sink) % recent, so the buffers never grow: the cache of a 1M-token
context is as large as that of a 320-token one, and its capacity does not bound the positions. Each call
attends over what the ring holds plus the new tokens (before they overwrite anything), then stores them:
a prompt chunk longer than the ring still sees every key its queries should, and nothing older is kept.
DuoAttention's streaming heads are this cache (:mod:`kvpass.methods.duo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import dense_attention, key_columns, prompt_attention, visible_attention
from ..errors import KVPassError, ShapeError
from ..graphs import flag_new_tokens
from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme, require_int


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """(Tq, S) bool: query positions (Tq,) see key positions (S,) in the sink or at most ``recent - 1``
    back (the query itself included), never a later key."""
    q, k = query_pos[:, None], key_pos[None, :]
    return (k <= q) & ((k < sink) | (q - k < recent))


@register
@dataclass
class StreamingRing(Scheme):
    """Sink + recent-token ring per head, exact (the cache dtype): 2 x (sink + recent) x head_dim values per
    head, independent of the context length."""

    name = "streaming"
    policy: ClassVar[bool] = True
    sink: int = 64
    recent: int = 256

    def validate(self) -> None:
        require_int(self.name, "sink", self.sink, 0)
        require_int(self.name, "recent", self.recent, 1)

    def check_shape(self, shape: CacheShape) -> None:
        if self.sink + self.recent > shape.capacity:
            raise ShapeError(f"the streaming window (sink {self.sink} + recent {self.recent} tokens) is larger "
                             f"than the cache ({shape.capacity} tokens): it would keep everything; use a smaller "
                             f"window or heads='full'")

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        b, h, d = shape.batch, shape.kv_heads, shape.head_dim
        specs = {"k_ring": BufferSpec((b, h, self.recent, d), shape.dtype),
                 "v_ring": BufferSpec((b, h, self.recent, d), shape.dtype)}
        if self.sink:
            specs |= {"k_sink": BufferSpec((b, h, self.sink, d), shape.dtype),
                      "v_sink": BufferSpec((b, h, self.sink, d), shape.dtype)}
        return specs

    # -- storing ------------------------------------------------------------------------------
    def append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, rotary=None) -> None:
        """Store k, v (B, H, T, D) at the next positions: no capacity bound (the ring keeps the newest)."""
        self.check_input(state, k, v)
        self.check_finite(state, k, v)
        self._append(state, k, v, state.length)
        state.length_tensor += k.shape[2]

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        positions = torch.arange(start, start + k.shape[2], device=k.device)
        in_sink = positions < self.sink
        if in_sink.any():
            idx = positions[in_sink]
            state["k_sink"].index_copy_(2, idx, k[:, :, in_sink])
            state["v_sink"].index_copy_(2, idx, v[:, :, in_sink])
        # only the newest `recent` of the rest survive; writing just those keeps the ring slots distinct
        rest = positions[~in_sink][-self.recent:]
        if rest.numel():
            take = slice(k.shape[2] - rest.numel(), k.shape[2])
            slots = (rest - self.sink) % self.recent
            state["k_ring"].index_copy_(2, slots, k[:, :, take])
            state["v_ring"].index_copy_(2, slots, v[:, :, take])

    # -- reading ------------------------------------------------------------------------------
    def held(self, state: KVState, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tokens the cache holds after ``length`` (default: its length) appended: keys, values
        (B, H, S, D) in position order and their positions (S,) int64 — the sink, then the ring."""
        n = state.length if length is None else length
        device = state.device
        s = min(n, self.sink)
        ring = torch.arange(max(s, n - self.recent), n, device=device)
        slots = (ring - self.sink) % self.recent
        parts_k, parts_v = [], []
        if s:
            parts_k.append(state["k_sink"][:, :, :s])
            parts_v.append(state["v_sink"][:, :, :s])
        parts_k.append(state["k_ring"].index_select(2, slots))
        parts_v.append(state["v_ring"].index_select(2, slots))
        positions = torch.cat([torch.arange(s, device=device), ring])
        return torch.cat(parts_k, 2), torch.cat(parts_v, 2), positions

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        """The held keys and values (B, H, S, D), S = min(length, sink + recent): not the whole context."""
        k, v, _ = self.held(state)
        return k, v

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(k.shape, dtype=torch.float32), torch.zeros(v.shape, dtype=torch.float32)

    # -- attending ----------------------------------------------------------------------------
    def attend(self, state: KVState, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """Attention of the newest position's queries q (B, Hq, 1, D) over the held tokens (the ring holds
        exactly its window). More query positions would need keys the ring has dropped: they go through
        :meth:`step`, which attends before storing."""
        if q.shape[2] != 1:
            raise KVPassError(f"the streaming ring attends one query position at a time after an append "
                              f"(got {q.shape[2]}); new tokens attend through step()")
        k, v, pos = self.held(state)
        if attn_mask is not None:
            attn_mask = attn_mask.index_select(-1, pos)
        return dense_attention(q, k, v, scale=scale, causal=False, attn_mask=attn_mask, softcap=softcap)

    def step(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_pre=None, rotary=None,
             fresh: bool, scale: float | None, causal: bool, attn_mask: torch.Tensor | None,
             softcap: float | None) -> torch.Tensor:
        """Attend q (B, Hq, T, D) over the held tokens and the new k, v (B, H, T, D) through the sink + recent
        window, then store the new tokens. ``attn_mask`` covers every position from 0 (its columns at the
        held positions are used)."""
        if k_pre is not None:
            raise KVPassError("the streaming ring keeps keys after RoPE; it cannot serve a pre-RoPE scheme")
        start = 0 if fresh else state.length
        self.check_input(state, k, v)
        self.check_finite(state, k, v)
        t = k.shape[2]
        new_pos = torch.arange(start, start + t, device=k.device)
        if start:
            old_k, old_v, old_pos = self.held(state)
            keys, values, key_pos = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2), torch.cat([old_pos, new_pos])
        else:
            keys, values, key_pos = k, v, new_pos
        keep = window_mask(new_pos, key_pos, self.sink, self.recent)
        if attn_mask is not None:
            given = attn_mask.index_select(-1, key_pos)
            given = given if given.dtype == torch.bool else ~torch.isneginf(given)
            keep = keep & given
        attend = prompt_attention if softcap is None else dense_attention
        out = attend(q, keys, values, scale=scale, causal=False, attn_mask=keep, softcap=softcap)
        self._append(state, k, v, start)
        state.length_tensor.fill_(start + t)
        return out

    # -- a decode step recorded in a CUDA graph ---------------------------------------------------
    def captured_step(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary=None,
                      scale: float | None, causal: bool, attn_mask: torch.Tensor | None,
                      softcap: float | None) -> torch.Tensor:
        """:meth:`step` for one new token at the device length (no host reads): see :meth:`store_attend_at`."""
        out = self.store_attend_at(state, q, k, v, scale=scale, attn_mask=attn_mask, softcap=softcap)
        state.length_tensor += 1
        return out

    def store_attend_at(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        scale: float | None, attn_mask: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
        """Store one new token k, v (B, H, 1, D) at position p = the device length (the length is left as
        it is), then attend q (B, Hq, 1, D) over the sink and the ring, slots not yet written hidden. Storing
        first is safe: the slot it takes held position p - recent, which p's window no longer sees.
        ``attn_mask``: a static cache's (B, 1|Hq, 1, W), every position from 0. Returns (B, Hq, 1, D)."""
        self.store_at(state, k, v)
        p = state.length_tensor
        device = k.device
        sink = torch.arange(self.sink, device=device)
        slot = torch.arange(self.recent, device=device)
        ring = p - torch.remainder(p - self.sink - slot, self.recent)      # the position each slot holds
        positions = torch.cat([sink, ring])
        visible = torch.cat([sink <= p, ring >= self.sink])[None, :]
        keys = torch.cat([state["k_sink"], state["k_ring"]], 2) if self.sink else state["k_ring"]
        values = torch.cat([state["v_sink"], state["v_ring"]], 2) if self.sink else state["v_ring"]
        return visible_attention(q, keys, values, visible, scale=scale, attn_mask=key_columns(attn_mask, positions),
                                 softcap=softcap)

    def store_at(self, state: KVState, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new token k, v (B, H, 1, D) at the device length (left as it is), without host reads:
        NaN/inf set the device flag :mod:`kvpass.graphs` reports after a replay."""
        if k.shape[2] != 1:
            raise KVPassError(f"a streaming ring records decode steps of one token in a CUDA graph, got "
                              f"{k.shape[2]}; run multi-token steps eagerly")
        flag_new_tokens(state.length_tensor, k, v, None)
        self._store_at(state, k, v, state.length_tensor)

    def _store_at(self, state: KVState, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> None:
        """One token (B, H, 1, D) at device position p (0-d int64): into sink slot p while p < sink, else ring
        slot (p - sink) % recent; the other buffer's slot gets its own value back (no host branch)."""
        in_sink = p < self.sink
        if self.sink:
            row = p.clamp(max=self.sink - 1).reshape(1)
            for name, x in (("k_sink", k), ("v_sink", v)):
                state[name].index_copy_(2, row, torch.where(in_sink, x, state[name].index_select(2, row)))
        row = torch.remainder(p - self.sink, self.recent).reshape(1)
        for name, x in (("k_ring", k), ("v_ring", v)):
            state[name].index_copy_(2, row, torch.where(in_sink, state[name].index_select(2, row), x))
