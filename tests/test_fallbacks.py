"""Fallback, never a crash: a region that fails at any step keeps its original subgraph.

Each test injects a failure at one point of the pipeline (detection, spec building, lowering,
template rendering, the rewrite, the inner compiler, the Triton kernels at run time) and
checks that the failing region stays unfused with its reason logged on the "flashfuse"
logger and shown in the explain report, that the rest of the graph still fuses, that the
result equals eager, and that strict=True turns the fallback into an error.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters

import flashfuse
from flashfuse import ops
from flashfuse.explain import explain
from flashfuse.passes import FallbackError, detect, lower, rewrite

REF = {"kernel": "reference", "compiler": "eager"}


def two_attentions(q, k, v, pad):
    """Two regions in one graph: plain scaled attention, then a masked one on its output."""
    s1 = q @ k.transpose(-2, -1) * 0.25
    y = F.softmax(s1, dim=-1) @ v
    s2 = torch.matmul(y, k.transpose(-2, -1)) / 4.0
    s2 = s2.masked_fill(~pad, float("-inf"))
    return torch.softmax(s2, -1) @ v


def _inputs(grad=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=g).requires_grad_(grad) for _ in range(3))
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1, ..., -2:] = False
    return q, k, v, pad


def _check_equal(fn, args, result):
    expected = fn(*args)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
    leaves = [a for a in args if a.requires_grad]
    ge = torch.autograd.grad(expected.sum(), leaves)
    ga = torch.autograd.grad(result.sum(), leaves)
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def _raises_fallback(fn, args, options, match: str):
    """strict=True: the compile raises FallbackError (Dynamo wraps it in BackendCompilerFailed)."""
    with pytest.raises((FallbackError, BackendCompilerFailed)) as info:
        torch.compile(fn, backend="flashfuse", options={**options, "strict": True})(*args)
    err = info.value
    inner = getattr(err, "inner_exception", None) or err.__cause__ or err
    assert isinstance(err, FallbackError) or isinstance(inner, FallbackError), repr(err)
    assert match in str(err), str(err)


def _flashfuse_messages(caplog, level=logging.WARNING) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("flashfuse") and r.levelno >= level)


def test_baseline_both_regions_fuse():
    args = _inputs()
    report = explain(two_attentions, *args, options=REF)
    assert len(report.fused) == 2, report
    _check_equal(two_attentions, args, report.result)


# ---------------------------------------------------------------------------------------
# compile-time failure points


def _fail_on_first(original, exc=RuntimeError("injected failure")):
    calls = []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return original(*a, **kw)

    return wrapper


def test_detection_crash_keeps_region_and_fuses_the_rest(monkeypatch, caplog):
    monkeypatch.setattr(detect, "analyze", _fail_on_first(detect.analyze, KeyError("boom in detection")))
    args = _inputs()
    with caplog.at_level(logging.INFO, logger="flashfuse"):
        report = explain(two_attentions, *args, options=REF)
    assert len(report.fused) == 1, report
    (refusal,) = report.refused
    assert refusal.reason == "detection_failed" and "boom in detection" in refusal.detail
    assert "[detection_failed]" in str(report)
    assert "boom in detection" in _flashfuse_messages(caplog)
    assert counters["flashfuse"]["refused_detection_failed"] == 1
    _check_equal(two_attentions, args, report.result)


def test_detection_crash_strict(monkeypatch):
    monkeypatch.setattr(detect, "analyze", _fail_on_first(detect.analyze, KeyError("boom in detection")))
    _raises_fallback(two_attentions, _inputs(), REF, "boom in detection")


def test_spec_building_crash_falls_back(monkeypatch, caplog):
    """A bug while building the AttentionSpec (inside analyze) is a detection failure too."""
    original = detect.AttentionSpec
    calls = []

    def bad_spec(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("spec field missing")
        return original(*a, **kw)

    monkeypatch.setattr(detect, "AttentionSpec", bad_spec)
    args = _inputs()
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        report = explain(two_attentions, *args, options=REF)
    assert len(report.fused) == 1 and [r.reason for r in report.refused] == ["detection_failed"], report
    assert "spec field missing" in _flashfuse_messages(caplog)
    _check_equal(two_attentions, args, report.result)


def test_lowering_crash_falls_back(monkeypatch, caplog):
    original = lower.lower
    monkeypatch.setattr(lower, "lower", _fail_on_first(original, RuntimeError("lowering exploded")))
    args = _inputs()
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        report = explain(two_attentions, *args, options=REF)
    assert len(report.fused) == 1 and [r.reason for r in report.refused] == ["lowering_failed"], report
    assert "lowering exploded" in _flashfuse_messages(caplog)
    _check_equal(two_attentions, args, report.result)
    torch._dynamo.reset()
    monkeypatch.setattr(lower, "lower", _fail_on_first(original, RuntimeError("lowering exploded")))
    _raises_fallback(two_attentions, _inputs(), REF, "lowering exploded")


def test_lowering_refusal_strict(monkeypatch):
    """A LoweringError (the kernel cannot take the region) is a fallback: strict raises."""
    monkeypatch.setattr(lower, "MAX_HEAD_DIM", 8)
    args = _inputs()
    report = explain(two_attentions, *args, options=REF)
    assert not report.fused and {r.reason for r in report.refused} == {"unsupported_head_dim"}
    torch._dynamo.reset()
    _raises_fallback(two_attentions, _inputs(), REF, "cannot be lowered")


def test_triton_on_a_device_it_lacks(monkeypatch):
    """kernel='triton' on the CPU without the interpreter: refused at compile time, not at run time."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    options = {"kernel": "triton", "compiler": "eager"}
    args = _inputs()
    report = explain(two_attentions, *args, options=options)
    assert not report.fused and {r.reason for r in report.refused} == {"unsupported_device"}, report
    _check_equal(two_attentions, args, report.result)
    torch._dynamo.reset()
    _raises_fallback(two_attentions, _inputs(), options, "unsupported_device")


