"""MILLION: outlier-immune product quantization of the KV cache (Wang et al., 2025, arXiv:2504.03661).

Each K and V head vector is split into M = D / c subspaces; each subspace stores the 8-bit index of its
nearest of 256 centroids (k-means on calibration activations, no Fisher weighting). ``bits`` per element
= 8 / c: 4 bits = M = D/2, 2 bits = M = D/4. Non-uniform centroids absorb outlier channels, so there are
no scales, zero-points or sparse outliers. Keys are taken after RoPE; the newest ``residual`` tokens stay
in full precision, and so does the first token (``sink=1``, our choice as KVQuant's: on SmolLM2 the
quantized attention sink alone cost +2% perplexity at 4 bits). Decode attention never dequantizes keys:
it scores them through a per-query table LUT[m][j] = q_m . centroid_j and gathers values from the
codebook (see :mod:`._vq`).
Our reading: codebooks are per layer by default (shared by the layer's KV heads); ``codebook="head"``
gives each KV head its own and ``codebook="model"`` learns one on all layers' samples, as the released
code does (each layer's cache still holds, and counts, its copy).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError
from . import register
from ._vq import ChannelGroupVQ


@register
@dataclass
class Million(ChannelGroupVQ):
    """Product quantization with 256-centroid subspace codebooks: ``bits`` per element in {1, 2, 4, 8}."""

    name = "million"
    bits: int = 4
    test_variants = ({"bits": 4, "residual": 4, "sink": 2}, {"bits": 2, "residual": 0, "codebook": "head"},
                     {"bits": 4, "residual": 0, "codebook": "model", "sink": 0})

    def validate(self) -> None:
        super().validate()
        if self.bits not in (1, 2, 4, 8):
            raise OptionError(f"million: bits must be 1, 2, 4 or 8 (8-bit codes over 8/bits channels), "
                              f"got {self.bits!r}")

    @property
    def vq_channels(self) -> int:
        return 8 // self.bits

    @property
    def vq_bits(self) -> int:
        return 8
