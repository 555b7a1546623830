"""CQ: coupled quantization, down to 1 bit per channel (Zhang et al., 2024, arXiv:2405.03917).

Channels of a key or value vector are strongly dependent, so ``channels`` contiguous channels are
quantized jointly: each channel group stores one ``code_bits``-bit index into a codebook of 2**code_bits
centroids, learned per layer and channel group by k-means weighted with Fisher information (squared
gradients of the LM loss). Cost code_bits / channels bits per element: 2c8b = 4, 4c8b = 2, 8c8b = 1,
8c10b = 1.25. No scales or zero-points; the newest ``residual`` tokens and the first ``sink`` token (the
attention sink) stay in full precision.
[unverified in METHODS.md] whether keys are taken before RoPE: ``pre_rope`` selects it (the calibration
must match); kvpass's quality bench measures both and keeps post-RoPE keys as the default when it is not
worse, since post-RoPE codes are scored through the lookup table without decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from ._vq import ChannelGroupVQ
from .base import require_int


@register
@dataclass
class CQ(ChannelGroupVQ):
    """Coupled quantization: ``channels`` per group x ``code_bits`` per code (e.g. 8c8b = 1 bit/channel)."""

    name = "cq"
    channels: int = 4
    code_bits: int = 8
    pre_rope: bool = False
    fisher_weighted = True
    test_variants = ({"channels": 4, "code_bits": 8, "residual": 4, "sink": 1},
                     {"channels": 8, "code_bits": 5, "residual": 0},
                     {"channels": 2, "code_bits": 4, "residual": 4, "pre_rope": True})

    def validate(self) -> None:
        super().validate()
        require_int(self.name, "channels", self.channels, 1, 64)
        require_int(self.name, "code_bits", self.code_bits, 1, 12)

    @property
    def key_space(self) -> str:           # instance-level: set by the pre_rope option
        return "pre_rope" if self.pre_rope else "post_rope"

    @property
    def vq_channels(self) -> int:
        return self.channels

    @property
    def vq_bits(self) -> int:
        return self.code_bits
