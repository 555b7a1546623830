"""DuoAttention's head policy (Xiao et al., 2024): retrieval heads keep the whole context in any scheme,
streaming heads keep only the attention sink and the recent tokens.

Which KV heads are which comes from the gates :func:`kvpass.calibrate` (method "duo") learns: the ``ratio``
fraction of heads with the highest gates, over all layers, are retrieval heads (:func:`kvpass.duo.
retrieval_heads`). Each layer's cache holds two parts under one length: the retrieval heads' cache of the
``inner`` scheme (buffers ``retrieval.*``, sized for the capacity) and the streaming heads' ring
(:class:`~kvpass.methods.streaming.StreamingRing`, buffers ``streaming.*``, constant size). Heads are
indexed, not reordered: each call gathers the query heads of either group (GQA: a KV head's whole group
goes with it), attends them in their part and scatters the outputs back, so the model's weights and the
inner scheme's kernels stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import KVPassError, OptionError, ShapeError
from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme
from .streaming import StreamingRing


@register
@dataclass
class DuoHeads(Scheme):
    """Retrieval heads in ``inner`` (default fp16), streaming heads in a sink + recent ring; ``gates`` is the
    duo calibration, ``ratio`` the fraction of retrieval heads, sink/recent default to the calibration's."""

    name = "duo"
    policy: ClassVar[bool] = True
    inner: Scheme | None = None
    gates: object = None            # a kvpass.Calibration of method "duo"
    ratio: float = 0.5
    sink: int | None = None
    recent: int | None = None

    def validate(self) -> None:
        from ..duo import retrieval_heads
        if self.gates is None or getattr(self.gates, "method", None) != "duo":
            raise OptionError("heads='duo' needs DuoAttention gates for this model: "
                              "gates = kvpass.calibrate(model, 'duo', tokenizer=...) (or a saved gates directory)")
        if self.inner is None:
            from . import get_scheme
            self.inner = get_scheme("fp16")
        if self.inner.policy:
            raise OptionError(f"duo's retrieval heads need a compression scheme, not the {self.inner.name} policy")
        opts = self.gates.options
        self.sink = opts.get("sink", 64) if self.sink is None else self.sink
        self.recent = opts.get("recent", 256) if self.recent is None else self.recent
        self.ring = StreamingRing(sink=self.sink, recent=self.recent)
        layers = self.gates.layers()
        if layers != list(range(len(layers))):
            raise OptionError(f"the duo gates must cover layers 0..n-1, they cover {layers}")
        table = torch.stack([self.gates.layer(i)["gates"].float() for i in layers])
        self.retrieval = retrieval_heads(table, self.ratio)          # (layers, kv heads) bool
        self._index: dict = {}

    @property
    def key_space(self) -> str:         # the retrieval part decides what append() receives
        return self.inner.key_space

    def options(self) -> dict:
        return {"inner": self.inner, "gates": self.gates, "ratio": self.ratio, "sink": self.sink,
                "recent": self.recent}

    def describe(self) -> str:
        n, total = int(self.retrieval.sum()), self.retrieval.numel()
        return (f"duo({n}/{total} retrieval heads in {self.inner.describe()}, streaming: sink={self.sink} "
                f"recent={self.recent})")

    # -- geometry -----------------------------------------------------------------------------
    def heads(self, layer: int, kv_heads: int) -> tuple[list[int], list[int]]:
        """(retrieval, streaming) KV-head numbers of ``layer``; raises ShapeError for gates of another
        geometry."""
        if not 0 <= layer < self.retrieval.shape[0]:
            raise ShapeError(f"the duo gates cover {self.retrieval.shape[0]} layers; this model has a layer "
                             f"{layer} (gates made for another model?)")
        if kv_heads != self.retrieval.shape[1]:
            raise ShapeError(f"the duo gates have {self.retrieval.shape[1]} KV heads per layer; layer {layer} "
                             f"has {kv_heads} (gates made for another model?)")
        row = self.retrieval[layer].tolist()
        return [h for h, r in enumerate(row) if r], [h for h, r in enumerate(row) if not r]

    def _parts_shapes(self, shape: CacheShape) -> tuple[CacheShape | None, CacheShape | None]:
        ret, stream = self.heads(shape.layer, shape.kv_heads)
        sub = lambda n: CacheShape(shape.batch, n, shape.head_dim, shape.capacity, shape.dtype,  # noqa: E731
                                   shape.layer) if n else None
        return sub(len(ret)), sub(len(stream))

    def check_shape(self, shape: CacheShape) -> None:
        ret, stream = self._parts_shapes(shape)
        if ret is not None:
            self.inner.check_shape(ret)
        if stream is not None:
            self.ring.check_shape(stream)

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        ret, stream = self._parts_shapes(shape)
        specs = {}
        if ret is not None:
            specs |= {f"retrieval.{n}": s for n, s in self.inner.full_layout(ret).items()}
        if stream is not None:
            specs |= {f"streaming.{n}": s for n, s in self.ring.full_layout(stream).items()}
        return specs

    def full_layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        return self.layout(shape)         # the inner scheme's RoPE buffers are already in its part

    def parts(self, state: KVState) -> tuple[KVState | None, KVState | None]:
        """The retrieval and streaming parts of ``state`` as states of their own (sharing its buffers and
        length); None for an empty group."""
        ret, stream = self._parts_shapes(state.shape)

        def part(prefix, scheme, shape):
            if shape is None:
                return None
            bufs = {n[len(prefix):]: t for n, t in state.buffers.items() if n.startswith(prefix)}
            sub = KVState(scheme, shape, bufs, state.device, length_tensor=state.length_tensor)
            sub.rotary_dims = state.rotary_dims
            return sub
        return part("retrieval.", self.inner, ret), part("streaming.", self.ring, stream)

    def initialize(self, state: KVState) -> None:
        ret, _ = self.parts(state)
        if ret is not None:
            self.inner.initialize(ret)

    def head_maps(self, layer: int, kv_heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(retrieval, streaming) kv heads of ``layer`` as int32 tensors on ``device`` (the one-launch
        kernel's head maps), cached."""
        key = ("int32", layer, kv_heads, str(device))
        if key not in self._index:
            self._index[key] = tuple(torch.tensor(x, dtype=torch.int32, device=device)
                                     for x in self.heads(layer, kv_heads))
        return self._index[key]

    def _one_launch(self, state: KVState, q: torch.Tensor, attn_mask, softcap) -> bool:
        """Whether a decode step of this layer attends both head groups in one kernel call
        (:mod:`kvpass.codegen.duo`: KIVI retrieval heads; a layer with heads in both groups)."""
        if q.shape[2] != 1 or not q.is_cuda:
            return False
        ret, stream = self._parts_shapes(state.shape)
        if ret is None or stream is None:
            return False
        from ..codegen import kernel_applies
        return kernel_applies(self, q, attn_mask, None, softcap)

    def _indices(self, layer: int, kv_heads: int, q_heads: int, device) -> tuple:
        """(retrieval kv, streaming kv, retrieval q, streaming q) head indices on ``device``, cached."""
        key = (layer, kv_heads, q_heads, str(device))
        if key not in self._index:
            ret, stream = self.heads(layer, kv_heads)
            group = q_heads // kv_heads
            q_of = lambda hs: [h * group + j for h in hs for j in range(group)]  # noqa: E731
            self._index[key] = tuple(torch.tensor(x, dtype=torch.long, device=device)
                                     for x in (ret, stream, q_of(ret), q_of(stream)))
        return self._index[key]

    # -- storing and attending ----------------------------------------------------------------
    def _ring_keys(self, k: torch.Tensor, start: int | torch.Tensor, rotary) -> torch.Tensor:
        """The streaming heads' new keys k (B, H, T, D) as the ring keeps them: after RoPE. A pre-RoPE inner
        scheme hands them over unrotated, so they are rotated at positions start.. (a host int, or the
        device length while a CUDA graph records)."""
        if self.key_space != "pre_rope":
            return k
        from ..rotary import apply_rotary
        if rotary is None:
            raise ShapeError(f"{self.inner.name} caches keys before RoPE: storing the streaming heads needs the "
                             f"model's rotary parameters (the streaming ring keeps rotated keys)")
        positions = start + torch.arange(k.shape[2], device=k.device)
        return apply_rotary(k, positions, rotary.inv_freq, rotary.scale)

    def append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, rotary=None) -> None:
        """Store k, v (B, H, T, D): retrieval heads into the inner scheme (its capacity applies), streaming
        heads into the ring (pre-RoPE keys are rotated for the ring first)."""
        self.check_input(state, k, v)
        start, t = state.length, k.shape[2]
        ret, stream = self.parts(state)
        kr, ks, _, _ = self._indices(state.shape.layer, k.shape[1], k.shape[1], k.device)
        if stream is not None:
            k_stream = self._ring_keys(k.index_select(1, ks), start, rotary)
            self.check_finite(stream, k_stream, v.index_select(1, ks))
            self.ring._append(stream, k_stream, v.index_select(1, ks), start)
        if ret is not None:
            self.inner.append(ret, k.index_select(1, kr), v.index_select(1, kr), rotary=rotary)
        else:
            state.length_tensor += t

    def step(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_pre: torch.Tensor | None,
             rotary=None, fresh: bool, scale: float | None, causal: bool, attn_mask: torch.Tensor | None,
             softcap: float | None) -> torch.Tensor:
        """:meth:`Scheme.step` per head group: the streaming heads' queries attend through their ring (which
        then stores their keys), the retrieval heads' through the inner scheme; outputs go back to their
        heads. Returns (B, Hq, T, D) in q.dtype."""
        self.check_input(state, k, v)
        if not fresh and self._one_launch(state, q, attn_mask, softcap):
            self.append(state, k if k_pre is None else k_pre, v, rotary=rotary)
            from ..codegen import try_attend
            return try_attend(self, state, q, scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
        ret, stream = self.parts(state)
        kr, ks, qr, qs = self._indices(state.shape.layer, k.shape[1], q.shape[1], q.device)
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        kw = dict(fresh=fresh, scale=scale, causal=causal, softcap=softcap)
        length = 0 if fresh else state.length
        if stream is not None:
            mask = None if attn_mask is None else _heads(attn_mask, qs)
            o = self.ring.step(stream, q.index_select(1, qs), k.index_select(1, ks), v.index_select(1, ks),
                               attn_mask=mask, **kw)
            out.index_copy_(1, qs, o)
            state.length_tensor.fill_(length)         # the retrieval part (if any) advances it
        if ret is not None:
            mask = None if attn_mask is None else _heads(attn_mask, qr)
            o = self.inner.step(ret, q.index_select(1, qr), k.index_select(1, kr), v.index_select(1, kr),
                                k_pre=None if k_pre is None else k_pre.index_select(1, kr), rotary=rotary,
                                attn_mask=mask, **kw)
            out.index_copy_(1, qr, o)
        else:
            state.length_tensor.fill_(length + k.shape[2])
        return out

    def captured_step(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary=None,
                      scale: float | None, causal: bool, attn_mask: torch.Tensor | None,
                      softcap: float | None) -> torch.Tensor:
        """:meth:`step` of one decode token while a CUDA graph records (no host reads): the streaming heads
        store and attend in their ring at the device length, then the retrieval heads take the inner scheme's
        captured step (which advances the shared length). k: the inner scheme's keys (pre-RoPE for a pre-RoPE
        scheme; the ring gets them rotated). Returns (B, Hq, 1, D) in q.dtype."""
        ret, stream = self.parts(state)
        kr, ks, qr, qs = self._indices(state.shape.layer, k.shape[1], q.shape[1], q.device)
        if self._one_launch(state, q, attn_mask, softcap):
            self.ring.store_at(stream, self._ring_keys(k.index_select(1, ks), state.length_tensor, rotary),
                               v.index_select(1, ks))
            self.inner.append(ret, k.index_select(1, kr), v.index_select(1, kr), rotary=rotary)   # advances the length
            from ..codegen import try_attend
            return try_attend(self, state, q, scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        if stream is not None:
            k_stream = self._ring_keys(k.index_select(1, ks), state.length_tensor, rotary)
            mask = None if attn_mask is None else _heads(attn_mask, qs)
            out.index_copy_(1, qs, self.ring.store_attend_at(stream, q.index_select(1, qs), k_stream,
                                                             v.index_select(1, ks), scale=scale, attn_mask=mask,
                                                             softcap=softcap))
        if ret is not None:
            mask = None if attn_mask is None else _heads(attn_mask, qr)
            out.index_copy_(1, qr, self.inner.captured_step(ret, q.index_select(1, qr), k.index_select(1, kr),
                                                            v.index_select(1, kr), rotary=rotary, scale=scale,
                                                            causal=causal, attn_mask=mask, softcap=softcap))
        else:
            state.length_tensor += k.shape[2]
        return out

    def attend(self, state: KVState, q: torch.Tensor, **kw) -> torch.Tensor:
        """Decode-step attention of the newest position (q: (B, Hq, 1, D)) after :meth:`append`."""
        ret, stream = self.parts(state)
        kv_heads = state.shape.kv_heads
        _, _, qr, qs = self._indices(state.shape.layer, kv_heads, q.shape[1], q.device)
        out = q.new_empty(q.shape)
        mask = kw.pop("attn_mask", None)
        for part, scheme, idx in ((ret, self.inner, qr), (stream, self.ring, qs)):
            if part is not None:
                m = None if mask is None else _heads(mask, idx)
                out.index_copy_(1, idx, scheme.attend(part, q.index_select(1, idx), attn_mask=m, **kw))
        return out

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        raise KVPassError("a duo cache holds the whole context only for its retrieval heads; decode its parts "
                          "(DuoHeads.parts) instead")

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise KVPassError("duo drops the streaming heads' middle tokens: it has no element-wise error bound")


def _heads(mask: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """A mask (B, 1|Hq, T, S) restricted to the query heads ``q_index`` (a per-head mask) or left as is."""
    return mask if mask.dim() < 4 or mask.shape[1] == 1 else mask.index_select(1, q_index)