def test_render_failure_falls_back(monkeypatch, caplog):
    render = pytest.importorskip("flashfuse.kernels.render")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken(*a, **kw):
        raise RuntimeError("jinja template error")

    monkeypatch.setattr(render, "sources_for", broken)
    options = {"kernel": "triton", "compiler": "eager"}
    args = _inputs()
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        report = explain(two_attentions, *args, options=options)
    assert not report.fused and {r.reason for r in report.refused} == {"lowering_failed"}, report
    assert "jinja template error" in _flashfuse_messages(caplog)
    _check_equal(two_attentions, args, report.result)
    torch._dynamo.reset()
    _raises_fallback(two_attentions, _inputs(), options, "jinja template error")


def test_rendered_module_import_failure_falls_back(monkeypatch):
    """A rendered kernel that does not import (a template bug) is caught at compile time."""
    render = pytest.importorskip("flashfuse.kernels.render")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken(kind, options):
        raise SyntaxError(f"rendered {kind} kernel does not parse")

    monkeypatch.setattr(render, "load_module", broken)
    report = explain(two_attentions, *_inputs(), options={"kernel": "triton", "compiler": "eager"})
    assert not report.fused and {r.reason for r in report.refused} == {"lowering_failed"}, report
    assert "does not parse" in str(report)


def test_rewrite_crash_falls_back(monkeypatch, caplog):
    original = rewrite.rewrite_region
    monkeypatch.setattr(rewrite, "rewrite_region", _fail_on_first(original, RuntimeError("rewrite exploded")))
    args = _inputs()
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        report = explain(two_attentions, *args, options=REF)
    assert len(report.fused) == 1 and [r.reason for r in report.refused] == ["rewrite_failed"], report
    assert "rewrite exploded" in _flashfuse_messages(caplog)
    _check_equal(two_attentions, args, report.result)
    torch._dynamo.reset()
    monkeypatch.setattr(rewrite, "rewrite_region", _fail_on_first(original, RuntimeError("rewrite exploded")))
    _raises_fallback(two_attentions, _inputs(), REF, "rewrite exploded")


