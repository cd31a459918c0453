"""Operand forms: how user code spells Q K^T, P V, K's transpose, GQA repeats and a scale on q.

Each reader takes Dynamo nodes and returns `Operand`s: the tensor the op reads and, where the
user's layout differs from the op's [.., L, D], the permutation that views it that way
(a permute is a view: no copy, and autograd routes gradients through it exactly).

    q @ k.transpose(-2, -1)                 q, k                   (K^T undone)
    q @ kt                                  q, kt.permute(.., -1, -2)   (K stored transposed)
    einsum("bqhd,bkhd->bhqk", q, k)         q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)
    (q * 0.125) @ k.mT                      q, k and a factor 0.125 for the op's scale
    repeat_kv(k, 4)                         k and a GQA group of 4
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from flashfuse.passes import constants
from flashfuse.passes.graph_utils import Refused, arg, has_meta, is_number, normalize_dim, op_name, single_user, val


@dataclasses.dataclass(frozen=True)
class Operand:
    """`node`, viewed through `dims` (a permutation) when the user's layout is not [.., L, D]."""

    node: fx.Node
    dims: Optional[tuple] = None

    @property
    def shape(self) -> tuple:
        shape = tuple(val(self.node).shape)
        return tuple(shape[d] for d in self.dims) if self.dims else shape

    @property
    def dtype(self) -> Optional[torch.dtype]:
        v = val(self.node)
        return v.dtype if isinstance(v, torch.Tensor) else None


def _swap_last(nd: int) -> tuple:
    return tuple(range(nd - 2)) + (nd - 1, nd - 2)


def _identity_or(dims) -> Optional[tuple]:
    dims = tuple(dims)
    return None if dims == tuple(range(len(dims))) else dims


def require_meta(*nodes) -> None:
    for n in nodes:
        if isinstance(n, fx.Node) and not has_meta(n):
            raise Refused("missing_meta", f"node {n.name} has no Dynamo example value")


# ---------------------------------------------------------------------------------------
# K^T in a matmul


def k_from_kt(kt: fx.Node) -> Operand:
    """K^T operand of a matmul -> K. Only a swap of the last two dims counts as a transpose (pytorch#195320)."""
    require_meta(kt)
    nd = len(val(kt).shape)
    name = op_name(kt)
    if name == "transpose":
        d0, d1 = sorted(normalize_dim(d, nd) for d in (arg(kt, 1, "dim0"), arg(kt, 2, "dim1")))
        if (d0, d1) == (nd - 2, nd - 1):
            return Operand(kt.args[0])
        raise Refused("k_permuted", f"K is transposed over dims ({d0}, {d1}), not the last two")
    if name == "permute":
        dims = kt.args[1] if len(kt.args) == 2 and isinstance(kt.args[1], (list, tuple)) else kt.args[1:]
        dims = kt.kwargs.get("dims", dims)
        dims = [normalize_dim(d, nd) for d in dims]
        if tuple(dims) == _swap_last(nd):
            return Operand(kt.args[0])
        raise Refused("k_permuted", f"K is permuted by {dims}, which is not a transpose of the last two dims")
    if name == "getattr" and kt.args[1] == "mT":
        return Operand(kt.args[0])
    return Operand(kt, _swap_last(nd))  # K^T was stored: the op reads it through a transposed view


# ---------------------------------------------------------------------------------------
# einsum


def _einsum_parts(node: fx.Node):
    """(input terms, output term, operands) with '...' spelled out as fresh capital letters."""
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(eq, str) or len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        raise Refused("unsupported_op", f"einsum {eq!r} is not a two-operand contraction")
    require_meta(*operands)
    eq = eq.replace(" ", "")
    lhs, out = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    if len(terms) != 2:
        raise Refused("unsupported_op", f"einsum {eq!r} is not a two-operand contraction")
    free = [c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eq]
    ell = set()
    for idx, (t, o) in enumerate(zip(terms, operands)):
        if "..." in t:
            ell.add(len(val(o).shape) - (len(t) - 3))
    if len(ell) > 1:
        raise Refused("unsupported_op", f"einsum {eq!r} broadcasts its '...' dims")
    fill = "".join(free[: ell.pop()]) if ell else ""
    terms = [t.replace("...", fill) for t in terms]
    if out is None:  # implicit output: '...' then the letters used once, in alphabetical order
        once = sorted(c for c in set("".join(terms)) if "".join(terms).count(c) == 1 and c not in fill)
        out = fill + "".join(once)
    out = out.replace("...", fill)
    for t, o in zip(terms, operands):
        if len(set(t)) != len(t) or len(t) != len(val(o).shape) or not t.isalpha():
            raise Refused("unsupported_op", f"einsum {node.args[0]!r} takes a diagonal or does not match the operand ranks")
    if len(set(out)) != len(out):
        raise Refused("unsupported_op", f"einsum {node.args[0]!r} repeats an output letter")
    return terms, out, operands


