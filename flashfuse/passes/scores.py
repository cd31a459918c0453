"""The score chain: from the softmax's input back to Q K^T, rewritten as the op's algebra.

The op computes  s = scale * q k^T + bias;  s = where(mask, s, mask_value);  causal -inf last.
User code applies scales, additive terms, masks and casts in any order, in place or not:

    s = q @ k.mT;  s /= 8;  s = s + alibi;  s.masked_fill_(~pad, -inf);  p = s.float().softmax(-1)

`walk` collects those steps (from the matmul outward); `terms` reads each as a scale, a
bias, a mask or a causal mask (constant-folded); `Algebra` commutes them into the op's
order, refusing the orders where that would change a result (a bias added after a finite
fill, two different fills, a finite fill over the causal -inf).

A causal mask filled with -inf becomes causal=True. One filled with a finite value F (HF's
`where(kv <= q, 0, finfo.min)`) becomes causal=True only where that is exact: F <= -1e30,
and no other mask or unbounded bias in the region that could leave a row with nothing but
masked keys. Then every row keeps its diagonal key with a real score, exp(F - rowmax)
is exactly 0 in fp32 as exp(-inf) is, and no gradient reaches a masked score either way.
Otherwise the mask stays a mask (or a bias) with its fill value, which the op takes as is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.fx as fx

from flashfuse.passes import constants
from flashfuse.passes.forms import require_meta
from flashfuse.passes.graph_utils import Refused, arg, is_inplace, is_number, op_name, val

QK_OPS = ("matmul", "bmm", "einsum", "baddbmm")
CAST_METHODS = ("float", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone")
SCORE_OPS = ("mul", "div", "add", "sub", "masked_fill", "where")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NEG_INF = float("-inf")
CAUSAL_FINITE_FILL = -1e30   # a finite causal fill at or below this may become causal=True
BOUNDED_BIAS = 1e30          # |bias| below this keeps such a row's kept scores real


def _shape(node) -> tuple:
    return tuple(val(node).shape)


def _dtype(node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def is_passthrough(node: fx.Node) -> bool:
    """A cast, or a view/reshape that keeps the shape (Falcon's scores.view(b, h, m, n)): values pass as they are."""
    name = op_name(node)
    if name in CAST_METHODS:
        return True
    if name in ("view", "reshape", "flatten") and node.args and isinstance(node.args[0], fx.Node):
        src, out = val(node.args[0]), val(node)
        return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and tuple(src.shape) == tuple(out.shape)
    return False


def fits_without_growing(small: tuple, big: tuple) -> bool:
    """True when broadcasting `small` against `big` leaves `big`'s shape unchanged."""
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(reversed(small), reversed(big)))


def scalar(x, what: str) -> float:
    """A compile-time constant number: a Python number or an in-graph constant 0-d tensor."""
    if is_number(x):
        return float(x)
    if isinstance(x, fx.Node):
        folded = constants.fold(x)
        if isinstance(folded, torch.Tensor) and folded.numel() == 1:
            return float(folded.reshape(()).item())
        symbolic = constants.symbolic_scalar(x) if what == "scale" else None  # dynamic shapes
        if symbolic is not None:
            return symbolic
    raise Refused(f"{what}_not_constant", f"{what} {x} is not a compile-time constant")


# ---------------------------------------------------------------------------------------
# walking the chain


@dataclasses.dataclass
class Step:
    node: fx.Node
    key: object      # where the scores enter: an index into node.args or a kwarg name
    name: str
    shape: tuple = ()  # the scores' shape at this step: [B*H, M, N] or [B, H, M, N] around a head view

    @property
    def chain_in(self) -> fx.Node:
        return _get(self.node, self.key)

    def others(self) -> list:
        """The operands besides the scores, positional then keyword."""
        args = [a for i, a in enumerate(self.node.args) if i != self.key]
        return args + [v for k, v in self.node.kwargs.items() if k != self.key and k in ("other", "input", "value", "mask")]


def _get(node: fx.Node, key):
    return node.args[key] if isinstance(key, int) else node.kwargs[key]


def where_parts(node: fx.Node):
    """(cond, if_true, if_false) for torch.where(c, a, b) and a.where(c, b)."""
    if node.op == "call_method":
        return arg(node, 1, "condition"), node.args[0], arg(node, 2, "other")
    return arg(node, 0, "condition"), arg(node, 1, "input"), arg(node, 2, "other")


def _candidate_keys(node: fx.Node) -> list:
    name = op_name(node)
    if is_passthrough(node) or name == "masked_fill" or is_inplace(node) or head_view_source(node) is not None:
        return [0]
    if name == "where":
        return [1, 2] if node.op == "call_function" else [0, 2]
    keys = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
    return keys + [k for k, v in node.kwargs.items() if isinstance(v, fx.Node) and k in ("input", "other")]


