"""The canonical attention site every pattern reduces to."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch.fx import Node


@dataclass
class AttentionSite:
    """One attention computation found in a graph, in canonical form.

    ``node`` produces the attention output (B, heads, Tq, v_head_dim). ``q`` is (B, heads, Tq, head_dim);
    ``k_new``/``v_new`` are the keys/values of the new tokens (B, kv_heads, Tq, head_dim) and
    ``past_k``/``past_v`` where the earlier ones come from, per ``kv_source``:
    "concat" (cat([past, new]) along tokens), "static" (written into a preallocated buffer at
    ``cache_position``) or "none" (no past: the keys are exactly the new tokens).
    ``mask`` is over key positions and is "additive", "keep" (bool, True = attend) or "drop"
    (bool, True = masked). ``problem`` says why the site cannot be rewritten (None if it can).
    """

    node: Node
    pattern: str
    q: Node | None = None
    k: Node | None = None                 # keys as attention consumed them, before GQA expansion
    v: Node | None = None
    gqa: str = "none"
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    scale: float | Node | None = None      # None: 1/sqrt(head_dim)
    mask: Node | None = None
    mask_form: str = "none"
    causal: bool = False
    softcap: float | None = None
    sinks: Node | None = None             # learned per-head logits joining the softmax, (B, heads, Tq, 1)
    kv_source: str = "unknown"
    k_new: Node | None = None
    v_new: Node | None = None
    past_k: Node | None = None
    past_v: Node | None = None
    cache_position: Node | None = None
    k_write: Node | None = None           # static caches: the index_copy_ that writes the new keys
    v_write: Node | None = None
    rope: str = "none"                    # how rotary reached k_new: "rotate_half", "partial", "none"
    k_pre_rope: Node | None = None        # the key before RoPE (B, kv_heads, T, head_dim)
    rope_inv_freq: Node | None = None     # the model's rotary frequencies (rotated_dims/2,)
    rope_scale: float = 1.0
    cache_window: bool = False            # the model keeps only a slice of its cache (sliding window)
    module: str = ""
    problem: str | None = None
    path_nodes: set = field(default_factory=set, repr=False)   # nodes computing attention from q/k/v

    @property
    def layer(self) -> int | None:
        """Layer number parsed from the module path ("model.layers.3.self_attn" -> 3), if any."""
        nums = re.findall(r"\.(\d+)(?:\.|$)", "." + self.module)
        return int(nums[-1]) if nums else None

    def fail(self, reason: str) -> "AttentionSite":
        if self.problem is None:
            self.problem = reason
        return self
