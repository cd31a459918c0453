"""Detection: find softmax(scale * Q K^T + bias, masks) [dropout] @ V regions in a Dynamo graph.

For each softmax node it walks back through casts, masks, biases and scales to the Q K^T
matmul, and forward through casts and dropout to the P V matmul, proving at each step that
the fused op computes the same function. The result is a `Region` (with its AttentionSpec)
or a `Refusal` whose reason the explain report shows. Nothing here edits the graph.

    before:  s = q @ k.transpose(-2, -1) * 0.125; s = s.masked_fill(pad, -inf)
             p = softmax(s.float(), -1).type_as(q); p = dropout(p, 0.1); y = p @ v
    region:  q, k, v, masks=[(pad, keep=False)], scale=0.125, dropout=0.1, mask_value=-inf
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.fx as fx

from flashfuse.passes import constants
from flashfuse.passes.graph_utils import arg, has_meta, is_number, normalize_dim, op_name, single_user, stack_location, val
from flashfuse.spec import AttentionSpec

QK_OPS = ("matmul", "bmm", "einsum", "baddbmm")
PV_OPS = ("matmul", "bmm", "einsum")
CAST_METHODS = ("float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NEG_INF = float("-inf")


class Refused(Exception):
    """Raised inside detection; carries a short snake_case reason and a detail sentence."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class Refusal:
    reason: str
    detail: str
    location: str
    node: str

    def __str__(self) -> str:
        return f"{self.location} ({self.node}): refused [{self.reason}] {self.detail}"


@dataclasses.dataclass
class Region:
    """One proven attention region: the nodes it replaces and the op arguments that replace them."""

    softmax: fx.Node
    pv: fx.Node
    q: fx.Node
    k: Any                     # node holding K [.., N, D], or ("mT", node) for a stored K^T
    v: fx.Node
    scale: float
    causal: bool
    dropout_p: float
    gqa_group: int
    biases: list               # [(node, coefficient)]
    masks: list                # [(node, is_keep_mask)]
    mask_value: float
    layout: str
    chain: list                # region nodes, erased after the rewrite if nothing else uses them
    spec: AttentionSpec
    location: str


# ---------------------------------------------------------------------------------------
# small readers


def _dtype_of(node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _shape(node) -> tuple:
    return tuple(val(node).shape)


def _require_meta(*nodes) -> None:
    for n in nodes:
        if isinstance(n, fx.Node) and not has_meta(n):
            raise Refused("missing_meta", f"node {n.name} has no Dynamo example value")


def _scalar(x, what: str) -> float:
    """A compile-time constant number: a Python number or an in-graph constant 0-d tensor."""
    if is_number(x):
        return float(x)
    if isinstance(x, fx.Node):
        folded = constants.fold(x)
        if isinstance(folded, torch.Tensor) and folded.numel() == 1:
            return float(folded.reshape(()).item())
    raise Refused("scale_not_constant" if what == "scale" else f"{what}_not_constant", f"{what} {x} is not a compile-time constant")


def _fits_without_growing(small: tuple, big: tuple) -> bool:
    """True when broadcasting `small` against `big` leaves `big`'s shape unchanged."""
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(reversed(small), reversed(big)))


def _softmax_args(node: fx.Node):
    if node.op == "call_method":
        return node.args[0], arg(node, 1, "dim"), arg(node, 2, "dtype")
    if node.target is torch.nn.functional.softmax:
        return arg(node, 0, "input"), arg(node, 1, "dim"), arg(node, 3, "dtype")
    return arg(node, 0, "input"), arg(node, 1, "dim"), arg(node, 2, "dtype")


# ---------------------------------------------------------------------------------------
# the score chain: softmax input back to the Q K^T matmul


def _tensor_args(node: fx.Node) -> list:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _chain_input(node: fx.Node) -> Optional[fx.Node]:
    """Which argument of a score op carries the scores (the one that leads to a matmul)."""
    name = op_name(node)
    if name in CAST_METHODS:
        return node.args[0]
    if name == "masked_fill":
        return node.args[0]
    if name == "where":
        cands = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
    else:
        cands = _tensor_args(node)
    for c in cands:
        if _leads_to_qk(c, 12):
            return c
    return None


