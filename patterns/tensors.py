"""How keys and values reach an attention: GQA expansion, the cache they come from, and RoPE."""

from __future__ import annotations

from torch.fx import Node

from .ops import arg, fake, kind, normalize_dim, same_size, shape
from .site import AttentionSite

PASS_THROUGH = {"identity", "to"}


def strip(node, path: set | None = None):
    """Follow casts/contiguous/clone back to the tensor they copy; record visited nodes in ``path``."""
    while kind(node) in PASS_THROUGH:
        if path is not None:
            path.add(node)
        node = node.args[0]
    return node


def unwind_gqa(node: Node, path: set) -> tuple[Node, str]:
    """Undo the head expansion of grouped-query attention.

    Recognizes repeat_kv (x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv*n, L, D) or the same
    with unsqueeze(2)), repeat_interleave(n, dim=1) and MQA's expand of a size-1 head dimension.
    Returns (kv tensor (B, Hkv, L, D), form).
    """
    x = strip(node, path)
    k = kind(x)
    if k == "reshape":
        inner = strip(x.args[0], path)
        if kind(inner) == "expand":
            base = strip(inner.args[0], path)
            src = _unsqueezed_at(base, 2)
            if src is not None and len(shape(inner) or ()) == 5:
                path.update({x, inner, base})
                return strip(src, path), "repeat_kv"
    if k == "repeat_interleave":
        dim = arg(x, 2, "dim")
        if dim is not None and normalize_dim(dim, 4) == 1:
            path.add(x)
            return strip(x.args[0], path), "repeat_interleave"
    if k == "expand":
        src = strip(x.args[0], path)
        s = shape(src)
        if s is not None and len(s) == 4 and s[1] == 1 and (shape(x) or (0, 0))[1] != 1:
            path.add(x)
            return src, "expand"
    return x, "none"


def _unsqueezed_at(node: Node, dim: int) -> Node | None:
    """If ``node`` is x[:, :, None] or x.unsqueeze(dim) of a 4-D x, return x."""
    if kind(node) == "unsqueeze" and normalize_dim(arg(node, 1, "dim"), 5) == dim:
        return node.args[0]
    if kind(node) == "getitem" and isinstance(node.args[1], tuple):
        idx = node.args[1]
        nones = [i for i, s in enumerate(idx) if s is None]
        full = all(s is None or s == slice(None) or s is Ellipsis for s in idx)
        if full and nones == [dim] and Ellipsis not in idx[:dim]:
            return node.args[0]
    return None


def find_kv_source(site: AttentionSite, k: Node, v: Node, tq) -> None:
    """Classify where the keys/values come from and fill site.kv_source, k_new/v_new, past_k/past_v."""
    for tag, x in (("k", k), ("v", v)):
        if kind(x) == "cat" and normalize_dim(arg(x, 1, "dim", 0), 4) == 2:   # along the tokens
            tensors = x.args[0]
            if len(tensors) != 2:
                return site.fail(f"{tag} comes from a torch.cat of {len(tensors)} pieces along the tokens, "
                                 f"not [past, new]")
            setattr(site, f"past_{tag}", tensors[0])
            setattr(site, f"{tag}_new", tensors[1])
            src = "concat"
        elif _static_write(x) is not None:
            write = _static_write(x)            # buf.index_copy_(2, positions, new)
            setattr(site, f"past_{tag}", x)
            setattr(site, f"{tag}_new", write.args[3])
            setattr(site, f"{tag}_write", write)
            site.cache_position = write.args[2]
            src = "static"
        else:
            setattr(site, f"{tag}_new", x)
            src = "none"
        if site.kv_source not in ("unknown", src):
            return site.fail(f"keys come from a {site.kv_source} cache but values from {src}")
        site.kv_source = src
    kn = shape(site.k_new)
    if kn is None or len(kn) != 4:
        return site.fail("new keys are not a 4-D (batch, kv_heads, tokens, head_dim) tensor")
    if not same_size(kn[2], tq):
        return site.fail(f"the site attends {tq} queries but appends {kn[2]} new keys: "
                         f"keys come from an unrecognized source (cross-attention or an unknown cache)")
    return None


