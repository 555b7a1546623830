"""The compressed caches a compiled model owns: one KVState per attention site, allocated on demand."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .methods import CacheShape, KVState, Scheme


@dataclass(frozen=True)
class SiteGeometry:
    """What a site's cache needs besides the batch size (known only when the model runs)."""

    key: str
    layer: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


class CacheManager:
    """Owns the compressed KV states of a compiled model, keyed by attention site.

    States are allocated at ``capacity`` tokens the first time a site runs with a given batch size and
    reused afterwards (a new sequence resets the fill length, not the memory).
    """

    def __init__(self, scheme: Scheme, capacity: int):
        self.scheme = scheme
        self.capacity = capacity
        self.sites: dict[str, SiteGeometry] = {}
        self.states: dict[str, KVState] = {}

    def register(self, geometry: SiteGeometry) -> None:
        self.sites[geometry.key] = geometry

    def state(self, key: str, batch: int) -> KVState:
        """The state of site ``key`` for ``batch`` sequences, allocated (or re-allocated) as needed."""
        g = self.sites[key]
        st = self.states.get(key)
        if st is None or st.shape.batch != batch or st.shape.capacity != self.capacity:
            shape = CacheShape(batch, g.kv_heads, g.head_dim, self.capacity, g.dtype, g.layer)
            self.states.pop(key, None)      # free the old buffers before allocating new ones
            st = self.scheme.allocate(shape, g.device)
            self.states[key] = st
        return st

    def buffers(self, key: str, batch: int) -> list[torch.Tensor]:
        """The tensors a rewritten graph passes to ``kvpass::attention`` for this site: the state's
        buffers in name order, then its length tensor."""
        st = self.state(key, batch)
        return [st.buffers[n] for n in sorted(st.buffers)] + [st.length_tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of every allocated compressed buffer across sites."""
        return sum(st.nbytes for st in self.states.values())