def _leads_to_qk(node: fx.Node, depth: int) -> bool:
    if depth == 0 or not isinstance(node, fx.Node):
        return False
    name = op_name(node)
    if name in QK_OPS:
        return True
    if name in CAST_METHODS or name in ("mul", "div", "add", "sub", "masked_fill", "where"):
        return _chain_input_shallow(node, depth - 1)
    return False


def _chain_input_shallow(node: fx.Node, depth: int) -> bool:
    if op_name(node) in CAST_METHODS or op_name(node) == "masked_fill":
        return _leads_to_qk(node.args[0], depth)
    return any(_leads_to_qk(a, depth) for a in _tensor_args(node))


@dataclasses.dataclass
class _Scores:
    """The algebra of the score chain, applied from the matmul outward."""

    scale: float = 1.0
    biases: list = dataclasses.field(default_factory=list)     # [(node, coeff)]
    masks: list = dataclasses.field(default_factory=list)      # [(node, keep, fill)]
    causal: bool = False

    def fills(self) -> set:
        return {f for _, _, f in self.masks} | ({NEG_INF} if self.causal else set())

    def mul(self, c: float) -> None:
        if not c > 0:
            raise Refused("scale_not_positive", f"scale {c} is not a positive number")
        self.scale *= c
        self.biases = [(b, coef * c) for b, coef in self.biases]
        self.masks = [(m, keep, fill * c) for m, keep, fill in self.masks]

    def add(self, node: fx.Node, coeff: float) -> None:
        if any(math.isfinite(f) for f in self.fills()):
            raise Refused("bias_after_finite_fill", "an additive term follows a mask filled with a finite value; the fused op adds biases before masking")
        self.biases.append((node, coeff))

    def mask(self, node: fx.Node, keep: bool, fill: float, causal: bool) -> None:
        if math.isnan(fill) or fill == float("inf"):
            raise Refused("mask_fill_value", f"mask fill value {fill} is not finite or -inf")
        if causal and fill == NEG_INF:
            self.causal = True
            return
        if math.isfinite(fill) and self.causal:
            raise Refused("finite_fill_after_causal", "a finite-fill mask follows the causal mask; eager would overwrite -inf where both mask")
        if self.masks and any(f != fill for _, _, f in self.masks):
            raise Refused("fill_values_differ", "two masks use different fill values")
        self.masks.append((node, keep, fill))


def _fill_in_dtype(fill: float, node: fx.Node) -> float:
    # masked_fill rounds its value to the scores' dtype (finfo(float32).min is -inf in bf16).
    dtype = _dtype_of(node) or torch.float32
    return float(torch.tensor(fill, dtype=torch.float64).to(dtype).item())


def _walk_scores(softmax_in: fx.Node, scores_shape: tuple):
    """Returns (qk node, list of chain ops from the matmul outward, chain nodes)."""
    ops = []
    node = softmax_in
    while op_name(node) not in QK_OPS:
        _require_meta(node)
        name = op_name(node)
        if name is None or (name not in CAST_METHODS and name not in ("mul", "div", "add", "sub", "masked_fill", "where")):
            raise Refused("unsupported_op", f"{node.name} ({node.target}) between Q K^T and softmax is not a scale, bias, mask or cast")
        if _shape(node) != scores_shape:
            raise Refused("mask_broadcast", f"{node.name} changes the scores' shape {list(_shape(node))} vs {list(scores_shape)}")
        nxt = _chain_input(node)
        if nxt is None:
            raise Refused("no_qk_matmul", f"{node.name} does not lead back to a Q K^T matmul")
        if not single_user(nxt):
            raise Refused("scores_reused", f"scores {nxt.name} are also used outside the attention region")
        ops.append((name, node, nxt))
        node = nxt
    if node is not softmax_in and not single_user(node):
        raise Refused("scores_reused", f"scores {node.name} are also used outside the attention region")
    return node, list(reversed(ops))


