"""kvpass.patterns: the attention pattern library.

:func:`find_sites` finds every attention in an FX graph — Dynamo (torch-level) or torch.export (aten) —
however it was written, and brings each to one canonical :class:`AttentionSite`: q, the new k/v, where
past k/v come from, heads, kv-heads, head_dim, scale, mask, soft-cap and RoPE. Matching is on semantics
(op kinds and shape relations, see :mod:`.ops`), not on one model's op sequence.
"""

from __future__ import annotations

import re
from collections import Counter

from torch.fx import Graph, Node

from .ops import kind, shape, users
from .sdpa import match_sdpa
from .site import AttentionSite
from .softmax import match_softmax
from .tensors import find_kv_source, find_rope, strip, unwind_gqa

MATCHERS = (match_sdpa, match_softmax)


def find_sites(graph: Graph) -> list[AttentionSite]:
    """Every attention site of ``graph`` in graph order; sites that cannot be rewritten carry
    ``problem`` (the reason) instead of being dropped."""
    sites = []
    for node in graph.nodes:
        for matcher in MATCHERS:
            site = matcher(node)
            if site is not None:
                _complete(site)
                sites.append(site)
                break
    return sites


def _complete(site: AttentionSite) -> None:
    """Fill geometry, GQA form, KV source and RoPE of a matched site; record a problem if any."""
    site.module = module_path(site.node)
    if site.q is None or site.k is None or site.v is None:
        site.fail("could not identify q, k and v")
        return
    qs = shape(site.q)
    if qs is None or len(qs) != 4:
        site.fail(f"query is {len(qs) if qs else '?'}-D; kvpass handles (batch, heads, tokens, head_dim) "
                  f"attention (3-D bmm forms over batch*heads are not supported yet)")
        return
    site.path_nodes.add(site.node)
    k, gk = unwind_gqa(site.k, site.path_nodes)
    v, gv = unwind_gqa(site.v, site.path_nodes)
    if site.gqa == "none":
        site.gqa = gk if gk != "none" else gv
    for x in (k, v):
        if len(shape(x) or ()) != 4:
            site.fail("keys/values are not 4-D (batch, kv_heads, tokens, head_dim) tensors")
            return
    find_kv_source(site, k, v, qs[2])
    if site.problem is not None:
        return
    # geometry from the new tokens' projections: a cache buffer's dims may be symbolic under dynamic shapes
    ks, vs = shape(site.k_new), shape(site.v_new)
    site.heads, site.kv_heads, site.head_dim, site.v_head_dim = _ints(qs[1], ks[1], ks[3], vs[3])
    if None in (site.heads, site.kv_heads, site.head_dim, site.v_head_dim):
        site.fail("heads or head_dim are symbolic; kvpass needs static head counts and sizes")
        return
    if site.heads % site.kv_heads:
        site.fail(f"{site.heads} query heads are not a multiple of {site.kv_heads} kv heads")
        return
    if site.head_dim != site.v_head_dim:
        site.fail(f"keys have {site.head_dim} channels but values {site.v_head_dim}; kvpass schemes "
                  f"need one head_dim")
        return
    find_rope(site)
    _check_private(site, k, v)


def _check_private(site: AttentionSite, k: Node, v: Node) -> None:
    """The keys/values may feed the attention and the model's own cache (graph outputs, possibly through
    views: a sliding-window cache stores only a slice), but no other computation: that would read a
    cache kvpass no longer keeps in full."""
    targets = [k, v] + ([site.k_new, site.v_new] if site.kv_source == "concat" else [])
    for t in targets:
        for user in users(t):
            if user.op == "output" or user in site.path_nodes or kind(user) in ("cat", "index_copy_", "size"):
                continue
            if _only_feeds(user, site.path_nodes):
                continue
            stored = _stored_view(user)
            if stored is not None:
                site.cache_window = site.cache_window or stored
                continue
            site.fail(f"{t.name} is also used by {user.name} ({user.target}) outside the attention")
            return


VIEWS = ("identity", "getitem", "slice", "reshape", "transpose", "unsqueeze")


def _stored_view(node: Node, depth: int = 6) -> bool | None:
    """If node is a chain of views whose only consumer is the graph output (the model storing its
    cache), return whether the chain slices the token dimension (a truncating, sliding-window cache);
    None if the chain feeds anything else."""
    sliced = False
    for _ in range(depth):
        if node.op == "output":
            return sliced
        if kind(node) not in VIEWS or len(users(node)) != 1:
            return None
        if kind(node) in ("getitem", "slice"):
            sliced = True
        (node,) = users(node)
    return None


def _only_feeds(node: Node, path: set, depth: int = 6) -> bool:
    """Whether node is a view/cast chain that only leads into the attention path."""
    for _ in range(depth):
        if node in path:
            return True
        if len(users(node)) != 1 or kind(node) not in ("identity", "to", "reshape", "expand", "getitem",
                                                        "unsqueeze", "transpose", "permute", "repeat_interleave"):
            return False
        (node,) = users(node)
    return node in path


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^L(\[[^\]]*\])+\.?", "", path).replace("L__self___", "")


def _ints(*xs):
    return tuple(x if isinstance(x, int) else None for x in xs)


def unmatched_softmax(graph: Graph, sites: list[AttentionSite]) -> list[Node]:
    """Softmax nodes whose probabilities feed a matrix product but belong to no site: attention-like
    code the library did not recognize (or a lookalike). Reported, never rewritten."""
    covered = set().union(*(s.path_nodes for s in sites)) if sites else set()
    out = []
    for n in graph.nodes:
        if kind(n) == "softmax" and n not in covered:
            x, seen = n, 0
            while len(users(x)) == 1 and kind(users(x)[0]) in ("to", "identity", "dropout") and seen < 4:
                x, seen = users(x)[0], seen + 1
            if any(kind(u) in ("matmul", "bmm", "einsum") for u in users(x)):
                out.append(n)
    return out


def describe_graph(graph: Graph) -> str:
    """A one-line census of the ops that attention is made of, for 'no attention found' messages."""
    counts = Counter(kind(n) for n in graph.nodes)
    keys = ("sdpa", "softmax", "matmul", "bmm", "baddbmm", "einsum", "cat", "index_copy_")
    found = ", ".join(f"{counts[k]} {k}" for k in keys if counts[k])
    return found or "no softmax, matmul or attention op at all"


__all__ = ["AttentionSite", "describe_graph", "find_sites", "strip", "unmatched_softmax"]
