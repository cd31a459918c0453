"""Semantics at the edges: fully masked rows, NaN and inf, determinism, checkpointing, no_grad.

Fully masked rows follow eager for the same code: a row whose every key was filled with
-inf is NaN (eager's softmax of all -inf), one filled with finfo.min is uniform.
NaN and inf in q, k or v propagate exactly where eager's do.

Determinism: the fused graph draws its dropout seed from torch's generator (see
`passes/rewrite.py`), so torch.manual_seed reproduces the mask and the gradients bit for
bit; without dropout the reference kernel's backward is deterministic. The Triton path's
exceptions are in docs/determinism.md.

"No logsumexp stored" under no_grad / inference_mode: the op returns m and log_l as plain
outputs next to `out`; autograd calls the op's setup_context (which saves q, k, v, out, m,
log_l for the backward) only when grad mode is on and an input requires grad. Under no_grad
nothing is saved, the outputs carry no grad_fn, and the unused m / log_l are freed as soon as
the graph drops them. `saved_tensors_hooks` below counts what autograd saves.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import oracle
from flashfuse.explain import explain
from flashfuse.testing import assert_matches_eager

REF = {"kernel": "reference", "compiler": "eager"}
COMPILERS = ["eager", "aot_eager"]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _compare_with_eager(fn, *args, options=None, cot_seed=0, check_grads=True):
    """Compile once (through explain, so we also get the report) and compare with eager,
    NaN for NaN. Returns the report."""
    options = options or REF
    e_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    c_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    expected = fn(*e_args)
    report = explain(fn, *c_args, options=options)
    actual = report.result
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    if check_grads:
        cot = torch.randn(expected.shape, generator=torch.Generator().manual_seed(cot_seed))
        le = [a for a in e_args if a.requires_grad]
        lc = [a for a in c_args if a.requires_grad]
        ge = torch.autograd.grad(expected, le, cot)
        gc = torch.autograd.grad(actual, lc, cot)
        for i, (a, e) in enumerate(zip(gc, ge)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m: f"grad {i}: {m}")
    return report


def _qkv(b=2, h=3, m=6, n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).requires_grad_() for length in (m, n, n)]


# ---------------------------------------------------------------------------------------
# fully masked rows


def _padded(b=2, n=6):
    keep = torch.ones(b, 1, 1, n, dtype=torch.bool)
    keep[1] = False  # batch element 1 has no valid key at all: every one of its rows is masked
    return keep


@pytest.mark.parametrize("style", ["masked_fill", "where", "masked_fill_inplace"])
def test_fully_masked_rows_neg_inf_are_nan_like_eager(style):
    def fn(q, k, v, keep):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if style == "masked_fill":
            s = s.masked_fill(~keep, float("-inf"))
        elif style == "where":
            s = torch.where(keep, s, float("-inf"))
        else:
            s.masked_fill_(~keep, float("-inf"))
        return F.softmax(s, dim=-1) @ v

    q, k, v = _qkv()
    report = _compare_with_eager(fn, q, k, v, _padded())
    assert len(report.fused) == 1, report
    out = report.result
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()


def test_fully_masked_rows_finfo_min_are_uniform_like_eager():
    def fn(q, k, v, keep):
        s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        return torch.softmax(s, -1) @ v

    q, k, v = _qkv()
    report = _compare_with_eager(fn, q, k, v, _padded())
    assert len(report.fused) == 1, report
    # uniform attention over every key: each row of batch 1 is the mean of v
    torch.testing.assert_close(report.result[1], v[1].mean(-2, keepdim=True).expand_as(report.result[1]).detach())


def test_hf_additive_mask_finfo_min_fully_masked():
    """HF-style 4-D additive mask (0 / finfo.min), one sequence entirely padding."""

    def fn(q, k, v, attn_mask):
        s = q @ k.transpose(2, 3) * 0.35
        s = s + attn_mask
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 6, 6)
    mask[1] = torch.finfo(torch.float32).min
    mask[0, ..., 4:] = torch.finfo(torch.float32).min
    report = _compare_with_eager(fn, q, k, v, mask)
    assert len(report.fused) == 1, report


def test_additive_neg_inf_mask_fully_masked_is_nan():
    def fn(q, k, v, attn_mask):
        s = q @ k.transpose(-2, -1) * 0.35
        return F.softmax(s + attn_mask, dim=-1) @ v

    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 1, 6)
    mask[1] = float("-inf")
    report = _compare_with_eager(fn, q, k, v, mask)
    assert len(report.fused) == 1, report
    assert torch.isnan(report.result[1]).all()


def test_dead_rows_with_dropout_p0_and_grads_of_live_rows():
    """Dead rows must not leak NaN into the gradients of live batch elements' q (eager's don't)."""

    def fn(q, k, v, keep):
        s = q @ k.transpose(-2, -1) * 0.35
        s = s.masked_fill(~keep, float("-inf"))
        return F.dropout(F.softmax(s, -1), p=0.0) @ v

    q, k, v = _qkv()
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[0, :, 2] = False  # only row 2 of batch 0 is dead
    _compare_with_eager(fn, q, k, v, keep)