def leads_to_qk(node, depth: int = 12) -> bool:
    if depth == 0 or not isinstance(node, fx.Node):
        return False
    name = op_name(node)
    if name in QK_OPS:
        return True
    if is_passthrough(node) or name in SCORE_OPS or head_view_source(node) is not None:
        return any(leads_to_qk(_get(node, k), depth - 1) for k in _candidate_keys(node) if _has(node, k))
    return False


def _has(node: fx.Node, key) -> bool:
    return key < len(node.args) if isinstance(key, int) else key in node.kwargs


def _chain_key(node: fx.Node):
    """Which operand of a score op carries the scores: the one that leads back to a matmul."""
    for key in _candidate_keys(node):
        if _has(node, key) and leads_to_qk(_get(node, key)):
            return key
    return None


def _reads_only_metadata(user: fx.Node, x: fx.Node) -> bool:
    """`y.type_as(x)`, `y.to(x)`, `x.size()`: x's dtype or shape only, not its values."""
    if user.op != "call_method":
        return False
    if user.target in ("type_as", "to") and len(user.args) >= 2 and user.args[1] is x and user.args[0] is not x:
        return True
    return user.target in ("size", "dim", "numel") and user.args[0] is x


def _mutations_before(x: fx.Node, consumer: fx.Node) -> list:
    """In-place score ops on `x` whose results are dropped, between x and the node that reads it.

    `s.masked_fill_(m, v); softmax(s)` reads the mutated s: those ops join the chain. Any other
    reader of x would see scores the fused op no longer produces, so it refuses.
    """
    others = [u for u in x.users if u is not consumer and not _reads_only_metadata(u, x)]
    if not others:
        return []
    between = []
    n = x.next
    while n is not consumer and n.op != "root":
        between.append(n)
        n = n.next
    found = []
    for n in between:
        if n in others and is_inplace(n) and n.args and n.args[0] is x and not n.users and op_name(n) in SCORE_OPS:
            found.append(n)
    if len(found) != len(others):
        raise Refused("scores_reused", f"scores {x.name} are also used outside the attention region")
    return found


def head_view_source(node: fx.Node) -> Optional[tuple]:
    """For a view/reshape between [B*H, M, N] and [B, H, M, N] (either way): its input's shape."""
    if op_name(node) not in ("view", "reshape") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, out = val(node.args[0]), val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    src, out = tuple(src.shape), tuple(out.shape)
    three, four = (src, out) if len(src) == 3 else (out, src)
    if len(three) == 3 and len(four) == 4 and three[1:] == four[2:] and three[0] == four[0] * four[1]:
        return src
    return None


def walk(softmax: fx.Node, x: fx.Node, scores_shape: tuple):
    """(the Q K^T node, the chain's steps from the matmul outward, the scores' shape at Q K^T).

    Older HF attention (BART-era: XGLM, TrOCR, FSMT, LED...) views [B*H, M, N] scores as
    [B, H, M, N] to add a mask and back: those head views join the chain as steps too.
    """
    steps = []
    shape = scores_shape
    consumer, cur = softmax, x
    while True:
        for m in reversed(_mutations_before(cur, consumer)):
            require_meta(m)
            steps.append(Step(m, 0, op_name(m), shape))
        name = op_name(cur)
        if name in QK_OPS:
            return cur, steps[::-1], shape
        require_meta(cur)
        if _shape(cur) != shape:
            raise Refused("mask_broadcast", f"{cur.name} changes the scores' shape {list(_shape(cur))} vs {list(shape)}")
        source = head_view_source(cur)
        if source is not None:
            steps.append(Step(cur, 0, "head_view", shape))
            shape = source
        elif is_passthrough(cur) or name in SCORE_OPS:
            key = _chain_key(cur)
            if key is None:
                raise Refused("no_qk_matmul", f"{cur.name} does not lead back to a Q K^T matmul")
            steps.append(Step(cur, key, name, shape))
        else:
            raise Refused("unsupported_op", f"{cur.name} ({cur.target}) between Q K^T and softmax is not a scale, bias, mask or cast")
        consumer, cur = cur, _get(cur, steps[-1].key)


def head_split(steps: list) -> Optional[tuple]:
    """(B, H) when the chain views the scores between [B*H, M, N] and [B, H, M, N]."""
    splits = {tuple(_shape(s.node) if len(_shape(s.node)) == 4 else _shape(s.node.args[0]))[:2] for s in steps if s.name == "head_view"}
    if len(splits) > 1:
        raise Refused("unsupported_op", f"the scores are viewed with different head splits {sorted(splits)}")
    return splits.pop() if splits else None


