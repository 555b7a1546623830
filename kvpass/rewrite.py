"""Rewrite one canonical attention site of an FX graph into a ``kvpass::attention`` call.

Before:   past ─┐
          k_new ┴─ cat ──▶ (GQA expand) ──▶ attention(q, ·, ·) ──▶ out
                     └──▶ graph output (the model stores it as its cache)
After:    kvpass::attention(buffers, length, q, k_new, v_new, start, mask, ...) ──▶ out
          new_zeros(()).expand(B, Hkv, start + T, D) ──▶ graph output
The model's own cache then holds shape-only placeholders (one element of memory each), so the model's
cache bookkeeping (sequence length, masks) keeps working while the data lives in kvpass's buffers.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from .patterns import AttentionSite
from .patterns.ops import dtype as node_dtype
from .patterns.ops import fake, kind, shape

aten = torch.ops.aten


def rewrite_site(graph: Graph, site: AttentionSite, spec: str, n_buffers: int, tag: str,
                 pre_rope: bool = False, shared_masks: dict | None = None) -> list[Node]:
    """Replace ``site`` in ``graph``; returns the placeholders added for the site's cache tensors
    (``n_buffers`` buffers, then the length), which the caller must feed at run time. ``pre_rope``:
    the scheme caches keys before RoPE, so the op also gets them and the rotary frequencies.
    ``shared_masks`` (one dict per graph, for graphs Inductor compiles): sites reading the same mask get one
    ``kvpass::shared_mask`` of it (see there)."""
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_ph):
        holders = []
        for i in reversed(range(n_buffers + 1)):
            holders.insert(0, graph.placeholder(f"kvpass_{tag}_{i}"))
    with graph.inserting_before(site.node):
        if site.kv_source == "static":
            start = graph.call_function(aten.select.int, (site.cache_position, 0, 0))
        else:
            start = graph.call_function(torch.full, ([], _past_length(graph, site)),
                                        {"dtype": torch.int64, "device": fake(site.q).device})
        mask = _site_mask(graph, site, shared_masks)
        sinks = None
        if site.sinks is not None:       # (B, H, Tq, 1), one value per head -> (H,)
            sinks = site.sinks
            for dim in (0, 1, 1):
                sinks = graph.call_function(aten.select.int, (sinks, dim, 0))
        out = graph.call_function(torch.ops.kvpass.attention.default, (
            holders[:-1], holders[-1], site.q, site.k_new, site.v_new, start, mask,
            float(site.scale if site.scale is not None else site.head_dim ** -0.5),
            bool(site.causal), float(site.softcap or 0.0), bool(site.cache_window),
            (site.k_pre_rope if site.rope != "none" else site.k_new) if pre_rope else None,
            site.rope_inv_freq if pre_rope else None, float(site.rope_scale), spec, sinks))
        want = node_dtype(site.node)
        if want is not None and want != node_dtype(site.q):
            out = graph.call_function(torch.ops.aten._to_copy.default, (out,), {"dtype": want})
    site.node.replace_all_uses_with(out)
    dead = {site.node} | site.path_nodes
    for write in (site.k_write, site.v_write):   # the model's static buffers no longer get the tokens
        if write is not None and not write.users:
            graph.erase_node(write)
    dead |= _ghost_cache_outputs(graph, site)
    _prune(graph, dead)
    return holders


def _site_mask(graph: Graph, site: AttentionSite, shared: dict | None) -> Node | None:
    """The mask node the op reads: the site's, negated for a "drop" mask (True = hidden), and with
    ``shared`` given, one ``kvpass::shared_mask`` node per distinct mask, placed right after it."""
    if site.mask is None:
        return None
    key = (site.mask, site.mask_form == "drop")
    if shared is not None and key in shared:
        return shared[key]
    where = site.mask
    if where.op == "placeholder":
        where = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(where):
        mask = site.mask
        if site.mask_form == "drop":
            mask = graph.call_function(torch.logical_not, (mask,))
        if shared is not None:
            with graph.inserting_after(mask):
                mask = shared[key] = graph.call_function(torch.ops.kvpass.shared_mask.default, (mask,))
    return mask


def _prune(graph: Graph, candidates: set) -> None:
    """Erase the replaced attention's nodes (and what only they used) once nothing reads them.

    Only nodes the rewrite made dead are touched: a blanket dead-code pass could drop other sites'
    nodes or in-place ops FX does not know to be side-effecting."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in candidates and not node.users and node.op in ("call_function", "call_method"):
                inputs = [a for a in node.all_input_nodes if a.op in ("call_function", "call_method")]
                graph.erase_node(node)
                candidates.discard(node)
                candidates.update(a for a in inputs if _is_view_or_pure(a))
                changed = True


def _is_view_or_pure(node: Node) -> bool:
    return kind(node) in ("identity", "to", "reshape", "expand", "getitem", "unsqueeze", "transpose",
                          "permute", "repeat_interleave", "cat", "mul", "div", "add", "neg", "slice")


def _past_length(graph: Graph, site: AttentionSite):
    """A graph value for the number of tokens before the new ones."""
    past = site.past_k
    if site.kv_source == "concat" and len(shape(past) or ()) == 4:
        return graph.call_function(aten.sym_size.int, (past, 2))
    return 0          # no past, or the empty placeholder a lazily initialized cache concatenates


def _ghost_cache_outputs(graph: Graph, site: AttentionSite) -> set:
    """Give the model's own cache shape-only placeholders instead of full K/V tensors.

    What the model stores (graph outputs, or views of them such as a sliding window's last tokens) now
    reads an expanded one-element tensor of the shape the dense cache would have had. Returns the cache
    tensors replaced (now dead unless something else reads them).
    """
    op = torch.ops.kvpass.attention.default
    replaced = set()
    for past, new in ((site.past_k, site.k_new), (site.past_v, site.v_new)):
        if site.kv_source == "concat":
            holder = next((u for u in new.users if u.op == "call_function" and u.target is torch.cat), None)
        else:
            holder = new if site.kv_source == "none" else None
        if holder is None:
            continue
        if holder is not new:
            replaced.add(holder)
        stores = [u for u in holder.users if u.target is not op and not _is_size(u)]
        if not stores:
            continue
        with graph.inserting_before(holder.next):
            b = graph.call_function(aten.sym_size.int, (new, 0))
            total = graph.call_function(aten.sym_size.int, (new, 2))
            if holder is not new and len(shape(past) or ()) == 4:
                total = graph.call_function(operator.add, (graph.call_function(aten.sym_size.int, (past, 2)), total))
            zero = graph.call_function(aten.new_zeros.default, (new, []))
            ghost = graph.call_function(aten.expand.default, (zero, [b, shape(new)[1], total, shape(new)[3]]))
        for u in stores:
            u.replace_input_with(holder, ghost)
    return replaced


def _is_size(node: Node) -> bool:
    return node.op == "call_function" and node.target is aten.sym_size.int
