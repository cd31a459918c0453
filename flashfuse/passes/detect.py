"""Detection: find softmax(scale * Q K^T + bias, masks) [dropout] @ V regions in a Dynamo graph.

For each softmax node it walks back through casts, masks, biases and scales to the Q K^T
matmul, and forward through casts and dropout to the P V matmul, proving at each step that
the fused op computes the same function. The result is a `Region` (with its AttentionSpec)
or a `Refusal` whose reason the explain report shows. Nothing here edits the graph.

    before:  s = q @ k.transpose(-2, -1) * 0.125; s = s.masked_fill(pad, -inf)
             p = softmax(s.float(), -1).type_as(q); p = dropout(p, 0.1); y = p @ v
    region:  q, k, v, masks=[(pad, keep=False)], scale=0.125, dropout=0.1, mask_value=-inf

The pieces: `forms` reads the operands (matmul/bmm/baddbmm/einsum, K's transpose, GQA
repeats, a constant factor on q or k), `scores` the chain between Q K^T and the softmax
(scales, biases, masks, casts, in place or not) and `constants` proves masks causal.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from flashfuse.passes import constants, forms, scores
from flashfuse.passes.forms import Operand, require_meta
from flashfuse.passes.graph_utils import Refused, arg, is_number, normalize_dim, op_name, single_user, stack_location, val
from flashfuse.passes.scores import NEG_INF, QK_OPS, SUPPORTED_DTYPES, is_passthrough
from flashfuse.spec import AttentionSpec

__all__ = ["Refused", "Refusal", "Region", "analyze", "find_regions"]

PV_OPS = ("matmul", "bmm", "einsum")


@dataclasses.dataclass
class Refusal:
    reason: str
    detail: str
    location: str
    node: str
    error: Optional[BaseException] = dataclasses.field(default=None, repr=False, compare=False)  # detection_failed: the exception

    def __str__(self) -> str:
        return f"{self.location} ({self.node}): refused [{self.reason}] {self.detail}"


@dataclasses.dataclass
class Region:
    """One proven attention region: the nodes it replaces and the op arguments that replace them.

    q, k and v are nodes; where the user's layout is not the op's [.., L, D], `q_dims`,
    `k_dims` and `v_dims` are the permutations that view them that way (K stored as K^T has
    k_dims swapping the last two dims), and `out_dims` permutes the op's output back. 3-D
    tensors [G, L, D] are the op's [1, G, L, D], or [B, H, L, D] with `split` = (B, H).
    """

    softmax: fx.Node
    pv: fx.Node
    q: fx.Node
    k: fx.Node
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
    q_dims: Optional[tuple] = None
    k_dims: Optional[tuple] = None
    v_dims: Optional[tuple] = None
    out_dims: Optional[tuple] = None
    split: Optional[tuple] = None  # (B, H): 3-D [B*H, L, D] tensors are viewed as [B, H, L, D]


def _shape(node) -> tuple:
    return tuple(val(node).shape)


def _dtype_of(node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _softmax_args(node: fx.Node):
    if node.op == "call_method":
        return node.args[0], arg(node, 1, "dim"), arg(node, 2, "dtype")
    if node.target is torch.nn.functional.softmax:
        return arg(node, 0, "input"), arg(node, 1, "dim"), arg(node, 3, "dtype")
    return arg(node, 0, "input"), arg(node, 1, "dim"), arg(node, 2, "dtype")


# ---------------------------------------------------------------------------------------
# the probabilities: softmax forward to P V


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
        if is_passthrough(user) and user.args[0] is node:
            if _dtype_of(user) not in SUPPORTED_DTYPES:
                raise Refused("unsupported_dtype", f"{user.name} casts the probabilities to {_dtype_of(user)}")
            chain.append(user)
            node = user
        elif name == "dropout" and user.args and user.args[0] is node:
            p = arg(user, 1, "p", 0.5)
            training = arg(user, 2, "training" if user.target is torch.nn.functional.dropout else "train", True)
            if isinstance(p, fx.Node):  # dynamic=True makes a float attribute (nn.Dropout's p) a graph input
                p = 0.0 if training is False else constants.symbolic_scalar(p)
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
        elif _head_view_round_trip(user, node):  # XGLM-style probs.view(b, h, m, n).view(b * h, m, n)
            back = next(iter(user.users))
            chain += [user, back]
            node = back
        elif name in PV_OPS:
            return user, node, dropout_p, chain
        else:
            raise Refused("no_pv_matmul", f"the probabilities flow into {user.name} ({user.target}), not a P V matmul")


def _head_view_round_trip(user: fx.Node, node: fx.Node) -> bool:
    if user.args[0] is not node or scores.head_view_source(user) is None or not single_user(user):
        return False
    back = next(iter(user.users))
    return scores.head_view_source(back) is not None and back.args[0] is user and _shape(back) == _shape(node)


# ---------------------------------------------------------------------------------------
# the driver


def analyze(softmax: fx.Node) -> Region:
    """Prove one softmax node is the heart of an attention region, or raise Refused."""
    x, dim, sm_dtype = _softmax_args(softmax)
    require_meta(softmax, x)
    nd = len(_shape(x))
    if not isinstance(dim, int):
        raise Refused("softmax_dim", f"softmax dim {dim!r} is not a constant")
    if normalize_dim(dim, nd) != nd - 1:
        raise Refused("softmax_dim", f"softmax over dim {dim} of a {nd}-D tensor, not the key dim")
    if isinstance(sm_dtype, torch.dtype) and sm_dtype not in SUPPORTED_DTYPES:
        raise Refused("unsupported_dtype", f"softmax runs in {sm_dtype}; the op computes it in fp32")
    pv, probs, dropout_p, post_chain = _walk_probs(softmax)
    scores_shape = _shape(x)
    if nd not in (3, 4):
        raise Refused("unsupported_rank", f"scores are {nd}-D; only 3-D and 4-D attention is fused")
    qk, steps, qk_shape = scores.walk(softmax, x, scores_shape)
    require_meta(qk, pv)
    if _shape(qk) != qk_shape:
        raise Refused("mask_broadcast", "the scores change shape between Q K^T and softmax")
    operands = forms.qk_operands(qk)
    ts = [scores.Term("scale", value=operands.alpha)]
    if operands.beta_input is not None:
        inp, beta = operands.beta_input
        bias = scores.bias_term(inp, beta, qk_shape, qk.name)
        ts += [bias] if bias is not None else []
    ts += scores.terms(steps)
    algebra = scores.apply(ts)
    v, out_dims, pv_form = forms.pv_operands(pv, probs, operands)
    require_meta(operands.q.node, operands.k.node, v.node)
    split = scores.head_split(steps)
    return _build_region(softmax, sm_dtype, qk, pv, operands, v, out_dims, algebra, dropout_p, steps, post_chain, pv_form, split)


def _fold_factors(q: Operand, k: Operand, algebra):
    """Constant factors on q and k join the op's scale; their mul nodes join the region."""
    folded = []
    for which in ("q", "k"):
        operand = q if which == "q" else k
        new, c, node = forms.fold_factor(operand)
        if node is not None:
            algebra.scale *= c
            folded.append(node)
            if which == "q":
                q = new
            else:
                k = new
    return q, k, folded