def test_dead_row_causal_and_mask_grads():
    def fn(q, k, v, keep):
        s = q @ k.transpose(-2, -1) * 0.35
        s = s.masked_fill(~keep, float("-inf"))
        causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril()
        s = s.masked_fill(~causal, float("-inf"))
        return F.softmax(s, -1) @ v

    q, k, v = _qkv()
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., 0] = False  # query 0 of batch 0 sees only key 0 (causal), which is padding
    report = _compare_with_eager(fn, q, k, v, keep, check_grads=False)
    assert len(report.fused) == 1 and report.fused[0].spec.causal, report
    _compare_with_eager(fn, q, k, v, keep)


def test_dead_row_bias_after_mask():
    def fn(q, k, v, keep, bias):
        s = q @ k.transpose(-2, -1) * 0.35
        s = s.masked_fill(~keep, float("-inf"))
        s = s + bias
        return F.softmax(s, -1) @ v

    q, k, v = _qkv()
    bias = torch.randn(1, 3, 6, 6, requires_grad=True)
    report = _compare_with_eager(fn, q, k, v, _padded(), bias)
    assert not report.fused and [r.reason for r in report.refused] == ["bias_grad_after_mask"], report
    # A bias that needs no gradient in the same place is fused: outputs agree in every row.
    report = _compare_with_eager(fn, q, k, v, _padded(), bias.detach())
    assert len(report.fused) == 1, report


# ---------------------------------------------------------------------------------------
# in-place ops the pass must not drop (regression: FX's eliminate_dead_code counts every
# call_method as pure and deleted `s.masked_fill_(...)` statements whose result is unused)


def test_refused_region_keeps_its_inplace_mask():
    def fn(q, k, v, keep, post):
        s = q @ k.transpose(-2, -1) * 0.35
        s.masked_fill_(~keep, float("-inf"))
        p = s.softmax(-1) + post  # a bias after the softmax: refused
        return p @ v

    q, k, v = _qkv()
    keep = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.4
    report = _compare_with_eager(fn, q, k, v, keep, torch.rand(2, 3, 6, 6), check_grads=False)
    assert not report.fused and report.refused


def test_inplace_op_elsewhere_survives_fusion():
    def fn(q, k, v, x):
        y = x * 2
        y.add_(1)  # a statement: its result is unused, the mutation is what matters
        s = q @ k.transpose(-2, -1) * 0.35
        return (s.softmax(-1) @ v) * y

    q, k, v = _qkv()
    report = _compare_with_eager(fn, q, k, v, torch.randn(6, 8))
    assert len(report.fused) == 1


# ---------------------------------------------------------------------------------------
# NaN and inf in the inputs


