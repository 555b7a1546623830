"""Attention written by hand: scores = Q @ K^T (matmul, bmm, baddbmm or einsum), scaled, soft-capped,
masked (add, masked_fill, where), softmax (with casts, inactive dropout), then probabilities @ V.
Learned attention sinks (gpt-oss): one logit per head joined to the scores as an extra column, the row
maximum taken off, and that column dropped from the probabilities."""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from .ops import arg, fake, kind, normalize_dim, shape, users
from .site import AttentionSite

NEG_LARGE = -1e4      # a fill value at or below this hides a position


def match_softmax(node: Node) -> AttentionSite | None:
    """A site for ``softmax(scores(Q, K)) @ V``, found from its softmax node."""
    if kind(node) != "softmax":
        return None
    s = shape(node)
    dim = arg(node, 1, "dim", arg(node, 1, "_stacklevel", None))
    if s is None or dim is None or not isinstance(dim, int) or normalize_dim(dim, len(s)) != len(s) - 1:
        return None
    out, path, sink_dropped = _probs_times_v(node)
    if out is None:
        return None
    site = AttentionSite(node=out[0], pattern=out[1])
    site.v = out[2]
    site.path_nodes |= path | {node}
    scale = 1.0
    x = node.args[0]
    while True:   # walk back from the softmax input to the Q @ K^T product
        site.path_nodes.add(x)
        k = kind(x)
        if k in ("to", "identity"):
            x = x.args[0]
        elif k == "sub" and isinstance(x.args[0], Node) and _is_row_max(x.args[1], x.args[0]):
            site.path_nodes |= _max_nodes(x.args[1])      # softmax(s - max s) = softmax(s)
            x = x.args[0]
        elif k == "cat" and sink_dropped and site.sinks is None and site.mask is None:
            sinks = _sink_column(x)
            if sinks is None:
                return None
            site.sinks, x = sinks, x.args[0][0]
        elif (cap := _softcap(x)) is not None:
            site.softcap, inner, nodes = cap
            site.path_nodes |= nodes
            x = inner
        elif k in ("mul", "div") and scalar_value(x.args[1]) is not None and isinstance(x.args[0], Node):
            c = scalar_value(x.args[1])
            scale = scale * c if k == "mul" else scale / c
            x = x.args[0]
        elif k == "mul" and scalar_value(x.args[0]) is not None:
            scale *= scalar_value(x.args[0])
            x = x.args[1]
        elif k == "add" and site.mask is None:
            scores, mask = _split_mask(x)
            if scores is None:
                return None
            site.mask, site.mask_form, x = mask, "additive", scores
        elif k == "masked_fill" and site.mask is None:
            fill = scalar_value(x.args[2])
            if fill is None or fill > NEG_LARGE:
                return None
            site.mask, site.mask_form, x = x.args[1], "drop", x.args[0]
        elif k == "where" and site.mask is None:
            cond, a, b = x.args[:3]
            if isinstance(b, Node) and scalar_value(a) is not None and scalar_value(a) <= NEG_LARGE:
                site.mask, site.mask_form, x = cond, "drop", b
            elif isinstance(a, Node) and scalar_value(b) is not None and scalar_value(b) <= NEG_LARGE:
                site.mask, site.mask_form, x = cond, "keep", a
            else:
                return None
        elif k in ("matmul", "bmm", "einsum", "baddbmm"):
            alpha = _qk(x, site)
            if alpha is None:
                return None
            scale *= alpha
            break
        else:
            return None
    if sink_dropped and site.sinks is None:
        return None                      # a column dropped that is not a sink column
    site.scale = scale
    return site


