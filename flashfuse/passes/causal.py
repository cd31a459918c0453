"""Prove a mask causal from the structure of the graph that builds it, at any size.

Constant folding (constants.py) evaluates small masks; a causal mask at N = 16K has 268M
elements, too many to build at compile time. This reads the mask's producers instead, as a
tiny abstract interpretation over what each node holds:

    ONES      all ones / True              (torch.ones, ones_like, full(.., 1 or True))
    KEEP      1 where key <= query, else 0  (tril(ONES), row >= col, ...)
    DROP      1 where key > query, else 0   (triu(ONES, 1), col > row, ...)
    NEG_ABOVE 0 where key <= query, -inf above (triu(full(-inf), 1))
    ROW, COL  query / key index along the last two dims (arange viewed as [M, 1] / [1, N])

Value-preserving wrappers (same-dtype view, reshape, unsqueeze, expand over leading dims,
contiguous, value casts, None and full-slice indexing that keeps the last two dims last, and
slices that start at 0 on the last two dims, which keep a top-left triangle top-left) pass a
kind through; `~` on bools, `logical_not`, `== 0` and `1 - x` swap KEEP and DROP. Anything
else, including every graph input, is unknown: only in-graph factories are trusted, since
parameters and buffers may change between calls. A node that the graph later writes in place
(`add_`, `masked_fill_`, `x[i] = v`, directly or through a view) is unknown too.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from flashfuse.passes.graph_utils import is_number, normalize_dim, op_name, val, written_later

ONES, KEEP, DROP, NEG_ABOVE, ROW, COL = "ones", "keep", "drop", "neg_above", "row", "col"
_MAX_DEPTH = 16
_FLIP = {KEEP: DROP, DROP: KEEP}
_CAST_METHODS = ("to", "bool", "float", "half", "bfloat16", "int", "long", "type", "contiguous")


def _shape(node) -> Optional[tuple]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_one(x) -> bool:
    return x is True or (is_number(x) and x == 1)


def _full_slice(s) -> bool:
    return s is None or s is Ellipsis or (isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1))


def _index_kind(node: fx.Node, depth: int) -> Optional[str]:
    base, idx = node.args[0], node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(_full_slice(s) for s in idx):
        return None
    kind = classify(base, depth + 1)
    if kind in (ROW, COL):
        # arange(M)[:, None] is a row index; arange(N)[None, :] (or plain) a column index;
        # HF writes arange(M)[None, None, :, None] and arange(N)[None, None, None, :]
        shape = _shape(node)
        if shape is None:
            return None
        return _index_layout(shape)
    src = _shape(base)
    if kind is None or src is None or not _keeps_last_two(idx, len(src)):
        return None  # a triangle must stay on the last two dims: keep[:2, None, None, :] does not
    return kind


def _keeps_last_two(idx: tuple, ndim: int) -> bool:
    """Does indexing with `idx` (full slices, None, one Ellipsis) map the source's last two dims
    onto the result's last two dims?"""
    if ndim < 2 or sum(e is Ellipsis for e in idx) > 1:
        return False
    consuming = sum(e is not None and e is not Ellipsis for e in idx)
    if consuming > ndim:
        return False
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (slice(None),) * (ndim - consuming) + idx[at + 1:]
    else:
        idx = idx + (slice(None),) * (ndim - consuming)
    positions = [j for j, e in enumerate(idx) if e is not None]
    return positions[-2:] == [len(idx) - 2, len(idx) - 1]


def _index_layout(shape: tuple) -> Optional[str]:
    """ROW for an index laid out [..., M, 1], COL for [..., 1, N] or [N]; None otherwise."""
    if len(shape) == 1:
        return COL
    if any(str(d) != "1" for d in shape[:-2]):
        return None
    if str(shape[-1]) == "1" and str(shape[-2]) != "1":
        return ROW
    if str(shape[-2]) == "1":
        return COL
    return None


def _arange_kind(node: fx.Node) -> Optional[str]:
    args = [a for a in node.args]
    if any(k in node.kwargs for k in ("start", "end", "step")):
        return None  # arange(0, 2N, step=2) is no index
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not _exact_index_dtype(v):
        return None  # bf16 / fp16 aranges tie, small ints wrap: no longer one value per position
    if len(args) == 1 or (len(args) >= 2 and args[0] == 0 and (len(args) == 2 or args[2] == 1)):
        return COL  # a 1-D index broadcasts along the last dim: a key index until reshaped
    return None