def _op_shape(shape: tuple, split: Optional[tuple]) -> tuple:
    """A q/k/v shape as the op sees it: [B, H, L, D]. 3-D [G, L, D] is [1, G, L, D], or
    [B, H, L, D] when the scores were viewed with that head split."""
    if len(shape) == 4:
        return tuple(shape)
    if split is not None:
        if shape[0] != split[0] * split[1]:
            raise Refused("kv_broadcast", f"a 3-D operand {list(shape)} does not match the head split {list(split)}")
        return tuple(split) + tuple(shape[1:])
    return (1,) + tuple(shape)


def _gqa(q: Operand, k: Operand, v: Operand, split: Optional[tuple]):
    """(k, v, group): K/V repeated per kv head are read unrepeated, as a GQA group."""
    qs, ks, vs = (_op_shape(o.shape, split) for o in (q, k, v))
    if ks[:-2] != qs[:-2] or vs[:-2] != qs[:-2]:
        if len(k.shape) == len(v.shape) == 4 and ks[0] == qs[0] and vs[:-2] == ks[:-2] and ks[1] == 1:
            return k, v, qs[1]  # MQA through broadcasting over a head dim of 1
        raise Refused("kv_broadcast", f"k/v batch dims {list(ks[:-2])}/{list(vs[:-2])} do not match q {list(qs[:-2])}")
    if len(k.shape) == len(v.shape) == 4 and k.dims is None and v.dims is None:
        k_src, gk = forms.unrepeat(k.node)
        v_src, gv = forms.unrepeat(v.node)
        if gk == gv and gk > 1:
            return Operand(k_src), Operand(v_src), gk
    return k, v, 1


