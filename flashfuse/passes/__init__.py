"""The flashfuse pass pipeline: detect -> online-softmax rewrite -> lower, per region."""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from flashfuse.options import Options
from flashfuse.passes import detect, lower, rewrite
from flashfuse.passes.graph_utils import fake_mode_of, is_inplace, val
from flashfuse.report import FusedRegion, GraphReport, normalize_code

log = logging.getLogger(__name__)


class FallbackError(RuntimeError):
    """Raised instead of falling back when the user asked for strict=True."""


def _refuse(report: GraphReport, reason: str, detail: str, location: str, node: str, options: Options) -> None:
    counters["flashfuse"][f"refused_{reason}"] += 1
    refusal = detect.Refusal(reason, detail, location, node)
    report.refused.append(refusal)
    log.info("flashfuse: %s", refusal)


def _remap(region: detect.Region, replaced: dict) -> detect.Region:
    # A region that reads an earlier region's output (attention over attention's output)
    # still holds that region's erased P V node: point it at the op output that replaced it.
    if not replaced:
        return region
    changes = {}
    for f in dataclasses.fields(region):
        value = getattr(region, f.name)
        if isinstance(value, (fx.Node, list, tuple, dict)):
            changes[f.name] = fx.node.map_arg(value, lambda n: replaced.get(n, n))
    return dataclasses.replace(region, **changes)


# Higher-order ops whose body is an ordinary subgraph of the same function, run as is:
# torch.utils.checkpoint inside a compiled function traces to tag_activation_checkpoint.
_BODY_HOPS = ("tag_activation_checkpoint", "wrap")


def _hop_bodies(gm: fx.GraphModule) -> list:
    bodies = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.HigherOrderOperator) or target.name() not in _BODY_HOPS:
            continue
        body = node.args[0] if node.args else None
        if isinstance(body, fx.Node) and body.op == "get_attr":
            sub = getattr(gm, body.target, None)
            if isinstance(sub, fx.GraphModule) and all(sub is not b for b in bodies):
                bodies.append(sub)
    return bodies


def _remove_dead(graph: fx.Graph, unused_before: set) -> None:
    """Erase the nodes the rewrites left without users: pure ones only.

    Not graph.eliminate_dead_code(): FX counts every call_method as pure, so it would delete
    a Dynamo graph's in-place ops whose result nobody reads (`s.masked_fill_(m, v)` as a
    statement), in regions that were refused and elsewhere alike. A node that had no users
    before the pass is there for its side effect and stays.
    """
    for node in reversed(list(graph.nodes)):
        if node.users or node in unused_before or node.op not in ("call_function", "call_method", "get_attr"):
            continue
        if node.is_impure() or is_inplace(node) or "out" in node.kwargs:
            continue
        graph.erase_node(node)


def _erase_new_nodes(graph: fx.Graph, before: set) -> None:
    # A rewrite that failed part way leaves the nodes it inserted; unused ones go.
    for node in reversed(list(graph.nodes)):
        if node not in before and not node.users:
            graph.erase_node(node)


def fuse_attention(gm: fx.GraphModule, options: Options) -> GraphReport:
    """Rewrite every proven attention region of `gm` in place; returns what happened.

    A region that fails at any step (detection or spec building raising an error rather than
    refusing, lowering, template rendering, the rewrite) keeps its original subgraph, and the
    reason is logged on the "flashfuse" logger and recorded in the report; the other regions
    still fuse. With strict=True such a failure raises FallbackError instead (an ordinary
    refusal is not a failure: it is only reported). Failures of the Triton kernels at run time
    are handled by the op itself (see flashfuse/ops.py); strict=True reaches it as the op's
    `strict` argument.
    """
    report = GraphReport(index=0, before=normalize_code(gm.code), after="")
    unused_before = {n for n in gm.graph.nodes if not n.users}
    regions, refusals = detect.find_regions(gm)
    for r in refusals:
        error = getattr(r, "error", None)
        if error is not None:
            if options.strict:
                raise FallbackError(f"flashfuse: detection failed for the softmax at {r.location} ({r.node}): {error!r}") from error
            log.warning("flashfuse: detection failed for the softmax at %s (%s), leaving it unfused: %r", r.location, r.node, error, exc_info=error)
        _refuse(report, r.reason, r.detail, r.location, r.node, options)
    fake_mode = fake_mode_of(gm)
    replaced = {}
    for region in regions:
        region = _remap(region, replaced)
        device = val(region.q).device.type
        try:
            choice = lower.lower(region.spec, options.kernel, device)
        except lower.LoweringError as e:
            if options.strict:
                raise FallbackError(f"flashfuse: region at {region.location} cannot be lowered: {e}") from e
            _refuse(report, e.reason, e.detail, region.location, region.softmax.name, options)
            continue
        except Exception as e:  # template rendering or Triton failures must not break torch.compile
            if options.strict:
                raise FallbackError(f"flashfuse: lowering the region at {region.location} failed: {e!r}") from e
            log.warning("flashfuse: lowering the region at %s failed, leaving it unfused: %r", region.location, e, exc_info=True)
            _refuse(report, "lowering_failed", repr(e), region.location, region.softmax.name, options)
            continue
        location, softmax_name = region.location, region.softmax.name
        before = set(gm.graph.nodes)
        try:
            op = rewrite.rewrite_region(gm, region, choice.name, fake_mode)
            if options.strict:  # carried into the op: a Triton failure at run time raises too
                op.kwargs = {**op.kwargs, "strict": True}
        except Exception as e:
            if options.strict:
                raise FallbackError(f"flashfuse: rewriting the region at {location} failed: {e!r}") from e
            log.warning("flashfuse: rewriting the region at %s failed, leaving it unfused: %r", location, e, exc_info=True)
            _erase_new_nodes(gm.graph, before)
            _refuse(report, "rewrite_failed", repr(e), location, softmax_name, options)
            continue
        if op.meta.get("flashfuse_out") is not None:
            replaced[region.pv] = op.meta["flashfuse_out"]
        counters["flashfuse"]["fused"] += 1
        report.fused.append(FusedRegion(location, op.name, region.spec, choice.name, choice.runs_as, choice.sources))
        log.info("flashfuse: fused attention at %s (%s) -> %s", location, softmax_name, region.spec.summary())
    for body in _hop_bodies(gm):  # attention inside a checkpointed function
        inner = fuse_attention(body, options)
        report.fused += inner.fused
        report.refused += inner.refused
    _remove_dead(gm.graph, unused_before)
    gm.graph.lint()
    gm.recompile()
    report.after = normalize_code(gm.code)
    return report