def _probs_times_v(softmax: Node):
    """Follow the probabilities (casts, inactive dropout, dropping a sink column) to the product with V:
    ((product node, pattern, V), path nodes, whether a last column was dropped)."""
    path, x, dropped = set(), softmax, False
    while True:
        if len(users(x)) != 1:
            return None, path, dropped
        (user,) = users(x)
        k = kind(user)
        if k in ("to", "identity") or (k == "dropout" and _dropout_inactive(user)):
            path.add(user)
            x = user
            continue
        if not dropped and _drops_last_column(user):
            path.add(user)
            x, dropped = user, True
            continue
        if k in ("matmul", "bmm") and user.args[0] is x:
            return (user, k if k == "bmm" else "matmul-softmax", user.args[1]), path, dropped
        if k == "einsum":
            eq, ops = user.args[0], _einsum_operands(user)
            if len(ops) == 2 and ops[0] is x and _einsum_is_pv(eq):
                return (user, "einsum", ops[1]), path, dropped
        return None, path, dropped


def _drops_last_column(node: Node) -> bool:
    """x[..., :-1] (getitem with Ellipsis and a slice, or aten.slice over the last dim up to -1)."""
    s = shape(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
    if s is None:
        return False
    if kind(node) == "getitem" and isinstance(node.args[1], tuple) and len(node.args[1]) == 2:
        first, last = node.args[1]
        return (first is Ellipsis and isinstance(last, slice) and last.start in (None, 0) and last.step in (None, 1)
                and last.stop == -1)
    if kind(node) == "slice":
        dim, start, end = arg(node, 1, "dim", 0), arg(node, 2, "start", None), arg(node, 3, "end", None)
        return (isinstance(dim, int) and normalize_dim(dim, len(s)) == len(s) - 1 and start in (None, 0)
                and end in (-1, s[-1] - 1) and arg(node, 4, "step", 1) == 1)
    return False


def _sink_column(cat: Node) -> Node | None:
    """cat([scores, sinks], dim=-1) with sinks (B, H, Tq, 1): the sinks node, else None."""
    parts, dim = cat.args[0], arg(cat, 1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, Node) for p in parts):
        return None
    s, t = shape(parts[0]), shape(parts[1])
    if s is None or t is None or len(s) != 4 or len(t) != 4 or normalize_dim(dim, 4) != 3 or t[3] != 1:
        return None
    return parts[1]


def _is_row_max(m, x: Node) -> bool:
    """m is x's maximum over the last dim, kept as a dim: x.max(-1, keepdim=True).values or x.amax(-1, True)."""
    if not isinstance(m, Node):
        return False
    if kind(m) == "getitem" and m.args[1] == 0 and isinstance(m.args[0], Node):
        m = m.args[0]
    if kind(m) not in ("max", "amax") or m.args[0] is not x:
        return False
    s = shape(x)
    dim = arg(m, 1, "dim", None)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return s is not None and isinstance(dim, int) and normalize_dim(dim, len(s)) == len(s) - 1 and \
        arg(m, 2, "keepdim", False) is True


def _max_nodes(m: Node) -> set:
    return {m, m.args[0]} if kind(m) == "getitem" else {m}


def _dropout_inactive(node: Node) -> bool:
    p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    return training is False or p == 0.0


def _qk(x: Node, site: AttentionSite) -> float | None:
    """Fill site.q / site.k from the scores product (Q @ K^T shapes only); return the product's own
    scale factor (baddbmm's alpha, else 1), or None if this is not Q @ K^T."""
    k, alpha = kind(x), 1.0
    site.path_nodes.add(x)
    if k == "einsum":
        ops = _einsum_operands(x)
        if len(ops) != 2 or not _einsum_is_qk(x.args[0]):
            return None
        site.q, site.k = ops
        site.pattern = "einsum"
        return alpha
    if k == "baddbmm":
        bias, q, kt = x.args[:3]
        beta, alpha = x.kwargs.get("beta", 1.0), x.kwargs.get("alpha", 1.0)
        if beta not in (0.0, 1.0) or site.mask is not None and beta == 1.0:
            return None
        site.q, kt_src = q, kt
        if beta == 1.0:
            site.mask, site.mask_form = bias, "additive"
        site.pattern = "baddbmm"
    else:
        site.q, kt_src = x.args[0], x.args[1]
    kk = _untranspose(kt_src)
    if kk is None:
        return None
    site.k = kk
    site.path_nodes.add(kt_src)
    return float(alpha)