def _plain(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.35
    return torch.softmax(s, -1) @ v


def _masked(q, k, v, keep):
    s = q @ k.transpose(-2, -1) * 0.35
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_propagate_like_eager(where, value):
    q, k, v = _qkv(seed=3)
    t = {"q": q, "k": k, "v": v}[where]
    with torch.no_grad():
        t[0, 1, 2, 3] = value
    report = _compare_with_eager(_plain, q, k, v, check_grads=False)
    assert len(report.fused) == 1
    expected = _plain(q, k, v)
    assert torch.equal(torch.isnan(report.result), torch.isnan(expected))
    assert torch.isnan(expected).any() or torch.isinf(expected).any()


def test_nan_under_a_mask_and_in_v_like_eager():
    """A NaN score that a mask replaces disappears (as in eager); a NaN in v at a masked key
    still reaches the output through 0 * NaN (as in eager)."""
    q, k, v = _qkv(seed=4)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[..., 5] = False
    with torch.no_grad():
        k[0, 0, 5, 0] = float("nan")  # only feeds masked scores
    report = _compare_with_eager(_masked, q, k, v, keep, check_grads=False)
    assert not torch.isnan(report.result).any()
    with torch.no_grad():
        v[1, 2, 5, 1] = float("nan")
    report = _compare_with_eager(_masked, q, k, v, keep, check_grads=False)
    assert torch.isnan(report.result[1, 2, :, 1]).all()


# ---------------------------------------------------------------------------------------
# determinism


def _dropout_attn(q, k, v, bias):
    s = q @ k.transpose(-2, -1) * 0.35 + bias
    p = F.dropout(F.softmax(s, -1), p=0.3, training=True)
    return p @ v


def _run(compiled, seed, *args):
    leaves = _leaves(*args)
    torch.manual_seed(seed)
    out = compiled(*leaves)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out, leaves, cot)
    return out.detach(), grads