def einsum_qk(node: fx.Node):
    """einsum(Q K^T) -> (q, k, scores' letters). Any letters, '...', and any operand layouts."""
    (ta, tb), out, (na, nb) = _einsum_parts(node)
    if len(out) < 3:
        raise Refused("unsupported_op", f"einsum {node.args[0]!r} has no batch dims")
    batch, i, j = out[:-2], out[-2], out[-1]
    if j in ta and i in tb:  # einsum("..jd,..id->..ij", k, q): the keys come first
        (ta, tb), (na, nb) = (tb, ta), (nb, na)
    contracted = [c for c in ta if c in tb and c not in out]
    if len(contracted) != 1 or set(ta) != set(batch) | {i, contracted[0]} or set(tb) != set(batch) | {j, contracted[0]}:
        raise Refused("unsupported_op", f"einsum {node.args[0]!r} is not a batched Q K^T")
    d = contracted[0]
    q = Operand(na, _identity_or(ta.index(c) for c in batch + i + d))
    k = Operand(nb, _identity_or(tb.index(c) for c in batch + j + d))
    return q, k, out


def einsum_pv(node: fx.Node, probs: fx.Node, probs_letters: int):
    """einsum(P V) -> (v, output permutation or None). P must be laid out as the scores were."""
    (ta, tb), out, (na, nb) = _einsum_parts(node)
    if na is probs:
        tp, tv, nv = ta, tb, nb
    elif nb is probs:
        tp, tv, nv = tb, ta, na
    else:
        raise Refused("no_pv_matmul", "the probabilities are not an einsum operand")
    if len(tp) != probs_letters:
        raise Refused("unsupported_op", f"einsum {node.args[0]!r} reads the probabilities with another rank")
    batch, i, j = tp[:-2], tp[-2], tp[-1]
    extra = [c for c in tv if c not in tp]
    if len(extra) != 1 or set(tv) != set(batch) | {j, extra[0]} or j in out or set(out) != set(batch) | {i, extra[0]}:
        raise Refused("unsupported_op", f"einsum {node.args[0]!r} is not a batched P V")
    e = extra[0]
    v = Operand(nv, _identity_or(tv.index(c) for c in batch + j + e))
    canonical = batch + i + e
    return v, _identity_or(canonical.index(c) for c in out)


# ---------------------------------------------------------------------------------------
# Q K^T and P V


@dataclasses.dataclass
class QK:
    q: Operand
    k: Operand
    form: str                      # matmul, bmm, einsum, baddbmm
    alpha: float = 1.0             # baddbmm: alpha * (q @ k^T) + beta * input
    beta_input: Optional[tuple] = None   # (input node, beta) when beta != 0
    letters: Optional[str] = None  # einsum: the scores' letters, to read P V with


def qk_operands(qk: fx.Node) -> QK:
    name = op_name(qk)
    if name == "einsum":
        q, k, letters = einsum_qk(qk)
        return QK(q, k, "einsum", letters=letters)
    if name == "baddbmm":
        inp, a, b = qk.args[:3]
        beta, alpha = arg(qk, 3, "beta", 1), arg(qk, 4, "alpha", 1)
        # dynamic=True makes a float attribute a graph input: specialized, see constants.symbolic_scalar
        beta, alpha = (constants.symbolic_scalar(x) if isinstance(x, fx.Node) else x for x in (beta, alpha))
        if not (is_number(beta) and is_number(alpha)):
            raise Refused("scale_not_constant", "baddbmm alpha/beta are not constants")
        extra = (inp, float(beta)) if beta != 0 else None
        return QK(Operand(a), k_from_kt(b), "baddbmm", alpha=float(alpha), beta_input=extra)
    if len(qk.args) != 2 or qk.kwargs:
        raise Refused("unsupported_op", f"{qk.name} has unexpected arguments")
    return QK(Operand(qk.args[0]), k_from_kt(qk.args[1]), name)