def _untranspose(node) -> Node | None:
    """If node is K^T (swap of the last two dims of K), return K."""
    s = shape(node)
    if s is None:
        return None
    n = len(s)
    if kind(node) == "transpose":
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if d1 is None:   # aten.t
            return node.args[0] if n == 2 else None
        if {normalize_dim(d0, n), normalize_dim(d1, n)} == {n - 2, n - 1}:
            return node.args[0]
    if kind(node) == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        dims = [normalize_dim(d, n) for d in dims]
        if dims == list(range(n - 2)) + [n - 1, n - 2]:
            return node.args[0]
    return None


def _einsum_operands(node: Node) -> list:
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    return list(ops)


def _einsum_terms(eq: str):
    lhs, _, out = eq.replace(" ", "").partition("->")
    a, _, b = lhs.partition(",")
    return a, b, out


def _einsum_is_qk(eq) -> bool:
    """'...qd,...kd->...qk': contract the last index of both, keep the rest."""
    if not isinstance(eq, str):
        return False
    a, b, out = _einsum_terms(eq)
    return (len(a) == len(b) == len(out) and a[-1] == b[-1] and a[:-2] == b[:-2] == out[:-2]
            and out[-2:] == a[-2] + b[-2])


def _einsum_is_pv(eq) -> bool:
    """'...qk,...kd->...qd'."""
    if not isinstance(eq, str):
        return False
    a, b, out = _einsum_terms(eq)
    return (len(a) == len(b) == len(out) and a[-1] == b[-2] and a[:-2] == b[:-2] == out[:-2]
            and out[-2:] == a[-2] + b[-1])


def _split_mask(add: Node):
    """For scores + mask, tell which operand is the scores (it leads to Q @ K^T)."""
    a, b = add.args[:2]
    for scores, mask in ((a, b), (b, a)):
        if isinstance(scores, Node) and isinstance(mask, Node) and _leads_to_qk(scores):
            return scores, mask
    return None, None


def _leads_to_qk(x: Node, depth: int = 8) -> bool:
    for _ in range(depth):
        k = kind(x)
        if k in ("matmul", "bmm", "einsum", "baddbmm"):
            return True
        if k in ("to", "identity", "mul", "div", "tanh") and x.args and isinstance(x.args[0], Node):
            x = x.args[0]
        else:
            return False
    return False


def _softcap(x: Node):
    """c * tanh(s / c) (or s * (1/c)): returns (c, s, nodes) or None."""
    if kind(x) != "mul" or not isinstance(x.args[0], Node):
        return None
    t, c = x.args[0], scalar_value(x.args[1])
    if kind(t) != "tanh" or c is None:
        return None
    inner = t.args[0]
    d = scalar_value(inner.args[1]) if kind(inner) in ("div", "mul") and len(inner.args) > 1 else None
    if d is None:
        return None
    if (kind(inner) == "div" and math.isclose(d, c)) or (kind(inner) == "mul" and math.isclose(d * c, 1.0)):
        return float(c), inner.args[0], {t, inner}
    return None


def scalar_value(x):
    """The Python value of a scalar operand: a number, a constant full()/tensor() node, or None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, Node):
        v = fake(x)
        if x.op == "call_function" and x.target in (torch.full,) and isinstance(x.args[1], (int, float)):
            return float(x.args[1])
        if x.op == "call_function" and x.target is torch.tensor and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
        if kind(x) in ("to", "identity"):
            return scalar_value(x.args[0])
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, (torch.SymFloat, torch.SymInt)) and v.node.hint is not None:
            # A module constant Dynamo lifted to a graph input (e.g. attention `scaling`): use its value.
            return float(v.node.hint)
    return None


__all__ = ["match_softmax", "scalar_value"]