def _static_write(buf: Node) -> Node | None:
    """An ``index_copy_(2, positions, new)`` into ``buf`` (a static cache buffer), if there is one."""
    for user in buf.users:
        if kind(user) == "index_copy_" and user.args[0] is buf and normalize_dim(user.args[1], 4) == 2:
            return user
    return None


def find_rope(site: AttentionSite) -> None:
    """Recognize k_new = k*cos + rotate_half(k)*sin, full or partial (cat([rot(k[..., :r]), k[..., r:]]));
    record the key before RoPE and, when it can be traced, the rotary frequencies and scale."""
    x = strip(site.k_new)
    if kind(x) == "cat" and len(x.args[0]) == 2:
        found = _rotary_input(strip(x.args[0][0]))
        if found is None:
            return
        inner, cos = found
        full = inner.args[0] if kind(inner) in ("getitem", "slice") else None
        rest = strip(x.args[0][1])
        if full is None or kind(rest) not in ("getitem", "slice") or rest.args[0] is not full:
            return
        site.rope, site.k_pre_rope = "partial", full
    else:
        found = _rotary_input(x)
        if found is None:
            return
        site.rope, (site.k_pre_rope, cos) = "rotate_half", found
    site.rope_inv_freq, site.rope_scale = _rotary_frequencies(cos)


def _rotary_input(node):
    """For add(mul(x, cos), mul(rotate_half(x), sin)) return (x, cos), else None."""
    if kind(node) != "add" or not all(isinstance(a, Node) for a in node.args[:2]):
        return None
    a, b = node.args[:2]
    if kind(a) == "mul" and kind(b) == "mul":
        xs_a = [n for n in a.args if isinstance(n, Node)]
        for n in b.args:
            if isinstance(n, Node) and kind(n) == "cat":   # rotate_half(x) = cat(-x2, x1)
                parts = [strip(p) for p in n.args[0]]
                srcs = {p.args[0] if kind(p) == "neg" else p for p in parts}
                srcs = {s.args[0] for s in srcs if kind(s) in ("getitem", "slice")}
                common = srcs & set(xs_a)
                if len(common) == 1:
                    x = common.pop()
                    others = [n for n in xs_a if n is not x]
                    return x, (others[0] if others else None)
    return None


def _rotary_frequencies(cos: Node | None):
    """Trace cos = cos(cat(f, f)) * scale back to f = positions (x) inv_freq and return the inv_freq
    node (a 1-D float tensor of rotated_dims/2 entries) and the scale; (None, 1.0) if not traceable."""
    from .softmax import scalar_value
    scale, x = 1.0, cos
    for _ in range(12):
        k = kind(x)
        if k in ("identity", "to", "unsqueeze", "getitem", "slice", "reshape", "expand"):
            x = x.args[0]
        elif k == "mul" and len(x.args) == 2 and scalar_value(x.args[1]) is not None:
            scale *= scalar_value(x.args[1])
            x = x.args[0]
        elif k == "cos":
            x = x.args[0]
            break
        else:
            return None, 1.0
    else:
        return None, 1.0
    if kind(x) == "cat" and len(x.args[0]) == 2 and x.args[0][0] is x.args[0][1]:
        half = shape(x.args[0][0])
        for node in _ancestors(x.args[0][0], depth=8):
            s = shape(node)
            if s is not None and len(s) == 1 and half is not None and s[0] == half[-1] \
                    and fake(node).dtype.is_floating_point:
                return node, scale
    return None, 1.0


def _ancestors(node: Node, depth: int):
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
                    yield a
        frontier = nxt


__all__ = ["find_kv_source", "find_rope", "strip", "unwind_gqa"]