def pv_operands(pv: fx.Node, probs: fx.Node, qk: QK):
    """(v, output permutation, form)."""
    name = op_name(pv)
    if name in ("matmul", "bmm"):
        if pv.args[0] is not probs or len(pv.args) != 2 or pv.kwargs:
            raise Refused("no_pv_matmul", "the probabilities are not the left operand of the output matmul")
        return Operand(pv.args[1]), None, name
    letters = len(qk.letters) if qk.letters else len(val(probs).shape)
    v, out_dims = einsum_pv(pv, probs, letters)
    return v, out_dims, "einsum"


# ---------------------------------------------------------------------------------------
# a constant factor on q or k, folded into the op's scale


def _constant_factor(x) -> Optional[float]:
    if is_number(x):
        return float(x)
    folded = constants.constant_tensor(x)
    if folded is not None and folded.numel() == 1 and folded.dim() == 0 and folded.is_floating_point():
        return float(folded.item())
    return None


def fold_factor(operand: Operand):
    """(operand without a positive constant `x * c` / `x / c`, c, the mul node) or (operand, 1.0, None).

    (c q) K^T = c (q K^T): the factor joins the op's scale, which the kernel applies to the fp32
    scores, and the mul node goes away if nothing else reads it.
    """
    node = operand.node
    name = op_name(node)
    if name not in ("mul", "div") or not single_user(node) or node.kwargs.get("rounding_mode") is not None:
        return operand, 1.0, None
    if len(node.args) != 2:
        return operand, 1.0, None
    a0, a1 = node.args
    if name == "div":
        src, c = a0, _constant_factor(a1)
        c = 1.0 / c if c else None
    elif isinstance(a0, fx.Node) and _constant_factor(a1) is not None:
        src, c = a0, _constant_factor(a1)
    else:
        src, c = a1, _constant_factor(a0)
    if c is None or not c > 0 or not isinstance(src, fx.Node) or not has_meta(src):
        return operand, 1.0, None
    v_src, v_out = val(src), val(node)
    if tuple(v_src.shape) != tuple(v_out.shape) or v_src.dtype != v_out.dtype:
        return operand, 1.0, None
    return Operand(src, operand.dims), c, node


# ---------------------------------------------------------------------------------------
# GQA: K/V repeated along heads


def unrepeat(node: fx.Node):
    """If `node` is K or V repeated per kv head (HF repeat_kv or repeat_interleave), (source, group)."""
    name = op_name(node)
    if name == "repeat_interleave":
        reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        src = node.args[0]
        if is_number(reps) and isinstance(dim, int) and has_meta(src) and len(val(src).shape) == 4 and normalize_dim(dim, 4) == 1:
            return src, int(reps)
        return node, 1
    if name in ("reshape", "view"):
        exp = node.args[0]
        if isinstance(exp, fx.Node) and op_name(exp) == "expand" and has_meta(exp):
            unsq = exp.args[0]
            es = tuple(val(exp).shape)
            if isinstance(unsq, fx.Node) and has_meta(unsq) and len(es) == 5 and tuple(val(node).shape) == (es[0], es[1] * es[2], es[3], es[4]):
                if tuple(val(unsq).shape) == (es[0], es[1], 1, es[3], es[4]):
                    src = _unsqueezed_source(unsq)
                    if src is not None:
                        return src, int(es[2])
    return node, 1


def _unsqueezed_source(node: fx.Node):
    # x[:, :, None, :, :] or x.unsqueeze(2): the 4-D tensor under a new dim 2.
    name = op_name(node)
    if name == "unsqueeze" and normalize_dim(arg(node, 1, "dim"), 5) == 2:
        return node.args[0]
    if name == "getitem" and isinstance(node.args[1], tuple):
        idx = node.args[1]
        full = slice(None, None, None)
        if idx in ((full, full, None), (full, full, None, full, full), (full, full, None, Ellipsis)):
            return node.args[0]
    return None