# ---------------------------------------------------------------------------------------
# reading each step


@dataclasses.dataclass
class Term:
    kind: str                 # scale, bias, mask, causal_bias
    node: Optional[fx.Node] = None
    value: float = 1.0        # scale factor, or bias coefficient
    keep: bool = True         # mask: True where cond marks the kept scores
    fill: float = NEG_INF     # mask / causal_bias: the value a masked score gets
    causal: bool = False      # mask: cond is the constant top-left causal pattern


def _fill_in_dtype(fill: float, node: fx.Node) -> float:
    # masked_fill / where round their value to the scores' dtype (finfo(float32).min is -inf in fp16).
    dtype = _dtype(node) or torch.float32
    return float(torch.tensor(fill, dtype=torch.float64).to(dtype).item())


def terms(steps: list) -> list:
    out = []
    for step in steps:
        t = _term(step, step.shape)
        if t is not None:
            out.append(t)
    return out


def _term(step: Step, scores_shape: tuple) -> Optional[Term]:
    node, name = step.node, step.name
    if name == "head_view":
        return None
    if is_passthrough(node):
        if _dtype(node) not in SUPPORTED_DTYPES:
            raise Refused("unsupported_dtype", f"{node.name} casts the scores to {_dtype(node)}; the op computes them in fp32")
        return None
    if name in ("mul", "div"):
        if name == "div" and step.key not in (0, "input"):
            raise Refused("scale_not_constant", f"{node.name} divides by the scores")
        if node.kwargs.get("rounding_mode") is not None:
            raise Refused("unsupported_op", f"{node.name} rounds its quotient")
        others = step.others()
        c = scalar(others[0] if others else None, "scale")
        return Term("scale", value=c if name == "mul" else 1.0 / c)
    if name in ("add", "sub"):
        if name == "sub" and step.key not in (0, "input"):
            raise Refused("unsupported_op", f"{node.name} subtracts the scores from a tensor")
        others = [o for o in step.others() if o is not None]
        alpha = node.kwargs.get("alpha", 1)
        if not is_number(alpha):
            raise Refused("scale_not_constant", f"{node.name} has a non-constant alpha")
        coeff = float(alpha) * (-1.0 if name == "sub" else 1.0)
        other = others[0] if others else None
        if is_number(other) or _constant_scalar(other):
            return None  # a constant shift: softmax is invariant to it, and it has no gradient
        return bias_term(other, coeff, scores_shape, node.name)
    if name == "masked_fill":
        cond = arg(node, 1, "mask")
        fill = _fill_in_dtype(scalar(arg(node, 2, "value"), "mask_fill"), node)
        return mask_term(cond, keep=False, fill=fill, scores_shape=scores_shape)
    if name == "where":
        cond, a, b = where_parts(node)
        if a is step.chain_in:
            return mask_term(cond, keep=True, fill=_fill_in_dtype(scalar(b, "mask_fill"), node), scores_shape=scores_shape)
        return mask_term(cond, keep=False, fill=_fill_in_dtype(scalar(a, "mask_fill"), node), scores_shape=scores_shape)
    raise Refused("unsupported_op", f"{node.name} is not a score op")


def _constant_scalar(x) -> bool:
    value = constants.constant_tensor(x) if isinstance(x, fx.Node) else None
    return value is not None and value.numel() == 1 and value.dim() == 0 and bool(torch.isfinite(value).all())


def bias_term(other, coeff: float, scores_shape: tuple, where: str) -> Optional[Term]:
    if not isinstance(other, fx.Node):
        raise Refused("unsupported_op", f"{where} adds {other!r} to the scores")
    require_meta(other)
    shape = _shape(other)
    if not fits_without_growing(shape, scores_shape):
        raise Refused("mask_broadcast", f"bias {other.name} {list(shape)} would broadcast the scores {list(scores_shape)}")
    if not shape or shape[-1] != scores_shape[-1]:
        raise Refused("bias_broadcast_over_keys", f"bias {other.name} is constant along the keys")
    value = constants.constant_tensor(other)
    if value is not None and value.is_floating_point() and not bool(value.any()):
        return None  # an all-zero constant (T5's cross-attention position_bias)
    fill = constants.additive_causal_fill(other, scores_shape)
    if fill is not None and coeff > 0:
        return Term("causal_bias", other, value=coeff, fill=fill * coeff)
    return Term("bias", other, value=coeff)


