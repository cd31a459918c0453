"""Dynamic shapes: flashfuse neither recompiles per sequence length nor goes wrong at any.

With dynamic=True (every size symbolic), with automatic dynamic shapes (a length that changes
call to call: one static compile, then one dynamic), and with mark_dynamic on the sequence
dim, a model runs over 20 lengths; each compiled graph must have its attention fused, and
every length must match eager. Recompiles are counted with counters["stats"]["unique_graphs"].

Under symbolic sizes some constant folding cannot run: a causal mask built from
`ones(L, L).tril()` is then fused as a bool mask (the op reads the [L, L] tensor) rather
than as causal=True, and a scale computed from a size (`q.size(-1) ** -0.5`) is specialized
to its value (a guard on the head dim, which does not change between calls). A Python float
that dynamic=True turns into a graph input (a module's `self.scaling`, nn.Dropout's p) is
specialized by restarting Dynamo's analysis (see passes/constants.py `symbolic_scalar`).

Known limit: such a symbolic causal mask next to a mask filled with a finite value (two fill
values) is refused under dynamic shapes, where the static graph fuses it.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import test_fuzz
from flashfuse import report as report_mod
from flashfuse.report import Report

REF = {"kernel": "reference", "compiler": "eager"}
LENGTHS = list(range(5, 25))  # 20 lengths; none equals another size of the inputs at the first call


def _run_lengths(fn, make_args, lengths, dynamic, options=REF, grads=True):
    """Compile fn once, call it at every length, compare with eager. Returns (report, graphs)."""
    compiled = torch.compile(fn, backend="flashfuse", options=options, dynamic=dynamic)
    report = Report()
    report_mod.push_collector(report)
    try:
        for length in lengths:
            args = make_args(length)
            e_args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
            expected = fn(*e_args)
            actual = compiled(*args)
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f"L={length}: {m}")
            if grads:
                leaves_a = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
                leaves_e = [a for a in e_args if isinstance(a, torch.Tensor) and a.requires_grad]
                cot = torch.randn(expected.shape, generator=torch.Generator().manual_seed(length))
                for a, e in zip(torch.autograd.grad(actual, leaves_a, cot), torch.autograd.grad(expected, leaves_e, cot)):
                    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"L={length} grad: {m}")
    finally:
        report_mod.pop_collector()
    return report, counters["stats"]["unique_graphs"]


def _assert_every_graph_fused(report, per_graph=1):
    assert report.graphs, "nothing was compiled"
    for g in report.graphs:
        assert len(g.fused) == per_graph, f"a graph was compiled without its attention fused:\n{g}"


# ---------------------------------------------------------------------------------------
# code under test


def padded_causal(q, k, v, pad):
    s = q @ k.transpose(-2, -1) / 4.0
    s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
    length = s.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    p = F.softmax(s.float(), dim=-1).to(q.dtype)
    return p @ v


def _padded_args(length, b=2, h=3, d=16):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(b, h, length, d, generator=g).requires_grad_() for _ in range(3))
    pad = torch.ones(b, length, dtype=torch.bool)
    pad[1, length // 2:] = False
    return q, k, v, pad


def head_dim_scale(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
    return torch.softmax(s, dim=-1) @ v


def sqrt_head_dim_scale(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
    return torch.softmax(s, dim=-1) @ v


class GQAModel(nn.Module):
    """Llama-like: repeat_kv, an additive HF mask (0 / finfo.min), softmax in fp32."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)
        self.scaling = self.d ** -0.5

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        g = self.h // self.kvh
        k = k[:, :, None].expand(b, self.kvh, g, n, self.d).reshape(b, self.h, n, self.d)
        v = v[:, :, None].expand(b, self.kvh, g, n, self.d).reshape(b, self.h, n, self.d)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scaling + attention_mask
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o(torch.matmul(p, v).transpose(1, 2).reshape(b, n, -1))


