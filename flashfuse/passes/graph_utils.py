"""Small readers over Dynamo FX graphs: canonical op names, constants, meta, fake propagation."""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

class Refused(Exception):
    """Raised inside detection; carries a short snake_case reason and a detail sentence."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_FUNCTIONS = {
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "bmm",
    torch.einsum: "einsum",
    torch.baddbmm: "baddbmm",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.imul: "mul",
    operator.iadd: "add",
    operator.isub: "sub",
    torch.div: "div",
    torch.true_divide: "div",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    torch.special.softmax: "softmax",
    F.dropout: "dropout",
    torch.dropout: "dropout",
    torch.where: "where",
    torch.masked_fill: "masked_fill",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.permute: "permute",
    torch.repeat_interleave: "repeat_interleave",
    torch.reshape: "reshape",
    torch.unsqueeze: "unsqueeze",
    operator.getitem: "getitem",
    operator.invert: "invert",
    torch.logical_not: "invert",
    torch.bitwise_not: "invert",
    operator.eq: "eq",
    torch.eq: "eq",
    operator.ne: "ne",
    torch.ne: "ne",
    getattr: "getattr",
}

_METHODS = {
    "masked_fill_": "masked_fill", "logical_not": "invert", "bitwise_not": "invert", "__invert__": "invert",
    "div_": "div", "mul_": "mul", "add_": "add", "sub_": "sub", "true_divide": "div", "true_divide_": "div",
    "swapaxes": "transpose", "swapdims": "transpose",
}
_INPLACE_FUNCTIONS = {operator.itruediv, operator.imul, operator.iadd, operator.isub}


def op_name(node: fx.Node) -> Optional[str]:
    """A canonical name for the torch-level op of a Dynamo node, or None."""
    if node.op == "call_method":
        return _METHODS.get(node.target, node.target)
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def is_inplace(node: fx.Node) -> bool:
    """An op that writes into its first argument (x.masked_fill_(...), x /= c)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return node.op == "call_function" and node.target in _INPLACE_FUNCTIONS


def written_later(node: fx.Node, depth: int = 0) -> bool:
    """Is `node`'s value written in place later in the graph (directly or through a view of it)?

    The provers and constant folding read a node's producers; an in-place write (`masked_fill_`, `add_`, `x[i] = v`)
    after it changes the value every later user sees, so such a node proves nothing.
    """
    if depth > 8:
        return True
    for user in node.users:
        # the raw method/function name: op_name canonicalizes add_ to add
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "") or ""
        if user.target in _INPLACE_OPERATORS or name in ("setitem", "__setitem__", "copy_"):
            return True
        if name.endswith("_") and not name.endswith("__") and user.args and user.args[0] is node:
            return True
        if name in _VIEW_OPS and user.args and user.args[0] is node and written_later(user, depth + 1):
            return True
    return False


_INPLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift)
_VIEW_OPS = ("getitem", "view", "reshape", "unsqueeze", "squeeze", "expand", "transpose", "t", "permute", "narrow",
             "select", "as_strided", "split", "chunk", "unbind", "flatten", "unflatten", "view_as", "expand_as", "movedim",
             "diagonal", "contiguous", "detach", "alias")


def val(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (or the constant itself)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def has_meta(node: fx.Node) -> bool:
    return isinstance(val(node), torch.Tensor)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call (call_method counts self as index 0)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def stack_location(node: fx.Node) -> str:
    """`file:line` of the user's code that produced the node, from Dynamo's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return "<unknown>"
    last = lines[-1]  # innermost frame
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path}:{line}"
    except IndexError:
        return last


def fake_mode_of(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        v = val(node)
        if isinstance(v, torch._subclasses.FakeTensor):
            return v.fake_mode
    return None


def _to_fake(x: Any) -> Any:
    return val(x) if isinstance(x, fx.Node) else x


def propagate_meta(node: fx.Node, fake_mode, like: Optional[fx.Node] = None) -> None:
    """Give a new node the fake value and stack trace later passes and error messages expect."""
    args = torch.fx.node.map_aggregate(node.args, _to_fake)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, _to_fake)
    with fake_mode:
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    node.meta["example_value"] = out
    if like is not None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