def _build_region(softmax, sm_dtype, qk, pv, operands, v, out_dims, algebra, dropout_p, steps, post_chain, pv_form, split) -> Region:
    q, k, folded = _fold_factors(operands.q, operands.k, algebra)
    ranks = {len(q.shape), len(k.shape), len(v.shape)}
    if not ranks <= {3, 4} or (len(ranks) > 1 and split is None):
        raise Refused("unsupported_rank", f"q, k, v ranks differ: {len(q.shape)}, {len(k.shape)}, {len(v.shape)}")
    nd = len(q.shape)
    qs, ks, vs = (_op_shape(o.shape, split) for o in (q, k, v))
    dtypes = {q.dtype, k.dtype, v.dtype, _dtype_of(pv)}
    if len(dtypes) != 1:
        raise Refused("unsupported_dtype", f"q, k, v and output dtypes differ: {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    if dtype not in SUPPORTED_DTYPES:
        raise Refused("unsupported_dtype", f"dtype {dtype} is not fp16, bf16 or fp32")
    if ks[-1] != qs[-1] or vs[-2] != ks[-2]:
        raise Refused("unsupported_op", "q/k head dims or k/v lengths differ")
    if q.shape[:-2] != _shape(qk)[:-2]:
        raise Refused("kv_broadcast", "q is broadcast by the matmul")
    k, v, group = _gqa(q, k, v, split)
    mask_value = algebra.masks[0][2] if algebra.masks else NEG_INF
    sm = sm_dtype if isinstance(sm_dtype, torch.dtype) else _dtype_of(softmax.args[0] if softmax.args else None)
    to4 = lambda shape: _op_shape(shape, split)  # noqa: E731
    bias_rg = any(bool(getattr(val(b), "requires_grad", False)) for b, _ in algebra.biases)
    kd = len(k.shape)
    k_form = "transpose" if k.dims is None else ("stored_transposed" if k.dims == tuple(range(kd - 2)) + (kd - 1, kd - 2) else "permuted")
    spec = AttentionSpec(
        scale=algebra.scale,
        causal=algebra.causal,
        dropout_p=dropout_p,
        gqa_group=group,
        softmax_dtype=str(sm or dtype).replace("torch.", ""),
        dtype=str(dtype).replace("torch.", ""),
        q_shape=to4(q.shape),
        k_shape=to4(k.shape),
        v_shape=to4(v.shape),
        layout=f"{nd}d",
        k_form=k_form,
        bias_shapes=tuple(tuple(_shape(b)) for b, _ in algebra.biases),
        bias_requires_grad=bias_rg,
        mask_shapes=tuple(tuple(_shape(m)) for m, _, _ in algebra.masks),
        mask_value=mask_value,
        qk_form=operands.form,
        pv_form=pv_form,
    )
    chain = folded + [qk] + [s.node for s in steps] + [softmax] + post_chain
    return Region(
        softmax=softmax,
        pv=pv,
        q=q.node,
        k=k.node,
        v=v.node,
        scale=algebra.scale,
        causal=algebra.causal,
        dropout_p=dropout_p,
        gqa_group=group,
        biases=algebra.biases,
        masks=[(m, keep) for m, keep, _ in algebra.masks],
        mask_value=mask_value,
        layout=f"{nd}d",
        chain=chain,
        spec=spec,
        location=stack_location(softmax),
        q_dims=q.dims,
        k_dims=k.dims,
        v_dims=v.dims,
        out_dims=out_dims,
        split=split,
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
        except Exception as e:  # a bug in detection: this candidate stays unfused, the others go on
            refusals.append(Refusal("detection_failed", f"{type(e).__name__}: {e}", stack_location(node), node.name, error=e))
    return regions, refusals


def _near_matmul(softmax: fx.Node, depth: int = 6) -> bool:
    """Is this softmax between two matmuls (a few ops either side), so worth a refusal in the report?"""
    def reaches(start, step, ops):
        frontier, seen = [start], set()
        for _ in range(depth):
            frontier = [m for n in frontier for m in step(n) if isinstance(m, fx.Node) and m not in seen]
            seen.update(frontier)
            if any(op_name(m) in ops for m in frontier):
                return True
        return False

    x = softmax.args[0] if softmax.args else None
    behind = scores.leads_to_qk(x) or reaches(softmax, lambda n: n.all_input_nodes, QK_OPS)
    return behind and reaches(softmax, lambda n: list(n.users), PV_OPS)