def _apply_chain(ops, scores: _Scores, scores_shape: tuple) -> None:
    for name, node, chain_in in ops:
        others = [a for a in node.args if a is not chain_in]
        if name in CAST_METHODS:
            continue
        if name in ("mul", "div"):
            if name == "div" and node.args[0] is not chain_in:
                raise Refused("scale_not_constant", f"{node.name} divides by the scores")
            c = _scalar(others[0] if others else node.kwargs.get("other"), "scale")
            scores.mul(c if name == "mul" else 1.0 / c)
        elif name in ("add", "sub"):
            if name == "sub" and node.args[0] is not chain_in:
                raise Refused("unsupported_op", f"{node.name} subtracts the scores from a tensor")
            other = others[0] if others else node.kwargs.get("other")
            alpha = node.kwargs.get("alpha", 1)
            if not is_number(alpha):
                raise Refused("scale_not_constant", f"{node.name} has a non-constant alpha")
            coeff = float(alpha) * (-1.0 if name == "sub" else 1.0)
            if is_number(other):
                continue  # a constant shift: softmax is invariant to it, and it has no gradient
            _require_meta(other)
            if not _fits_without_growing(_shape(other), scores_shape):
                raise Refused("mask_broadcast", f"bias {other.name} {list(_shape(other))} would broadcast the scores {list(scores_shape)}")
            if _shape(other)[-1] != scores_shape[-1]:
                raise Refused("bias_broadcast_over_keys", f"bias {other.name} is constant along the keys")
            causal_bias = constants.additive_causal(other, scores_shape)
            if causal_bias:
                scores.mask(other, True, NEG_INF, causal=True)
            else:
                scores.add(other, coeff)
        elif name == "masked_fill":
            cond = arg(node, 1, "mask")
            fill = _fill_in_dtype(_scalar(arg(node, 2, "value"), "mask_fill"), node)
            _mask(scores, cond, keep=False, fill=fill, scores_shape=scores_shape)
        elif name == "where":
            cond, a, b = node.args[:3]
            if a is chain_in:
                _mask(scores, cond, keep=True, fill=_fill_in_dtype(_scalar(b, "mask_fill"), node), scores_shape=scores_shape)
            else:
                _mask(scores, cond, keep=False, fill=_fill_in_dtype(_scalar(a, "mask_fill"), node), scores_shape=scores_shape)


def _mask(scores: _Scores, cond, keep: bool, fill: float, scores_shape: tuple) -> None:
    if not isinstance(cond, fx.Node):
        raise Refused("unsupported_op", "mask condition is not a tensor")
    _require_meta(cond)
    if _dtype_of(cond) != torch.bool:
        raise Refused("unsupported_op", f"mask {cond.name} is not bool")
    if not _fits_without_growing(_shape(cond), scores_shape):
        raise Refused("mask_broadcast", f"mask {cond.name} {list(_shape(cond))} would broadcast the scores {list(scores_shape)}")
    if _shape(cond)[-1] != scores_shape[-1]:
        raise Refused("mask_broadcast_over_keys", f"mask {cond.name} is constant along the keys")
    scores.mask(cond, keep, fill, causal=constants.is_causal_mask(cond, keep, scores_shape))


# ---------------------------------------------------------------------------------------
# Q K^T and P V


def _qk_operands(qk: fx.Node, scores: _Scores):
    """Returns (q, k_or_mT, form). k_or_mT is a node holding K, or ("mT", node) holding K^T."""
    name = op_name(qk)
    if name == "einsum":
        return _einsum_qk(qk)
    if name == "baddbmm":
        inp, a, b = qk.args[:3]
        beta, alpha = qk.kwargs.get("beta", 1), qk.kwargs.get("alpha", 1)
        if not (is_number(beta) and is_number(alpha)):
            raise Refused("scale_not_constant", "baddbmm alpha/beta are not constants")
        if beta != 0:
            _require_meta(inp)
            scores_shape = _shape(qk)
            if not _fits_without_growing(_shape(inp), scores_shape):
                raise Refused("mask_broadcast", "baddbmm input would broadcast the scores")
            scores.add(inp, float(beta) / float(alpha) if alpha else 0.0)
        scores.scale = float(alpha)
        if alpha == 0:
            raise Refused("scale_not_positive", "baddbmm alpha is 0")
        return a, _k_from_kt(b), "baddbmm"
    if len(qk.args) != 2 or qk.kwargs:
        raise Refused("unsupported_op", f"{qk.name} has unexpected arguments")
    return qk.args[0], _k_from_kt(qk.args[1]), name


