"""The `flashfuse` torch.compile backend: run the passes, then hand the graph to the inner compiler."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from flashfuse import ops  # noqa: F401  (registers flashfuse::attention)
from flashfuse import report as report_mod
from flashfuse.options import Options, parse_options, valid_options
from flashfuse.passes import FallbackError, constants, fuse_attention
from flashfuse.report import GraphReport, normalize_code

log = logging.getLogger(__name__)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    # node_copy copies each node's meta dict, so the copy keeps Dynamo's fake values.
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _inner(compiler: str, gm: fx.GraphModule, example_inputs: list):
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    if compiler == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


def flashfuse_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[Mapping[str, Any]] = None, **kwargs):
    """torch.compile(model, backend="flashfuse", options={"compiler": ..., "fusion": ..., "kernel": ..., "strict": ...})."""
    if kwargs:  # torch.compile(mode=...) reaches a custom backend as a keyword argument
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(f"flashfuse: torch.compile({given}) is not supported with backend='flashfuse'; pass options={{...}} instead. Valid options: {valid_options()}")
    opts: Options = parse_options(options)
    constants.take_restart_request()  # drop a request an earlier, failed compile left behind
    graph_report = GraphReport(index=0, before=normalize_code(gm.code), after=normalize_code(gm.code))
    original = gm
    if opts.fusion:
        rewritten = _copy(gm)
        try:
            graph_report = fuse_attention(rewritten, opts)
            gm = rewritten
        except FallbackError:
            raise
        except Exception as e:  # a bug in the pass must never break the user's compile
            if opts.strict:
                raise FallbackError(f"flashfuse: the fusion pass failed: {e!r}") from e
            counters["flashfuse"]["pass_failed"] += 1
            graph_report.error = repr(e)
            log.warning("flashfuse: fusion pass failed, compiling the graph unfused: %r", e, exc_info=True)
    if constants.take_restart_request():
        # A scale Dynamo made a float input (dynamic=True): trace again with it specialized.
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis

        raise TensorifyScalarRestartAnalysis
    report_mod.record(graph_report)
    if gm is original or not graph_report.fused:
        return _inner(opts.compiler, gm, example_inputs)
    try:
        return _inner(opts.compiler, gm, example_inputs)
    except Exception as e:  # the inner compiler rejected the rewritten graph: compile the user's
        if opts.strict:
            raise FallbackError(f"flashfuse: the {opts.compiler} compiler failed on the rewritten graph: {e!r}") from e
        counters["flashfuse"]["inner_compile_failed"] += 1
        graph_report.error = f"the {opts.compiler} compiler failed on the rewritten graph: {e!r}"
        graph_report.after = graph_report.before
        graph_report.fused.clear()
        log.warning("flashfuse: %s failed on the rewritten graph, compiling it unfused: %r", opts.compiler, e, exc_info=True)
        return _inner(opts.compiler, original, example_inputs)