def test_rewrite_crash_half_way_leaves_no_debris(monkeypatch):
    """The rewrite fails after inserting some nodes: they are removed, the region is intact."""
    original = rewrite.propagate_meta

    def failing(node, fake_mode, like=None):
        if node.target is torch.ops.flashfuse.attention.default:
            raise RuntimeError("fake kernel failed")
        return original(node, fake_mode, like)

    monkeypatch.setattr(rewrite, "propagate_meta", failing)
    args = _inputs()
    report = explain(two_attentions, *args, options=REF)
    assert not report.fused and {r.reason for r in report.refused} == {"rewrite_failed"}
    (graph,) = report.graphs
    assert graph.after == graph.before, graph
    _check_equal(two_attentions, args, report.result)


def test_whole_pass_crash_compiles_unfused(monkeypatch, caplog):
    def broken(gm):
        raise RuntimeError("find_regions exploded")

    monkeypatch.setattr(detect, "find_regions", broken)
    args = _inputs()
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        report = explain(two_attentions, *args, options=REF)
    assert not report.fused and "find_regions exploded" in str(report)
    assert counters["flashfuse"]["pass_failed"] == 1
    assert "find_regions exploded" in _flashfuse_messages(caplog)
    _check_equal(two_attentions, args, report.result)
    torch._dynamo.reset()
    _raises_fallback(two_attentions, _inputs(), REF, "find_regions exploded")


def test_inner_compiler_crash_compiles_original(monkeypatch):
    from flashfuse import backend

    original = backend._inner

    def picky(compiler, gm, example_inputs):
        if any(n.target is torch.ops.flashfuse.attention.default for n in gm.graph.nodes):
            raise RuntimeError("inner compiler rejects the op")
        return original(compiler, gm, example_inputs)

    monkeypatch.setattr(backend, "_inner", picky)
    args = _inputs()
    report = explain(two_attentions, *args, options=REF)
    assert not report.fused and "inner compiler rejects the op" in str(report)
    assert counters["flashfuse"]["inner_compile_failed"] == 1
    _check_equal(two_attentions, args, report.result)
    torch._dynamo.reset()
    _raises_fallback(two_attentions, _inputs(), REF, "inner compiler rejects the op")


# ---------------------------------------------------------------------------------------
# run-time failures of the Triton kernels