def _k_from_kt(kt: fx.Node):
    """K^T operand -> K. Only a swap of the last two dims counts as a transpose (pytorch#195320)."""
    _require_meta(kt)
    nd = len(_shape(kt))
    name = op_name(kt)
    if name == "transpose":
        d0, d1 = sorted(normalize_dim(d, nd) for d in kt.args[1:3])
        if (d0, d1) == (nd - 2, nd - 1):
            return kt.args[0]
        raise Refused("k_permuted", f"K is transposed over dims ({d0}, {d1}), not the last two")
    if name == "permute":
        dims = kt.args[1] if len(kt.args) == 2 and isinstance(kt.args[1], (list, tuple)) else kt.args[1:]
        dims = [normalize_dim(d, nd) for d in dims]
        if dims == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return kt.args[0]
        raise Refused("k_permuted", f"K is permuted by {dims}, which is not a transpose of the last two dims")
    if name == "getattr" and kt.args[1] == "mT":
        return kt.args[0]
    return ("mT", kt)


def _parse_einsum(node: fx.Node):
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(eq, str) or "->" not in eq or "." in eq or len(operands) != 2:
        raise Refused("unsupported_op", f"einsum {eq!r} is not a two-operand explicit contraction")
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    return a, b, out, operands


def _einsum_qk(node: fx.Node):
    a, b, out, (qn, kn) = _parse_einsum(node)
    contracted = [c for c in a if c in b and c not in out]
    batch = out[:-2]
    i, j = out[-2], out[-1]
    if len(contracted) != 1 or sorted(a) != sorted(batch + i + contracted[0]) or sorted(b) != sorted(batch + j + contracted[0]):
        raise Refused("unsupported_op", f"einsum {node.args[0]!r} is not a batched Q K^T")
    d = contracted[0]
    if a != batch + i + d:
        raise Refused("unsupported_op", f"einsum {node.args[0]!r}: Q is not laid out as (batch..., i, d)")
    if b == batch + j + d:
        return qn, kn, "einsum"
    if b == batch + d + j:
        return qn, ("mT", kn), "einsum"
    raise Refused("k_permuted", f"einsum {node.args[0]!r} reads K with its batch dims permuted")


def _pv_operands(pv: fx.Node, probs: fx.Node):
    name = op_name(pv)
    if name in ("matmul", "bmm"):
        if pv.args[0] is not probs or len(pv.args) != 2:
            raise Refused("no_pv_matmul", "the probabilities are not the left operand of the output matmul")
        return pv.args[1], name
    a, b, out, (pn, vn) = _parse_einsum(pv)
    if pn is not probs:
        raise Refused("no_pv_matmul", "the probabilities are not the first einsum operand")
    batch = out[:-2]
    if len(a) < 2 or a[:-2] != batch or b != batch + a[-1] + out[-1] or out[-2] != a[-2]:
        raise Refused("unsupported_op", f"einsum {pv.args[0]!r} is not a batched P V")
    return vn, "einsum"


def _walk_probs(softmax: fx.Node):
    """From the softmax forward: casts and dropout, then the P V matmul."""
    node = softmax
    dropout_p = 0.0
    chain = []
    while True:
        if not single_user(node):
            raise Refused("probs_reused", f"attention probabilities {node.name} are also used outside the region (e.g. returned attention weights)")
        user = next(iter(node.users))
        name = op_name(user)
        if name in CAST_METHODS and user.args[0] is node:
            chain.append(user)
            node = user
        elif name == "dropout":
            p = arg(user, 1, "p", 0.5)
            training = arg(user, 2, "training" if user.target is torch.nn.functional.dropout else "train", True)
            if not is_number(p) or not isinstance(training, bool):
                raise Refused("dropout_not_constant", f"dropout {user.name} has p={p} training={training}, not constants")
            if training and p > 0:
                if dropout_p:
                    raise Refused("unsupported_op", "two dropouts in one region")
                if not p < 1:
                    raise Refused("dropout_not_constant", f"dropout p={p} drops everything")
                dropout_p = float(p)
            chain.append(user)
            node = user
        elif name in PV_OPS:
            return user, node, dropout_p, chain
        else:
            raise Refused("no_pv_matmul", f"the probabilities flow into {user.name} ({user.target}), not a P V matmul")