def _hf_mask(b, n):
    causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    mask = causal[None, None].expand(b, 1, n, n).clone()
    mask[1, ..., : n // 3] = torch.finfo(torch.float32).min  # left padding
    return mask


def bmm_3d(q, k, v):
    s = torch.bmm(q, k.transpose(1, 2)) * 0.25
    return torch.bmm(torch.softmax(s, -1), v)


# ---------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_dynamic_true_twenty_lengths_one_graph(compiler):
    report, graphs = _run_lengths(padded_causal, _padded_args, LENGTHS, dynamic=True, options={"kernel": "reference", "compiler": compiler})
    assert graphs == 1, f"{graphs} graphs for {len(LENGTHS)} lengths"
    _assert_every_graph_fused(report)


def test_automatic_dynamic_twenty_lengths():
    """No dynamic= flag: the first call compiles static, the second one dynamic, then no more."""
    report, graphs = _run_lengths(padded_causal, _padded_args, LENGTHS, dynamic=None)
    assert graphs == 2, f"{graphs} graphs for {len(LENGTHS)} lengths"
    _assert_every_graph_fused(report)
    assert report.graphs[0].fused[0].spec.causal  # the static graph proves the mask causal


def test_mark_dynamic_sequence_dim():
    def make(length):
        args = _padded_args(length)
        for t in args:
            torch._dynamo.mark_dynamic(t, t.dim() - 2 if t.dim() == 4 else 1)
        return args

    report, graphs = _run_lengths(padded_causal, make, LENGTHS, dynamic=None)
    assert graphs == 1
    _assert_every_graph_fused(report)


@pytest.mark.parametrize("fn", [head_dim_scale, sqrt_head_dim_scale], ids=["pow", "math_sqrt"])
def test_dynamic_true_scale_from_head_dim(fn):
    def make(length):
        g = torch.Generator().manual_seed(length)
        return [torch.randn(2, 3, length, 16, generator=g).requires_grad_() for _ in range(3)]

    report, graphs = _run_lengths(fn, make, LENGTHS, dynamic=True)
    assert graphs == 1, graphs
    _assert_every_graph_fused(report)
    assert report.graphs[0].fused[0].spec.scale == pytest.approx(0.25)


def test_dynamic_true_head_dim_change_recompiles_with_the_right_scale():
    """The specialized scale is guarded: another head dim is another graph, not a wrong scale."""

    def make(d):
        g = torch.Generator().manual_seed(d)
        return [torch.randn(2, 3, 7, d, generator=g).requires_grad_() for _ in range(3)]

    report, graphs = _run_lengths(head_dim_scale, make, [16, 9, 16, 25], dynamic=True)
    assert graphs == 3
    _assert_every_graph_fused(report)


def test_dynamic_true_gqa_hf_model():
    torch.manual_seed(0)
    model = GQAModel()

    def make(length):
        g = torch.Generator().manual_seed(length)
        return torch.randn(2, length, 32, generator=g).requires_grad_(), _hf_mask(2, length)

    report, graphs = _run_lengths(model, make, LENGTHS, dynamic=True)
    assert graphs == 1, graphs
    _assert_every_graph_fused(report)
    assert report.graphs[0].fused[0].spec.gqa_group == 2


def test_dynamic_true_3d_bmm():
    def make(length):
        g = torch.Generator().manual_seed(length)
        return [torch.randn(6, length, 8, generator=g).requires_grad_() for _ in range(3)]

    report, graphs = _run_lengths(bmm_3d, make, LENGTHS, dynamic=True)
    assert graphs == 1
    _assert_every_graph_fused(report)


def test_dynamic_queries_and_keys_differ():
    """Cross attention: M and N vary independently."""

    def make(length):
        g = torch.Generator().manual_seed(length)
        q = torch.randn(2, 3, length, 16, generator=g).requires_grad_()
        kv_len = 30 - length
        k, v = (torch.randn(2, 3, kv_len, 16, generator=g).requires_grad_() for _ in range(2))
        pad = torch.rand(2, kv_len, generator=g) > 0.2
        return q, k, v, pad

    def cross(q, k, v, pad):
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(~pad[:, None, None, :], torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v

    report, graphs = _run_lengths(cross, make, [length for length in LENGTHS if length != 15], dynamic=True)
    assert graphs == 1
    _assert_every_graph_fused(report)


# ---------------------------------------------------------------------------------------
# fuzzed: the test_fuzz cases compiled with dynamic=True, called at two sets of sizes


@settings(max_examples=int(test_fuzz.EXAMPLES) // 6 or 10, deadline=None, database=None, derandomize=test_fuzz.SEED is None,
          suppress_health_check=list(HealthCheck))
@given(test_fuzz.cases(), st.integers(1, 9), st.integers(1, 9))
def test_fuzz_dynamic(case, dm, dn):
    case = dataclasses.replace(case, m=max(case.m, 2), n=max(case.n, 2), dtype="float32")
    other = dataclasses.replace(case, m=case.m + dm, n=case.n + dn, seed=case.seed + 1)
    fn = test_fuzz.build(case)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="flashfuse", options=REF, dynamic=True)
    report = Report()
    report_mod.push_collector(report)
    # no duck sizing: equal sizes at the first call (M == N, say) would share a symbol and
    # recompile when they part, which is Dynamo's doing, not ours
    try:
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for c in (case, other):
                args = test_fuzz.make_inputs(c)
                expected = fn(*test_fuzz._clone(args))
                actual = compiled(*test_fuzz._clone(args))
                torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f"{m}\n{c}\n{report}")
    finally:
        report_mod.pop_collector()
    assert counters["stats"]["unique_graphs"] == 1, f"recompiled for new sizes\n{case}\n{report}"
    if case.causal != "none" and case.fill != "-inf":
        # Known limit: under symbolic sizes the causal mask is not proven causal (no folding),
        # so it stays a -inf mask or bias next to the finite-fill one, which the op cannot hold.
        reasons = {r.reason for r in report.refused}
        if reasons and reasons <= {"fill_values_differ", "bias_after_finite_fill", "finite_fill_after_causal"}:
            return
    _assert_every_graph_fused(report)
