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

from flashfuse.passes.graph_utils import written_later

_FACTORIES = {torch.ones, torch.zeros, torch.full, torch.arange, torch.tensor, torch.ones_like, torch.empty, torch.tril, torch.triu, torch.eye}
_PURE = {
    operator.getitem, operator.eq, operator.ne, operator.ge, operator.gt, operator.le, operator.lt, operator.sub, operator.add,
    operator.invert, operator.neg, operator.and_, operator.or_, operator.mul, operator.truediv,
    torch.tril, torch.triu, torch.logical_not, torch.where, torch.eq, torch.ne, torch.ge, torch.gt, torch.le, torch.lt, torch.sqrt,
    torch.logical_and, torch.logical_or, torch.zeros_like, torch.full_like, torch.masked_fill,
    operator.pow, torch.pow, torch.rsqrt, torch.exp, torch.log, torch.abs, torch.clamp, torch.minimum, torch.maximum,
}
_PURE_METHODS = {
    "tril", "triu", "view", "reshape", "unsqueeze", "squeeze", "to", "bool", "float", "long", "int", "expand", "logical_not",
    "__invert__", "eq", "ne", "ge", "gt", "le", "lt", "masked_fill", "type", "contiguous", "t", "transpose", "sqrt", "__getitem__",
    "logical_and", "logical_or", "__and__", "__or__", "bitwise_and", "bitwise_or", "half", "bfloat16", "permute", "where",
    "pow", "__pow__", "rsqrt", "exp", "log", "abs", "clamp", "neg", "__neg__",
}
_FACTORIES.add(torch._refs.tensor)  # what Dynamo writes for torch.tensor(x) under dynamic shapes
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
    if written_later(node):
        return None  # written in place later: its value here is not what later users see
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


def _folded_scores_term(node: fx.Node, scores_shape: tuple) -> Optional[torch.Tensor]:
    """The constant value of a mask or bias, if it folds and spans the scores' last two dims."""
    m, n = scores_shape[-2:]
    if not (isinstance(m, int) and isinstance(n, int)):
        return None
    value = fold(node)
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.dim() > len(scores_shape):
        return None
    if tuple(value.shape[-2:]) != (m, n):
        return None
    return value


def is_causal_mask(cond: fx.Node, keep: bool, scores_shape: tuple) -> bool:
    """True when `cond` (a keep mask if `keep`, else a drop mask) is exactly the top-left causal mask.

    Leading dims may have any size (HF expands its mask over the batch): every slice must match.
    Masks too large to fold (N = 16K is 268M elements) are proven from their structure instead.
    """
    from flashfuse.passes import causal

    if causal.is_causal(cond, keep, scores_shape):
        return True
    value = _folded_scores_term(cond, scores_shape)
    if value is None or value.dtype != torch.bool:
        return False
    keep_mask = value if keep else ~value
    return bool((keep_mask == _causal_pattern(*scores_shape[-2:])).all())


def additive_causal_fill(bias: fx.Node, scores_shape: tuple) -> Optional[float]:
    """F when an additive term is exactly 0 on and below the diagonal and one constant F < 0 above it.

    F is -inf for `full(-inf).triu(1)`, or finite for HF's `where(kv <= q, 0, finfo.min)`.
    """
    from flashfuse.passes import causal

    fill = causal.additive_fill(bias, scores_shape)
    if fill is not None:
        return fill
    value = _folded_scores_term(bias, scores_shape)
    if value is None or not value.is_floating_point():
        return None
    m, n = scores_shape[-2:]
    causal = _causal_pattern(m, n).expand(value.shape)
    if not bool((value[causal] == 0).all()):
        return None
    above = value[~causal]
    if above.numel() == 0:
        return None  # a single key, or M x 1: no position is masked, it is not a causal mask
    fill = float(above.reshape(-1)[0])
    if not fill < 0 or not bool((above == fill).all()):
        return None
    return fill


def additive_causal(bias: fx.Node, scores_shape: tuple) -> bool:
    """True when an additive term is exactly 0 on and below the diagonal and -inf above it."""
    return additive_causal_fill(bias, scores_shape) == float("-inf")


def constant_tensor(node: Any) -> Optional[torch.Tensor]:
    """The value of a small in-graph constant tensor, else None."""
    value = fold(node)
    return value if isinstance(value, torch.Tensor) else None


# ---------------------------------------------------------------------------------------
# numbers that are symbolic only because of dynamic shapes


_restart_requested: list = []


def symbolic_scalar(node: Any) -> Optional[float]:
    """The value of a scale that is symbolic under dynamic shapes, specialized; else None.

    `q.size(-1) ** -0.5` under dynamic=True is a SymFloat of size symbols: its value is taken
    and Dynamo guards on it (the head dim does not change between calls; a scale computed
    from a sequence length would specialize that length). A Python float that Dynamo turned
    into a graph input (`self.scaling` under dynamic=True: a 0-d tensor and .item()) has no
    value at compile time: Dynamo is asked to specialize it, and `take_restart_request` tells
    the backend to restart the analysis, which then sees the constant.
    """
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node
    if isinstance(value, torch.Tensor) and value.dim() == 0 and node.op == "call_function" and node.args:
        # torch.tensor(x) of such a number (Dynamo may write torch._refs.tensor)
        if getattr(node.target, "__name__", None) in ("tensor", "scalar_tensor", "as_tensor") and isinstance(node.args[0], fx.Node):
            return symbolic_scalar(node.args[0])
        return None
    if not isinstance(value, (torch.SymFloat, torch.SymInt)):
        return None
    try:
        from torch.utils._sympy.symbol import SymT, symbol_is_type
    except ImportError:  # pragma: no cover - older torch
        return None
    symbols = value.node.expr.free_symbols
    floats = [s for s in symbols if symbol_is_type(s, SymT.FLOAT)]
    if floats:
        try:
            from torch._dynamo.symbolic_convert import TensorifyState
        except ImportError:  # pragma: no cover - older torch
            return None
        for s in floats:
            if not TensorifyState.should_specialize(str(s)):
                TensorifyState.specialize(str(s))
                _restart_requested.append(str(s))
        return None
    if not all(symbol_is_type(s, SymT.SIZE) for s in symbols):
        return None  # unbacked (data-dependent) values have no value to specialize to
    try:
        return float(value)  # guards on the value
    except Exception:  # noqa: BLE001 - a value that cannot be guarded stays symbolic
        return None


def take_restart_request() -> bool:
    """True (once) when symbolic_scalar asked Dynamo to specialize a float input."""
    requested = bool(_restart_requested)
    _restart_requested.clear()
    return requested