# ---------------------------------------------------------------------------------------
# GQA: K/V repeated along heads


def _unrepeat(node, heads: int):
    """If node is K or V repeated per kv head (HF repeat_kv or repeat_interleave), return (source, group)."""
    if not isinstance(node, fx.Node):
        return node, 1
    name = op_name(node)
    if name == "repeat_interleave":
        reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        src = node.args[0]
        if is_number(reps) and dim is not None and has_meta(src) and normalize_dim(dim, len(_shape(src))) == 1 and len(_shape(src)) == 4:
            return src, int(reps)
        return node, 1
    if name == "reshape" or name == "view":
        exp = node.args[0]
        if isinstance(exp, fx.Node) and op_name(exp) == "expand" and has_meta(exp):
            unsq = exp.args[0]
            es = _shape(exp)
            if isinstance(unsq, fx.Node) and has_meta(unsq) and len(es) == 5 and _shape(node) == (es[0], es[1] * es[2], es[3], es[4]):
                us = _shape(unsq)
                if us == (es[0], es[1], 1, es[3], es[4]):
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


# ---------------------------------------------------------------------------------------
# the driver


def analyze(softmax: fx.Node) -> Region:
    """Prove one softmax node is the heart of an attention region, or raise Refused."""
    x, dim, sm_dtype = _softmax_args(softmax)
    _require_meta(softmax, x)
    nd = len(_shape(x))
    if not isinstance(dim, int):
        raise Refused("softmax_dim", f"softmax dim {dim!r} is not a constant")
    if normalize_dim(dim, nd) != nd - 1:
        raise Refused("softmax_dim", f"softmax over dim {dim} of a {nd}-D tensor, not the key dim")
    pv, probs, dropout_p, post_chain = _walk_probs(softmax)
    if not single_user(x) and x is not None:
        raise Refused("scores_reused", f"scores {x.name} are also used outside the attention region")
    scores_shape = _shape(x)
    if nd not in (3, 4):
        raise Refused("unsupported_rank", f"scores are {nd}-D; only 3-D and 4-D attention is fused")
    qk, ops = _walk_scores(x, scores_shape)
    _require_meta(qk, pv)
    if _shape(qk) != scores_shape:
        raise Refused("mask_broadcast", "the scores change shape between Q K^T and softmax")
    scores = _Scores()
    q, k, qk_form = _qk_operands(qk, scores)
    _apply_chain(ops, scores, scores_shape)
    v, pv_form = _pv_operands(pv, probs)
    k_node = k[1] if isinstance(k, tuple) else k
    _require_meta(q, k_node, v)
    return _build_region(softmax, sm_dtype, qk, pv, q, k, v, scores, dropout_p, ops, post_chain, qk_form, pv_form)


