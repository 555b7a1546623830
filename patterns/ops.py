"""The op vocabulary of the pattern library: one canonical name per operation, whatever IR spelled it.

Dynamo graphs spell a transpose as ``call_method transpose``, ``torch.transpose`` or
``operator.getitem``-free views; torch.export graphs spell it ``aten.transpose.int``. Patterns match on
the canonical names returned by :func:`kind`, never on one model's exact spelling.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten

_FUNCTIONS: dict[object, str] = {
    F.scaled_dot_product_attention: "sdpa",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    torch.matmul: "matmul", operator.matmul: "matmul",
    torch.bmm: "bmm", torch.baddbmm: "baddbmm", torch.einsum: "einsum",
    F.softmax: "softmax", torch.softmax: "softmax", torch.nn.functional.log_softmax: "log_softmax",
    torch.special.softmax: "softmax",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.transpose: "transpose", torch.permute: "permute", torch.reshape: "reshape",
    torch.repeat_interleave: "repeat_interleave", torch.unsqueeze: "unsqueeze",
    torch.add: "add", operator.add: "add", operator.iadd: "add",
    torch.mul: "mul", operator.mul: "mul", operator.imul: "mul",
    torch.div: "div", operator.truediv: "div", operator.itruediv: "div", torch.true_divide: "div",
    torch.sub: "sub", operator.sub: "sub", torch.neg: "neg", operator.neg: "neg",
    torch.tanh: "tanh", torch.where: "where", torch.masked_fill: "masked_fill",
    torch.cos: "cos", torch.sin: "sin",
    operator.getitem: "getitem", torch.index_copy: "index_copy", torch.max: "max", torch.amax: "amax",
}

_METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "bmm", "baddbmm": "baddbmm", "softmax": "softmax",
    "transpose": "transpose", "permute": "permute", "reshape": "reshape", "view": "reshape",
    "expand": "expand", "repeat_interleave": "repeat_interleave", "unsqueeze": "unsqueeze",
    "contiguous": "identity", "clone": "identity",
    "to": "to", "type": "to", "float": "to", "half": "to", "bfloat16": "to", "type_as": "to",
    "add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "div": "div", "div_": "div",
    "sub": "sub", "neg": "neg", "tanh": "tanh", "cos": "cos", "sin": "sin",
    "masked_fill": "masked_fill", "masked_fill_": "masked_fill",
    "index_copy_": "index_copy_", "index_copy": "index_copy", "copy_": "copy_",
    "size": "size", "__getitem__": "getitem", "max": "max", "amax": "amax",
}

_ATEN: dict[object, str] = {}

for _name, _kind, _ovs in [
    ("scaled_dot_product_attention", "sdpa", ("default",)),
    ("matmul", "matmul", ("default",)), ("bmm", "bmm", ("default",)), ("baddbmm", "baddbmm", ("default",)),
    ("einsum", "einsum", ("default",)), ("_softmax", "softmax", ("default",)), ("softmax", "softmax", ("int",)),
    ("dropout", "dropout", ("default",)), ("cat", "cat", ("default",)),
    ("transpose", "transpose", ("int",)), ("t", "transpose", ("default",)), ("permute", "permute", ("default",)),
    ("view", "reshape", ("default",)), ("_unsafe_view", "reshape", ("default",)),
    ("reshape", "reshape", ("default",)), ("expand", "expand", ("default",)),
    ("repeat_interleave", "repeat_interleave", ("self_int", "self_Tensor")),
    ("unsqueeze", "unsqueeze", ("default",)), ("clone", "identity", ("default",)),
    ("contiguous", "identity", ("default",)), ("alias", "identity", ("default",)),
    ("_to_copy", "to", ("default",)), ("to", "to", ("dtype", "dtype_layout", "device")),
    ("add", "add", ("Tensor", "Scalar")), ("mul", "mul", ("Tensor", "Scalar")),
    ("div", "div", ("Tensor", "Scalar")), ("sub", "sub", ("Tensor", "Scalar")), ("neg", "neg", ("default",)),
    ("tanh", "tanh", ("default",)), ("cos", "cos", ("default",)), ("sin", "sin", ("default",)), ("where", "where", ("self", "ScalarSelf", "ScalarOther", "Scalar")),
    ("masked_fill", "masked_fill", ("Scalar", "Tensor")),
    ("index_copy", "index_copy", ("default",)), ("index_copy_", "index_copy_", ("default",)),
    ("slice", "slice", ("Tensor",)), ("select", "select", ("int",)), ("sym_size", "size", ("int",)),
    ("max", "max", ("dim",)), ("amax", "amax", ("default",)),
]:
    packet = getattr(aten, _name, None)
    for _ov in _ovs:
        _op = getattr(packet, _ov, None) if packet is not None else None
        if _op is not None:
            _ATEN[_op] = _kind


def kind(node: object) -> str | None:
    """Canonical op name of an FX node ("sdpa", "matmul", "softmax", "reshape", ...), or None."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op != "call_function":
        return None
    if node.target in _FUNCTIONS:
        return _FUNCTIONS[node.target]
    if node.target in _ATEN:
        return _ATEN[node.target]
    overload_packet = getattr(node.target, "overloadpacket", None)
    if overload_packet is not None and overload_packet in _ATEN:
        return _ATEN[overload_packet]
    return None


_CHECKS = tuple(op for op in (getattr(aten, "_assert_tensor_metadata", None), getattr(aten, "_assert_scalar", None))
                if op is not None)


def users(node: Node) -> list[Node]:
    """The node's users, without the metadata assertions torch.export sprinkles over its graphs."""
    return [u for u in node.users
            if not (u.op == "call_function" and getattr(u.target, "overloadpacket", u.target) in _CHECKS)]


def fake(node: object):
    """The example value (FakeTensor, SymInt, ...) recorded for a node, or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: object) -> tuple | None:
    """Shape of a tensor-valued node, or None."""
    v = fake(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: object) -> torch.dtype | None:
    v = fake(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def arg(node: Node, index: int, name: str, default=None):
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def same_size(a, b) -> bool:
    """Whether two (possibly symbolic) sizes are provably the same expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return str(a) == str(b) or bool(a == b)
    except Exception:   # an unresolvable symbolic comparison
        return False


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim
