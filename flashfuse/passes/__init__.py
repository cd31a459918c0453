"""The flashfuse pass pipeline: detect -> online-softmax rewrite -> lower, per region."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from flashfuse.options import Options
from flashfuse.passes import detect, lower, rewrite
from flashfuse.passes.graph_utils import fake_mode_of, val
from flashfuse.report import FusedRegion, GraphReport, normalize_code

log = logging.getLogger(__name__)


class FallbackError(RuntimeError):
    """Raised instead of falling back when the user asked for strict=True."""


def _refuse(report: GraphReport, reason: str, detail: str, location: str, node: str, options: Options) -> None:
    counters["flashfuse"][f"refused_{reason}"] += 1
    refusal = detect.Refusal(reason, detail, location, node)
    report.refused.append(refusal)
    log.info("flashfuse: %s", refusal)


def fuse_attention(gm: fx.GraphModule, options: Options) -> GraphReport:
    """Rewrite every proven attention region of `gm` in place; returns what happened.

    A region that fails at any step keeps its original subgraph, and the reason is logged
    and recorded (with strict=True, it raises FallbackError instead).
    """
    report = GraphReport(index=0, before=normalize_code(gm.code), after="")
    regions, refusals = detect.find_regions(gm)
    for r in refusals:
        _refuse(report, r.reason, r.detail, r.location, r.node, options)
    fake_mode = fake_mode_of(gm)
    for region in regions:
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
            _refuse(report, "lowering_failed", repr(e), region.location, region.softmax.name, options)
            continue
        location, softmax_name = region.location, region.softmax.name
        try:
            op = rewrite.rewrite_region(gm, region, choice.name, fake_mode)
        except Exception as e:  # nodes inserted before the failure are dead and removed below
            if options.strict:
                raise FallbackError(f"flashfuse: rewriting the region at {location} failed: {e!r}") from e
            _refuse(report, "rewrite_failed", repr(e), location, softmax_name, options)
            continue
        counters["flashfuse"]["fused"] += 1
        report.fused.append(FusedRegion(location, op.name, region.spec, choice.name, choice.runs_as, choice.sources))
        log.info("flashfuse: fused attention at %s (%s) -> %s", location, softmax_name, region.spec.summary())
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    report.after = normalize_code(gm.code)
    return report
