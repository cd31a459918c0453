"""The online-softmax rewrite: replace a proven region with one `flashfuse::attention` call.

    before:  matmul = q @ k.transpose(-2, -1); mul = matmul * 0.125
             softmax = F.softmax(mul, -1); y = softmax @ v
    after:   ff_attention = torch.ops.flashfuse.attention.default(q, k, v, None, None, 0.125, ...)
             ff_out = ff_attention[0]     # the normalized accumulator acc / l
             # ff_attention[1], [2]: the running max m and log l, kept for the backward

The op's result is the online softmax's state at the last key block: the rescaled
accumulator and the logsumexp as (m, log l). The region's old nodes are erased once unused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from flashfuse.passes.detect import Region
from flashfuse.passes.graph_utils import op_name, propagate_meta, val


def _call(graph: fx.Graph, fake_mode, like: fx.Node, target, *args, method: bool = False, name: str = None, **kwargs) -> fx.Node:
    node = graph.call_method(target, args, kwargs) if method else graph.call_function(target, args, kwargs)
    if name:
        node.name = graph._graph_namespace.create_name(name, None)
    propagate_meta(node, fake_mode, like)
    return node


def _to4(graph, fake_mode, like, node: fx.Node) -> fx.Node:
    # Left-pad with size-1 dims exactly as broadcasting against the scores would.
    for _ in range(4 - len(val(node).shape)):
        node = _call(graph, fake_mode, like, "unsqueeze", node, 0, method=True)
    return node


def _permute(graph, fake_mode, like, node: fx.Node, dims) -> fx.Node:
    if not dims:
        return node
    nd = len(dims)
    if tuple(dims) == tuple(range(nd - 2)) + (nd - 1, nd - 2):
        return _call(graph, fake_mode, like, "transpose", node, -2, -1, method=True)
    return _call(graph, fake_mode, like, "permute", node, *dims, method=True)


def _negate(graph, fake_mode, like, m: fx.Node) -> fx.Node:
    # A drop mask spelled ~keep: the op takes keep itself (the ~ goes dead).
    if op_name(m) == "invert" and len(m.args) == 1 and isinstance(m.args[0], fx.Node) and getattr(val(m.args[0]), "dtype", None) == torch.bool:
        return m.args[0]
    return _call(graph, fake_mode, like, torch.logical_not, m)


def rewrite_region(gm: fx.GraphModule, region: Region, kernel: str, fake_mode) -> fx.Node:
    graph = gm.graph
    like = region.softmax
    with graph.inserting_before(region.pv):
        def op_space(n: fx.Node) -> fx.Node:
            # [B*H, L, X] -> [B, H, L, X] under a head split (see detect.Region); otherwise
            # left-pad with size-1 dims exactly as broadcasting against the scores would.
            shape = tuple(val(n).shape)
            split = region.split
            if split is not None and len(shape) == 3 and shape[0] == split[0] * split[1] != 1:
                return _call(graph, fake_mode, like, "reshape", n, *split, *shape[1:], method=True)
            return _to4(graph, fake_mode, like, n)

        def view(n, dims):  # the user's layout viewed as the op's [B, H, L, D]: a view, no copy
            return op_space(_permute(graph, fake_mode, like, n, dims))

        q, k, v = view(region.q, region.q_dims), view(region.k, region.k_dims), view(region.v, region.v_dims)

        bias = None
        for b, coeff in region.biases:
            term = op_space(b if coeff == 1.0 else _call(graph, fake_mode, like, operator.mul, b, coeff))
            bias = term if bias is None else _call(graph, fake_mode, like, operator.add, bias, term)

        mask = None
        for m, keep in region.masks:
            term = op_space(m if keep else _negate(graph, fake_mode, like, m))
            mask = term if mask is None else _call(graph, fake_mode, like, operator.and_, mask, term)

        seed = None
        if region.dropout_p > 0:
            device = val(region.q).device
            # A fresh Philox seed per call, drawn from torch's generator: torch.manual_seed reproduces it.
            seed = _call(graph, fake_mode, like, torch.randint, 0, 1 << 62, (1,), dtype=torch.int64, device=device, name="ff_seed")

        spec = region.spec
        op = _call(
            graph, fake_mode, like, torch.ops.flashfuse.attention.default,
            q, k, v, bias, mask, float(region.scale), bool(region.causal), float(region.dropout_p), seed,
            int(region.gqa_group), float(region.mask_value), spec.softmax_dtype == "float32", kernel,
            name="ff_attention",
        )
        op.meta["flashfuse_spec"] = spec
        out = _call(graph, fake_mode, like, operator.getitem, op, 0, name="ff_out")
        pv_shape = list(val(region.pv).shape)
        if region.out_dims:  # the op's output is the einsum's output before its permutation
            for p, c in enumerate(region.out_dims):
                pv_shape[c] = val(region.pv).shape[p]
        if len(pv_shape) == 3:  # back to the user's [G, M, Dv]
            if region.split is not None:
                out = _call(graph, fake_mode, like, "reshape", out, *pv_shape, method=True)
            else:
                out = _call(graph, fake_mode, like, "squeeze", out, 0, method=True)
        if region.out_dims:  # einsum asked for another output layout
            out = _permute(graph, fake_mode, like, out, region.out_dims)
    region.pv.replace_all_uses_with(out)
    op.meta["flashfuse_out"] = out  # what replaced region.pv: later regions that read it are remapped
    for node in reversed([*region.chain, region.pv]):
        if not node.users:
            graph.erase_node(node)
    return op
