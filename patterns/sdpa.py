"""Attention written as one ``scaled_dot_product_attention`` call."""

from __future__ import annotations

import torch
from torch.fx import Node

from .ops import arg, dtype, kind, shape
from .site import AttentionSite
from .softmax import scalar_value


def match_sdpa(node: Node) -> AttentionSite | None:
    """A site for an sdpa call: q/k/v as given (expansion is unwound later), mask, causality, scale."""
    if kind(node) != "sdpa":
        return None
    site = AttentionSite(node=node, pattern="sdpa")
    site.q, site.k, site.v = node.args[0], arg(node, 1, "key"), arg(node, 2, "value")
    site.mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    site.causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    site.scale = None if scale is None else scalar_value(scale)
    if scale is not None and site.scale is None:
        site.fail(f"attention scale {scale} is not a constant")
    if node.kwargs.get("enable_gqa"):
        site.gqa = "enable_gqa"
    if site.mask is not None:
        site.mask_form = "keep" if _is_bool(site.mask) else "additive"
    if isinstance(dropout, Node) or (dropout or 0.0) != 0.0:
        site.fail(f"attention dropout p={dropout} is active (kvpass rewrites inference graphs only)")
    if shape(site.q) is None or len(shape(site.q)) != 4:
        site.fail("query is not a 4-D (batch, heads, tokens, head_dim) tensor")
    return site


def _is_bool(node) -> bool:
    return dtype(node) == torch.bool