def _exact_index_dtype(v: torch.Tensor) -> bool:
    # every position 0..L-1 has its own value
    if v.dtype in (torch.int64, torch.float64):
        return True
    n = v.shape[0]
    limit = {torch.int32: 2**31, torch.float32: 2**24}.get(v.dtype)
    return limit is not None and isinstance(n, int) and n <= limit


def _same_dtype(node: fx.Node) -> bool:
    # view(dtype) reinterprets bits: only same-dtype views keep values
    a, b = val(node), val(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _is_float(node) -> bool:
    v = val(node) if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _is_bool(node) -> bool:
    v = val(node) if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def _view_kind(node: fx.Node, depth: int) -> Optional[str]:
    if not _same_dtype(node):
        return None
    kind = classify(node.args[0], depth + 1)
    if kind in (ROW, COL):
        shape = _shape(node)
        if shape is None:
            return None
        trailing = [s for s in shape if s != 1]
        if len(trailing) > 1:
            return None
        if len(shape) >= 2 and shape[-1] == 1 and shape[-2] != 1:
            return ROW
        return COL if shape[-1] != 1 or len(trailing) == 0 else None
    return kind if _keeps_triangle(node) else None


def _keeps_triangle(node: fx.Node) -> bool:
    """Does this same-dtype view keep a triangle on the last two dims? Views that add or drop
    leading size-1 dims do, and expand(), which repeats it along leading dims (HF expands its
    [1, 1, M, N] mask over the batch)."""
    src, out = _shape(node.args[0]), _shape(node)
    if src is None or out is None or len(src) < 2 or len(out) < 2 or src[-2:] != out[-2:]:
        return False
    return op_name(node) == "expand" or (all(d == 1 for d in src[:-2]) and all(d == 1 for d in out[:-2]))


def _compare(name: str, a, b, depth: int) -> Optional[str]:
    ka = classify(a, depth + 1) if isinstance(a, fx.Node) else None
    kb = classify(b, depth + 1) if isinstance(b, fx.Node) else None
    # normalize to "row OP col"
    flip = {"ge": "le", "le": "ge", "gt": "lt", "lt": "gt"}
    if (ka, kb) == (COL, ROW):
        name, ka, kb = flip[name], ROW, COL
    if (ka, kb) != (ROW, COL):
        return None
    return {"ge": KEEP, "lt": DROP}.get(name)  # row >= col keeps; row < col drops


def classify(node, depth: int = 0) -> Optional[str]:
    if not isinstance(node, fx.Node) or depth > _MAX_DEPTH or node.op not in ("call_function", "call_method"):
        return None
    if written_later(node):
        return None
    target, name = node.target, op_name(node)
    if target in (torch.ones, torch.ones_like):
        return ONES
    if target is torch.full:
        fill = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
        if fill == float("-inf") and not _is_float(node):
            return None  # full(-inf, dtype=bool) is all True
        return ONES if _is_one(fill) else NEG_ABOVE + "_src" if fill == float("-inf") else None
    if target is torch.arange:
        return _arange_kind(node)
    if name in ("tril", "triu") or target in (torch.tril, torch.triu):
        diag = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        src = classify(node.args[0], depth + 1)
        if src == ONES and (target is torch.tril or name == "tril") and diag == 0:
            return KEEP
        if src == ONES and (target is torch.triu or name == "triu") and diag == 1:
            return DROP
        if src == NEG_ABOVE + "_src" and (target is torch.triu or name == "triu") and diag == 1:
            return NEG_ABOVE
        return None
    if name in ("view", "reshape", "unsqueeze", "expand"):
        return _view_kind(node, depth)
    if node.op == "call_method" and node.target in _CAST_METHODS:
        kind = classify(node.args[0], depth + 1)
        if kind == NEG_ABOVE and not _is_float(node):
            return None  # -inf cast to bool is True, to an int undefined: no longer an additive mask
        return kind if kind in (ONES, KEEP, DROP, NEG_ABOVE) else None
    if name == "getitem":
        return _index_kind(node, depth)
    if name == "invert" or target is operator.invert:
        if not _is_bool(node.args[0]):
            return None  # ~ on an integer tensor is bitwise: ~1 == -2, not 0
        return _FLIP.get(classify(node.args[0], depth + 1))
    if name in ("eq", "ne") and len(node.args) == 2 and is_number(node.args[1]):
        kind = classify(node.args[0], depth + 1)
        if kind in _FLIP:
            if (name == "eq" and node.args[1] == 0) or (name == "ne" and node.args[1] == 1):
                return _FLIP[kind]
            if (name == "ne" and node.args[1] == 0) or (name == "eq" and node.args[1] == 1):
                return kind
        return None
    if (target in (operator.add, torch.add) or name == "add") and len(node.args) == 2:
        # HF offsets its indices by the cache position: `arange(M) + 0` is still arange(M)
        a, b = node.args
        if is_number(b) and b == 0 and isinstance(a, fx.Node):
            return classify(a, depth + 1)
        if is_number(a) and a == 0 and isinstance(b, fx.Node):
            return classify(b, depth + 1)
        return None
    if target is operator.sub and len(node.args) == 2 and _is_one(node.args[0]):
        return _FLIP.get(classify(node.args[1], depth + 1))
    if target in (operator.ge, torch.ge, operator.le, torch.le, operator.gt, torch.gt, operator.lt, torch.lt) or name in ("ge", "le", "gt", "lt"):
        op = {operator.ge: "ge", operator.le: "le", operator.gt: "gt", operator.lt: "lt"}.get(target, name)
        if op in ("le", "gt"):
            # row <= col is not causal; col <= row is: _compare normalizes the operand order
            kind = _compare({"le": "ge", "gt": "lt"}[op], node.args[1], node.args[0], depth)
        else:
            kind = _compare(op, node.args[0], node.args[1], depth)
        return kind
    return None


def _trailing_matches(node: fx.Node, scores_shape: tuple) -> bool:
    shape = _shape(node)
    if shape is None or len(shape) < 2 or len(shape) > len(scores_shape):
        return False
    m, n = scores_shape[-2:]
    # leading dims of 1 or of the scores' own size: the term never widens the scores
    lead, score_lead = shape[:-2], scores_shape[:-2][len(scores_shape) - len(shape):]
    return str(shape[-2]) == str(m) and str(shape[-1]) == str(n) and all(
        str(s) == "1" or str(s) == str(t) for s, t in zip(lead, score_lead))


def is_causal(cond: fx.Node, keep: bool, scores_shape: tuple) -> bool:
    """True when the bool mask `cond` (a keep mask if `keep`, else a drop mask) is top-left causal."""
    if not _trailing_matches(cond, scores_shape):
        return False
    return classify(cond) == (KEEP if keep else DROP)


def is_additive_causal(bias: fx.Node, scores_shape: tuple) -> bool:
    """True when an additive term is 0 on and below the diagonal and -inf above it."""
    return additive_fill(bias, scores_shape) == float("-inf")


def additive_fill(bias: fx.Node, scores_shape: tuple) -> Optional[float]:
    """F when an additive term is 0 on and below the diagonal and the constant F < 0 above it.

    -inf for `full(-inf).triu(1)`; F for HF's `where(kv <= q, 0, F)` (F = finfo.min), through
    views, expand() over leading dims and casts (F is rounded to the cast's dtype).
    """
    if not _trailing_matches(bias, scores_shape):
        return None
    return _fill_of(bias, 0)


def _fill_of(node, depth: int) -> Optional[float]:
    if not isinstance(node, fx.Node) or depth > _MAX_DEPTH or node.op not in ("call_function", "call_method"):
        return None
    if written_later(node):
        return None
    if classify(node, depth) == NEG_ABOVE:
        return float("-inf")
    name = op_name(node)
    if node.target is torch.where or name == "where":
        if len(node.args) != 3:
            return None
        cond, a, b = node.args
        kind = classify(cond, depth + 1)
        for keep_value, drop_value, want in ((a, b, KEEP), (b, a, DROP)):
            if kind == want and _scalar(keep_value) == 0:
                fill = _scalar(drop_value)
                return _rounded(fill, node) if fill is not None and fill < 0 else None
        return None
    if name in ("view", "reshape", "unsqueeze", "expand", "contiguous"):
        if not (_same_dtype(node) and _keeps_triangle(node)):
            return None
        return _fill_of(node.args[0], depth + 1)
    if node.op == "call_method" and node.target in ("to", "float", "half", "bfloat16", "type"):
        fill = _fill_of(node.args[0], depth + 1)
        out = val(node)
        if fill is None or not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            return None
        return _rounded(fill, node)
    return None


def _rounded(fill: float, node: fx.Node) -> Optional[float]:
    # F as the node's dtype holds it (finfo(float32).min is -inf in fp16)
    out = val(node)
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
        return None
    return float(torch.tensor(fill, dtype=torch.float64).to(out.dtype))


def _scalar(x) -> Optional[float]:
    """A Python number, or a 0-d in-graph constant (torch.tensor(0.0)), as a float."""
    if is_number(x):
        return float(x)
    if isinstance(x, fx.Node):
        from flashfuse.passes import constants

        folded = constants.fold(x)
        if isinstance(folded, torch.Tensor) and folded.numel() == 1:
            return float(folded.reshape(()))
    return None