def mask_term(cond, keep: bool, fill: float, scores_shape: tuple) -> Term:
    if not isinstance(cond, fx.Node):
        raise Refused("unsupported_op", "mask condition is not a tensor")
    require_meta(cond)
    if _dtype(cond) != torch.bool:
        raise Refused("unsupported_op", f"mask {cond.name} is not bool")
    if math.isnan(fill) or fill == float("inf"):
        raise Refused("mask_fill_value", f"mask fill value {fill} is not finite or -inf")
    shape = _shape(cond)
    if not fits_without_growing(shape, scores_shape):
        raise Refused("mask_broadcast", f"mask {cond.name} {list(shape)} would broadcast the scores {list(scores_shape)}")
    if not shape or shape[-1] != scores_shape[-1]:
        raise Refused("mask_broadcast_over_keys", f"mask {cond.name} is constant along the keys")
    return Term("mask", cond, keep=keep, fill=fill, causal=constants.is_causal_mask(cond, keep, scores_shape))


# ---------------------------------------------------------------------------------------
# the algebra


def _requires_grad(node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return bool(getattr(value, "requires_grad", False))


@dataclasses.dataclass
class Algebra:
    """The terms applied from the matmul outward, kept in the op's order."""

    scale: float = 1.0
    biases: list = dataclasses.field(default_factory=list)     # [(node, coeff)]
    masks: list = dataclasses.field(default_factory=list)      # [(node, keep, fill)]
    causal: bool = False
    finite_causal: list = dataclasses.field(default_factory=list)  # fills of finite causal masks made causal

    def mul(self, c: float) -> None:
        if not c > 0:
            raise Refused("scale_not_positive", f"scale {c} is not a positive number")
        self.scale *= c
        self.biases = [(b, coef * c) for b, coef in self.biases]
        self.masks = [(m, keep, fill * c) for m, keep, fill in self.masks]
        self.finite_causal = [f * c for f in self.finite_causal]

    def add(self, node: fx.Node, coeff: float) -> None:
        if any(math.isfinite(f) for _, _, f in self.masks):
            raise Refused("bias_after_finite_fill", "an additive term follows a mask filled with a finite value; the fused op adds biases before masking")
        if self.masks and _requires_grad(node):
            # A row the mask empties: eager's add passes softmax's NaN gradient to the bias, the
            # op (bias before mask) gives it 0 there. Without a trainable bias both orders agree.
            raise Refused("bias_grad_after_mask", "a bias that requires grad follows a -inf mask; in a row the mask empties eager's bias gradient is NaN, the fused op's 0")
        self.biases.append((node, coeff))

    def mask(self, node: fx.Node, keep: bool, fill: float) -> None:
        if math.isfinite(fill) and self.causal:
            raise Refused("finite_fill_after_causal", "a finite-fill mask follows the causal mask; eager would overwrite -inf where both mask")
        if self.masks and any(f != fill for _, _, f in self.masks):
            raise Refused("fill_values_differ", "two masks use different fill values")
        self.masks.append((node, keep, fill))

    def make_causal(self, fill: float) -> None:
        self.causal = True
        if math.isfinite(fill):
            self.finite_causal.append(fill)

    def finite_causal_is_exact(self) -> bool:
        """May the finite causal fills become -inf? (see the module docstring)"""
        if any(f > CAUSAL_FINITE_FILL for f in self.finite_causal) or self.masks:
            return False
        for b, _ in self.biases:
            value = constants.constant_tensor(b)
            if value is None or not value.is_floating_point() or not bool((value.abs() <= BOUNDED_BIAS).all()):
                return False
        return True


def apply(ts: list) -> Algebra:
    """The op's algebra for the terms, from the matmul outward."""
    try:
        algebra = _apply(ts, promote=True)
        if not algebra.finite_causal or algebra.finite_causal_is_exact():
            return algebra
    except Refused:
        pass
    return _apply(ts, promote=False)


def _apply(ts: list, promote: bool) -> Algebra:
    a = Algebra()
    # An additive causal term passes gradient where a masked_fill blocks it: in a row a -inf
    # bool mask empties, eager then sends softmax's NaN gradient through the causal -inf,
    # while the op's causal=True zeroes dS there. With such masks around it stays a -inf bias.
    # (A finite fill never empties a row: nothing differs.)
    bool_masks = any(t.kind == "mask" and not t.causal and t.fill == NEG_INF for t in ts)
    for t in ts:
        if t.kind == "scale":
            a.mul(t.value)
        elif t.kind == "bias":
            a.add(t.node, t.value)
        elif t.kind == "causal_bias":
            if (t.fill == NEG_INF or promote) and not bool_masks:
                a.make_causal(t.fill)
            else:
                a.add(t.node, t.value)
        elif t.causal and (t.fill == NEG_INF or promote):
            a.make_causal(t.fill)
        else:
            a.mask(t.node, t.keep, t.fill)
    return a