def _build_region(softmax, sm_dtype, qk, pv, q, k, v, scores, dropout_p, ops, post_chain, qk_form, pv_form) -> Region:
    qs, vs = _shape(q), _shape(v)
    k_node = k[1] if isinstance(k, tuple) else k
    ks = _shape(k_node)
    if isinstance(k, tuple):
        ks = ks[:-2] + (ks[-1], ks[-2])
    nd = len(qs)
    if len(ks) != nd or len(vs) != nd:
        raise Refused("unsupported_rank", f"q, k, v ranks differ: {len(qs)}, {len(ks)}, {len(vs)}")
    dtypes = {_dtype_of(q), _dtype_of(k_node), _dtype_of(v), _dtype_of(pv)}
    if len(dtypes) != 1:
        raise Refused("unsupported_dtype", f"q, k, v and output dtypes differ: {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    if dtype not in SUPPORTED_DTYPES:
        raise Refused("unsupported_dtype", f"dtype {dtype} is not fp16, bf16 or fp32")
    if ks[-1] != qs[-1] or vs[-2] != ks[-2]:
        raise Refused("unsupported_op", "q/k head dims or k/v lengths differ")
    if qs[:-2] != tuple(_shape(qk))[:-2]:
        raise Refused("kv_broadcast", "q is broadcast by the matmul")
    group = 1
    if nd == 4:
        hq = qs[1]
        if ks[:-2] != qs[:-2] or vs[:-2] != qs[:-2]:
            if ks[0] == qs[0] and vs[:-2] == ks[:-2] and ks[1] == 1:
                group = hq  # MQA through broadcasting over a head dim of 1
            else:
                raise Refused("kv_broadcast", f"k/v batch dims {list(ks[:-2])}/{list(vs[:-2])} do not match q {list(qs[:-2])}")
        else:
            k_src, gk = _unrepeat(k if not isinstance(k, tuple) else None, hq)
            v_src, gv = _unrepeat(v, hq)
            if gk == gv and gk > 1 and not isinstance(k, tuple):
                k, v, group = k_src, v_src, gk
    elif ks[:-2] != qs[:-2] or vs[:-2] != qs[:-2]:
        raise Refused("kv_broadcast", "3-D k/v batch dims do not match q")
    causal = scores.causal
    if causal and qs[-2] > ks[-2]:
        pass  # top-left causal with M > N is still well defined
    mask_value = scores.masks[0][2] if scores.masks else NEG_INF
    sm = sm_dtype if isinstance(sm_dtype, torch.dtype) else _dtype_of(softmax.args[0] if softmax.args else None)
    final_k = k[1] if isinstance(k, tuple) else k
    k_shape4 = _shape(final_k) if not isinstance(k, tuple) else ks
    to4 = (lambda s: (1,) + tuple(s)) if nd == 3 else (lambda s: tuple(s))
    bias_rg = any(bool(getattr(val(b), "requires_grad", False)) for b, _ in scores.biases)
    spec = AttentionSpec(
        scale=scores.scale,
        causal=causal,
        dropout_p=dropout_p,
        gqa_group=group,
        softmax_dtype=str(sm or dtype).replace("torch.", ""),
        dtype=str(dtype).replace("torch.", ""),
        q_shape=to4(qs),
        k_shape=to4(k_shape4),
        v_shape=to4(_shape(v)),
        layout=f"{nd}d",
        k_form="stored_transposed" if isinstance(k, tuple) else "transpose",
        bias_shapes=tuple(tuple(_shape(b)) for b, _ in scores.biases),
        bias_requires_grad=bias_rg,
        mask_shapes=tuple(tuple(_shape(m)) for m, _, _ in scores.masks),
        mask_value=mask_value,
        qk_form=qk_form,
        pv_form=pv_form,
    )
    chain = [qk] + [n for _, n, _ in ops] + [softmax] + post_chain
    return Region(
        softmax=softmax,
        pv=pv,
        q=q,
        k=k,
        v=v,
        scale=scores.scale,
        causal=causal,
        dropout_p=dropout_p,
        gqa_group=group,
        biases=scores.biases,
        masks=[(m, keep) for m, keep, _ in scores.masks],
        mask_value=mask_value,
        layout=f"{nd}d",
        chain=chain,
        spec=spec,
        location=stack_location(softmax),
    )


def find_regions(gm: fx.GraphModule):
    """All attention candidates of a graph: (regions, refusals)."""
    regions, refusals = [], []
    for node in gm.graph.nodes:
        if op_name(node) != "softmax":
            continue
        try:
            regions.append(analyze(node))
        except Refused as r:
            if r.reason == "no_pv_matmul" and not _near_matmul(node):
                continue  # a plain softmax (a classifier head, say): not an attention candidate
            refusals.append(Refusal(r.reason, r.detail, stack_location(node), node.name))
    return regions, refusals


def _near_matmul(softmax: fx.Node) -> bool:
    x = softmax.args[0] if softmax.args else None
    return isinstance(x, fx.Node) and _leads_to_qk(x, 12)
