"""Constant folding of small in-graph tensors, to prove a mask causal or a 0-d scale constant.

Only subgraphs built from factory functions (ones, arange, full, tensor...) and pure ops are
folded; anything that reads a graph input (a placeholder: parameters and buffers are inputs
in Dynamo graphs, and may change between calls) is not a constant.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

_FACTORIES = {torch.ones, torch.zeros, torch.full, torch.arange, torch.tensor, torch.ones_like, torch.empty, torch.tril, torch.triu, torch.eye}
_PURE = {
    operator.getitem, operator.eq, operator.ne, operator.ge, operator.gt, operator.le, operator.lt, operator.sub, operator.add,
    operator.invert, operator.neg, operator.and_, operator.or_, operator.mul, operator.truediv,
    torch.tril, torch.triu, torch.logical_not, torch.where, torch.eq, torch.ne, torch.ge, torch.gt, torch.le, torch.lt, torch.sqrt,
}
_PURE_METHODS = {
    "tril", "triu", "view", "reshape", "unsqueeze", "squeeze", "to", "bool", "float", "long", "int", "expand", "logical_not",
    "__invert__", "eq", "ne", "ge", "gt", "le", "lt", "masked_fill", "type", "contiguous", "t", "transpose", "sqrt", "__getitem__",
}
_MAX_ELEMENTS = 1 << 22
_MAX_DEPTH = 24


def _concrete(x: Any) -> bool:
    return not isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))


def fold(node: Any, _depth: int = 0) -> Optional[Any]:
    """Evaluate `node` on real values if it is a small compile-time constant, else None."""
    if not isinstance(node, fx.Node):
        return node if _concrete(node) else None
    if _depth > _MAX_DEPTH or node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target not in _FACTORIES and node.target not in _PURE:
        return None
    if node.op == "call_method" and node.target not in _PURE_METHODS:
        return None
    args = []
    for a in node.args:
        if isinstance(a, fx.Node):
            folded = fold(a, _depth + 1)
            if folded is None:
                return None
            args.append(folded)
        elif isinstance(a, (list, tuple)):
            if any(isinstance(x, fx.Node) or not _concrete(x) for x in a):
                return None
            args.append(a)
        elif not _concrete(a):
            return None
        else:
            args.append(a)
    kwargs = {k: v for k, v in node.kwargs.items()}
    if any(isinstance(v, fx.Node) or not _concrete(v) for v in kwargs.values()):
        return None
    kwargs.pop("device", None)  # fold on the CPU; only the values matter
    kwargs.pop("requires_grad", None)
    try:
        with torch.no_grad():
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    if isinstance(out, torch.Tensor) and out.numel() > _MAX_ELEMENTS:
        return None
    return out


def _causal_pattern(m: int, n: int) -> torch.Tensor:
    return torch.ones(m, n, dtype=torch.bool).tril()


def is_causal_mask(cond: fx.Node, keep: bool, scores_shape: tuple) -> bool:
    """True when `cond` (a keep mask if `keep`, else a drop mask) is exactly the top-left causal mask."""
    m, n = scores_shape[-2:]
    if not (isinstance(m, int) and isinstance(n, int)):
        return False
    value = fold(cond)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() > len(scores_shape):
        return False
    if value.shape[-2:] != (m, n) or any(s != 1 for s in value.shape[:-2]):
        return False
    keep_mask = value.reshape(m, n) if keep else ~value.reshape(m, n)
    return bool(torch.equal(keep_mask, _causal_pattern(m, n)))


def additive_causal(bias: fx.Node, scores_shape: tuple) -> bool:
    """True when an additive term is exactly 0 on and below the diagonal and -inf above it."""
    m, n = scores_shape[-2:]
    if not (isinstance(m, int) and isinstance(n, int)):
        return False
    value = fold(bias)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape[-2:] != (m, n):
        return False
    if any(s != 1 for s in value.shape[:-2]):
        return False
    value = value.reshape(m, n)
    causal = _causal_pattern(m, n)
    return bool((value[causal] == 0).all() and (value[~causal] == float("-inf")).all())
