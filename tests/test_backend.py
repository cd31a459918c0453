"""The backend end to end: entry point, options, compiled vs eager, the op, the explain report."""

import math
import os
import subprocess
import sys
import textwrap

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import flashfuse
from flashfuse.report import normalize_code
from flashfuse.testing import assert_fused, assert_matches_eager

REF = {"kernel": "reference"}


class Block(nn.Module):
    """A small GPT block with hand-written causal attention and dropout, nanoGPT style."""

    def __init__(self, width=32, heads=2, seq=16, p=0.0):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(p)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.register_buffer("causal", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.causal[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.drop(att)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(x)


def test_entry_point_in_fresh_interpreter():
    # No `import flashfuse`: the torch_dynamo_backends entry point must find the backend.
    code = textwrap.dedent(
        """
        import sys, torch
        def attn(q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
        q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
        assert "flashfuse" not in sys.modules
        out = torch.compile(attn, backend="flashfuse", options={"kernel": "reference", "compiler": "eager"})(q, k, v)
        from torch._dynamo.utils import counters
        torch.testing.assert_close(out, attn(q, k, v))
        print("fused", counters["flashfuse"]["fused"])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "fused 1" in res.stdout


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager", "eager"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block_matches_eager(compiler, mode):
    torch.manual_seed(0)
    block = Block(p=0.0 if mode == "train" else 0.2)
    block.train(mode == "train")
    x = torch.randn(2, 16, 32, requires_grad=True)
    assert_matches_eager(block, x, options={**REF, "compiler": compiler})
    assert counters["flashfuse"]["fused"] == 1


def test_block_with_dropout_is_fused_in_train_mode():
    torch.manual_seed(0)
    block = Block(p=0.1).train()
    x = torch.randn(2, 16, 32)
    report = assert_fused(block, x, count=1, options=REF)
    assert report.fused[0].spec.dropout_p == pytest.approx(0.1)
    # The gradient flows through the fused dropout (its keep-mask is regenerated in the backward).
    out = torch.compile(block, backend="flashfuse", options=REF)(x)
    out.sum().backward()
    assert block.qkv.weight.grad is not None and torch.isfinite(block.qkv.weight.grad).all()


def test_fusion_off_keeps_graph():
    block = Block()
    x = torch.randn(2, 16, 32)
    report = flashfuse.explain(block, x, options={"fusion": False})
    assert report.fused == [] and report.graphs[0].before == report.graphs[0].after
    assert counters["flashfuse"]["fused"] == 0


@pytest.mark.parametrize(
    "options, match",
    [
        ({"compiler": "tvm"}, "'inductor', 'aot_eager', 'eager'"),
        ({"kernel": "cuda"}, "'auto', 'triton', 'reference'"),
        ({"fuse": True}, "Valid options: compiler"),
        ({"strict": "yes"}, "must be a bool"),
    ],
)
def test_bad_options_name_valid_ones(options, match):
    f = torch.compile(lambda x: x + 1, backend="flashfuse", options=options)
    with pytest.raises(Exception, match=match):
        f(torch.randn(3))


def _op_args(q, k, v, bias=None, mask=None, causal=False, p=0.0, group=1, fill=float("-inf")):
    seed = torch.tensor([1234], dtype=torch.int64) if p > 0 else None
    return (q, k, v, bias, mask, q.shape[-1] ** -0.5, causal, p, seed, group, fill, True, "reference")


@pytest.mark.parametrize("case", ["plain", "bias_mask_gqa", "dropout_causal"])
def test_opcheck(case):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16, requires_grad=True)
    kv_heads = 2 if case == "bias_mask_gqa" else 4
    k, v = (torch.randn(2, kv_heads, 11, 16, requires_grad=True) for _ in range(2))
    if case == "plain":
        args = _op_args(q, k, v)
    elif case == "bias_mask_gqa":
        bias = torch.randn(1, 4, 9, 11, requires_grad=True)
        mask = torch.rand(2, 1, 1, 11) > 0.3
        args = _op_args(q, k, v, bias=bias, mask=mask, group=2, fill=-1e9)
    else:
        args = _op_args(q, k, v, causal=True, p=0.25)
    torch.library.opcheck(torch.ops.flashfuse.attention.default, args)
    out, m, log_l = torch.ops.flashfuse.attention.default(*args)
    # Double backward is not supported, so the backward op is checked on plain tensors.
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in (*args[:5], out, m, log_l)]
    bwd_args = (torch.randn_like(out), *plain, *args[5:10], args[10], args[3] is not None, "reference")
    torch.library.opcheck(torch.ops.flashfuse.attention_backward.default, bwd_args)


def test_op_refuses_double_backward():
    # The op's backward has an autograd formula that refuses: without one, create_graph=True
    # would run the backward op with grad mode on (in-place writes on leaves, or wrong grads).
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    out = torch.ops.flashfuse.attention(*_op_args(q, k, v, bias=bias))[0]
    ref = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5 + bias, -1) @ v
    (g,) = torch.autograd.grad((out * out).sum(), q, create_graph=True)
    (g_ref,) = torch.autograd.grad((ref * ref).sum(), q)
    torch.testing.assert_close(g.detach(), g_ref)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.sum(), q)


def test_ops_module_reloads():
    # importlib.reload (Jupyter autoreload) redefines the ops instead of failing on the
    # namespace; in a subprocess, so this process keeps its registrations.
    code = textwrap.dedent("""
        import importlib, torch
        import flashfuse, flashfuse.ops as ops
        q = torch.randn(1, 2, 5, 8)
        before = torch.ops.flashfuse.attention(q, q, q, None, None, 0.5, False, 0.0, None, 1, float("-inf"), True, "reference")[0]
        importlib.reload(ops)
        after = torch.ops.flashfuse.attention(q, q, q, None, None, 0.5, False, 0.0, None, 1, float("-inf"), True, "reference")[0]
        torch.testing.assert_close(before, after)
        print("reloaded")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "reloaded" in out.stdout, out.stderr[-2000:]


def _block_fn(q, k, v):
    s = (q @ k.transpose(-2, -1)) / 4.0
    p = torch.softmax(s, dim=-1)
    return p @ v


class ExplainSnapshot(expecttest.TestCase):
    def test_report_before_after(self):
        q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
        report = flashfuse.explain(_block_fn, q, k, v, options={"kernel": "reference", "compiler": "eager"})
        g = report.graphs[0]
        self.assertExpectedInline(
            g.before,
            """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1);  l_k_ = None
    matmul = l_q_ @ transpose;  l_q_ = transpose = None
    s = matmul / 4.0;  matmul = None
    p = torch.softmax(s, dim = -1);  s = None
    matmul_1 = p @ l_v_;  p = l_v_ = None
    return (matmul_1,)""",
        )
        self.assertExpectedInline(
            g.after,
            """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    ff_attention = torch.ops.flashfuse.attention.default(l_q_, l_k_, l_v_, None, None, 0.25, False, 0.0, None, 1, -inf, True, 'reference');  l_q_ = l_k_ = l_v_ = None
    ff_out = ff_attention[0];  ff_attention = None
    return (ff_out,)""",
        )
        region = report.fused[0]
        assert region.location.endswith(f"test_backend.py:{_block_fn.__code__.co_firstlineno + 2}")
        assert region.spec.scale == 0.25 and region.spec.mask_kind == "none" and region.kernel == "reference"
        text = str(report)
        assert "1 attention region(s) fused" in text and "online softmax" in text


def test_explain_reports_refusal_with_reason():
    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-2)  # over the queries: not attention
        return p @ v

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    report = flashfuse.explain(fn, q, k, v, options=REF)
    assert report.fused == []
    assert [r.reason for r in report.refused] == ["softmax_dim"]
    assert counters["flashfuse"]["refused_softmax_dim"] == 1
    torch.testing.assert_close(report.result, fn(q, k, v))
    with pytest.raises(AssertionError, match=r"softmax_dim"):
        assert_fused(fn, q, k, v, options=REF)


def test_logs_go_to_flashfuse_logger(caplog):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with caplog.at_level("INFO", logger="flashfuse"):
        flashfuse.explain(_block_fn, q, k, v, options=REF)
    assert any("fused attention at" in r.message for r in caplog.records)