@pytest.mark.parametrize("compiler", COMPILERS)
def test_dropout_same_seed_same_mask_and_grads(compiler):
    q, k, v = _qkv()
    bias = torch.randn(2, 1, 1, 6)
    report = explain(_dropout_attn, q, k, v, bias, options={"kernel": "reference", "compiler": compiler})
    assert len(report.fused) == 1 and report.fused[0].spec.dropout_p == 0.3
    compiled = torch.compile(_dropout_attn, backend="flashfuse", options={"kernel": "reference", "compiler": compiler})
    out1, g1 = _run(compiled, 0, q, k, v, bias)
    out2, g2 = _run(compiled, 0, q, k, v, bias)
    out3, _ = _run(compiled, 1, q, k, v, bias)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    assert not torch.equal(out1, out3), "another seed must give another mask"
    # and the mask is the documented Philox mask of the seed the graph drew
    torch.manual_seed(0)
    seed = int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item())
    expected, _ = oracle.attention(q.detach(), k.detach(), v.detach(), bias=bias, scale=0.35, dropout_p=0.3, seed=seed)
    torch.testing.assert_close(out1, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_backward_without_dropout_is_bitwise_deterministic(compiler):
    def fn(q, k, v, bias, keep):
        s = q @ k.transpose(-2, -1) * 0.35 + bias
        s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v

    q, k, v = _qkv(m=300, n=300, d=16)  # > one key block of the reference kernel
    bias = torch.randn(2, 1, 1, 300, requires_grad=True)  # broadcast: dbias sums over heads and rows
    keep = torch.rand(2, 1, 300, 300, generator=torch.Generator().manual_seed(1)) > 0.2
    compiled = torch.compile(fn, backend="flashfuse", options={"kernel": "reference", "compiler": compiler})
    runs = []
    for _ in range(3):
        leaves = _leaves(q, k, v, bias)
        out = compiled(*leaves, keep)
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for grads in runs[1:]:
        for a, b in zip(runs[0], grads):
            assert torch.equal(a, b)
    assert explain(fn, q, k, v, bias, keep, options={"kernel": "reference", "compiler": compiler}).fused


# ---------------------------------------------------------------------------------------
# activation checkpointing


class Block(nn.Module):
    def __init__(self, dim=32, heads=4, dropout=0.0, use_checkpoint=False):
        super().__init__()
        self.heads, self.dropout, self.use_checkpoint = heads, dropout, use_checkpoint
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def attn(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        p = F.dropout(s.softmax(-1), p=self.dropout, training=self.training)
        return self.proj((p @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        if self.use_checkpoint:
            return x + checkpoint(self.attn, x, use_reentrant=False)
        return x + self.attn(x)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiled_model_using_checkpoint(compiler):
    torch.manual_seed(0)
    model = Block(use_checkpoint=True)
    x = torch.randn(2, 7, 32, requires_grad=True)
    options = {"kernel": "reference", "compiler": compiler}
    report = explain(model, x, options=options)
    assert len(report.fused) == 1, report
    assert_matches_eager(model, x, options=options)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_checkpoint_around_compiled_module_with_dropout(compiler):
    """The recompute in the backward draws the same dropout seed (checkpoint restores the RNG
    state), so checkpointed and plain compiled runs give bitwise equal gradients."""
    torch.manual_seed(0)
    model = Block(dropout=0.2).train()
    compiled = torch.compile(model, backend="flashfuse", options={"kernel": "reference", "compiler": compiler})
    x = torch.randn(2, 7, 32)

    def grads(use_ckpt):
        xi = x.clone().requires_grad_()
        torch.manual_seed(123)
        out = checkpoint(compiled, xi, use_reentrant=False) if use_ckpt else compiled(xi)
        params = [xi] + list(model.parameters())
        return out.detach(), torch.autograd.grad(out, params, torch.ones_like(out))

    out_plain, g_plain = grads(False)
    out_ckpt, g_ckpt = grads(True)
    assert torch.equal(out_plain, out_ckpt)
    for a, b in zip(g_plain, g_ckpt):
        assert torch.equal(a, b)
    assert len(explain(model, x, options={"kernel": "reference", "compiler": compiler}).fused) == 1


# ---------------------------------------------------------------------------------------
# no_grad / inference_mode: nothing saved for a backward that cannot happen


class _CountSaved:
    def __init__(self):
        self.n = 0

    def __enter__(self):
        def pack(t):
            self.n += 1
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_saves_nothing(compiler, mode):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 7, 32)
    options = {"kernel": "reference", "compiler": compiler}
    expected = model(x)
    compiled = torch.compile(model, backend="flashfuse", options=options)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx, _CountSaved() as saved:
        out = compiled(x)
    assert out.grad_fn is None and not out.requires_grad
    assert saved.n == 0, f"{saved.n} tensors saved for backward under {mode}"
    torch.testing.assert_close(out, expected.detach(), rtol=1e-4, atol=1e-5)
    with ctx:
        assert len(explain(model, x, options=options).fused) == 1
    # the same model with grad enabled does save (so the counter can see saves at all)
    torch._dynamo.reset()
    with _CountSaved() as saved:
        compiled(x.requires_grad_())
    assert saved.n > 0


def test_no_grad_op_has_no_grad_fn():
    q, k, v = _qkv()
    with torch.no_grad():
        out, m, log_l = torch.ops.flashfuse.attention(q, k, v, None, None, 0.35, False, 0.0, None, 1, float("-inf"), True, "reference")
    assert out.grad_fn is None and m.grad_fn is None and log_l.grad_fn is None


@pytest.mark.gpu
def test_triton_backward_dq_dk_dv_deterministic():
    """docs/determinism.md: on the Triton path dq, dk, dv use no atomics (dbias of a broadcast
    bias does, and is not checked here)."""
    q, k, v = (t.detach().cuda().half().requires_grad_() for t in _qkv(m=257, n=257, d=64))
    bias = torch.randn(2, 1, 1, 257, device="cuda", dtype=torch.half)
    runs = []
    for _ in range(3):
        out, _, _ = torch.ops.flashfuse.attention(q, k, v, bias, None, 0.125, True, 0.0, None, 1, float("-inf"), True, "triton", strict=True)
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for grads in runs[1:]:
        for a, b in zip(runs[0], grads):
            assert torch.equal(a, b)