@pytest.fixture
def broken_triton(monkeypatch):
    """Triton importable and lowering fine (under the interpreter), but its kernels raise at run time."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_attention = pytest.importorskip("flashfuse.kernels.triton_attention")
    ops._warned.clear()

    def fwd(*a, **kw):
        raise RuntimeError("triton compile error: out of shared memory")

    def bwd(*a, **kw):
        raise RuntimeError("triton autotune: no valid config")

    monkeypatch.setattr(triton_attention, "attention_forward", fwd)
    monkeypatch.setattr(triton_attention, "attention_backward", bwd)
    yield
    ops._warned.clear()


@pytest.mark.kernel_fallback
def test_triton_runtime_failure_runs_reference(broken_triton, caplog):
    options = {"kernel": "triton", "compiler": "eager"}
    args = _inputs()
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        report = explain(two_attentions, *args, options=options)
        assert len(report.fused) == 2 and all(r.runs_as == "triton" for r in report.fused), report
        _check_equal(two_attentions, args, report.result)
        compiled = torch.compile(two_attentions, backend="flashfuse", options=options)
        compiled(*_inputs()).sum().backward()
    messages = _flashfuse_messages(caplog)
    assert "out of shared memory" in messages and "no valid config" in messages
    # logged once per distinct error, however many calls fell back
    assert messages.count("out of shared memory") == 1 and messages.count("no valid config") == 1
    assert counters["flashfuse"]["kernel_fallback"] >= 6


def test_triton_runtime_failure_strict_raises(broken_triton):
    args = _inputs()
    compiled = torch.compile(two_attentions, backend="flashfuse", options={"kernel": "triton", "compiler": "eager", "strict": True})
    with pytest.raises(RuntimeError, match="out of shared memory"):
        compiled(*args)


def test_triton_runtime_failure_strict_backward_under_aot(broken_triton, monkeypatch):
    """strict travels from the forward op to the backward op through the autograd context,
    also when AOTAutograd traces the backward into its own graph."""
    from flashfuse.kernels import reference, triton_attention

    monkeypatch.setattr(triton_attention, "attention_forward", reference.attention_forward)
    compiled = torch.compile(two_attentions, backend="flashfuse", options={"kernel": "triton", "compiler": "aot_eager", "strict": True})
    out = compiled(*_inputs())
    with pytest.raises(RuntimeError, match="no valid config"):
        out.sum().backward()


@pytest.mark.kernel_fallback
def test_strict_env_var_for_direct_calls(broken_triton, monkeypatch):
    q = torch.randn(1, 2, 4, 16)
    out = flashfuse.attention(q, q, q, kernel="triton")  # falls back
    torch.testing.assert_close(out, flashfuse.attention(q, q, q, kernel="reference"))
    monkeypatch.setenv(ops.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match="out of shared memory"):
        flashfuse.attention(q, q, q, kernel="triton")


@pytest.mark.kernel_fallback
def test_triton_without_a_device_falls_back_at_run_time(monkeypatch, caplog):
    """A real failure, not an injected one: Triton on CPU tensors without the interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops._warned.clear()
    q = torch.randn(1, 2, 4, 16)
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        out = flashfuse.attention(q, q, q, kernel="triton")
    torch.testing.assert_close(out, flashfuse.attention(q, q, q, kernel="reference"))
    assert "running the reference kernel instead" in _flashfuse_messages(caplog)


# ---------------------------------------------------------------------------------------
# bad options: clear errors that name what is valid


def _option_error(options) -> str:
    with pytest.raises(Exception) as info:
        torch.compile(lambda x: x.softmax(-1), backend="flashfuse", options=options)(torch.randn(3))
    err = info.value
    if isinstance(err, BackendCompilerFailed):
        err = err.inner_exception
    assert isinstance(err, (TypeError, ValueError)), repr(err)
    return str(err)


@pytest.mark.parametrize(
    "options, must_name",
    [
        ({"kernal": "reference"}, ["'kernel'", "did you mean", "compiler: one of 'inductor', 'aot_eager', 'eager'"]),
        ({"kernel": "cuda"}, ["'auto'", "'triton'", "'reference'"]),
        ({"kernel": "refrence"}, ["did you mean 'reference'"]),
        ({"compiler": "max-autotune"}, ["'inductor'", "'aot_eager'", "'eager'"]),
        ({"kernel": 3}, ["must be a string", "'reference'"]),
        ({"strict": "yes"}, ["'strict'", "True or False"]),
        ({"fusion": 1}, ["'fusion'", "True or False"]),
        ({"fusion": False, "kernel": "triton"}, ["no effect with fusion=False", "fusion: a bool (True or False)"]),
        ({"fusion": False, "strict": True}, ["'strict' has no effect with fusion=False"]),
        ("reference", ["must be a dict", "kernel: one of"]),
    ],
)
def test_bad_options_name_the_valid_ones(options, must_name):
    msg = _option_error(options)
    for part in must_name:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_compile_mode_is_a_clear_error():
    with pytest.raises(Exception) as info:
        torch.compile(lambda x: x + 1, backend="flashfuse", mode="max-autotune")(torch.randn(3))
    assert "mode='max-autotune'" in str(info.value) and "options=" in str(info.value)


def test_good_options_pass():
    from flashfuse.options import Options, parse_options

    assert parse_options({"kernel": "reference", "compiler": "eager", "strict": True}) == Options("eager", True, "reference", True)
    assert parse_options({"fusion": False}).fusion is False
    assert parse_options(None) == Options()
    with pytest.raises(ValueError, match="valid"):
        parse_options(Options(kernel="cuda"))
