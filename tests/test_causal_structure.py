"""Causal masks proven from how the graph builds them, at sizes too large to constant-fold."""

import pytest
import torch

import flashfuse

N = 4096  # 16.7M mask elements: past constants.fold's limit, so only the structure can prove it
OPTS = {"kernel": "reference", "compiler": "eager"}
NEG = float("-inf")


def _triu_ones(s, n):
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), NEG)


def _tril_buffer_eq0(s, n):
    return s.masked_fill(torch.tril(torch.ones(n, n, device=s.device))[None, None] == 0, NEG)


def _arange_where(s, n):
    i = torch.arange(n, device=s.device)
    return torch.where(i[:, None] >= i[None, :], s, NEG)


def _arange_gt_view(s, n):
    i = torch.arange(n, device=s.device)
    return s.masked_fill(i[None, :] > i.view(-1, 1), NEG)


def _additive_triu(s, n):
    return s + torch.full((n, n), NEG, device=s.device).triu(1)


def _anti_causal(s, n):
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).tril(), NEG)


def _wrong_diagonal(s, n):
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(0), NEG)


def _transposed(s, n):
    return s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=s.device).tril().t(), NEG)


def _row_le_col(s, n):
    i = torch.arange(n, device=s.device)
    return torch.where(i[:, None] <= i[None, :], s, NEG)


@pytest.mark.parametrize(
    "build, causal",
    [(_triu_ones, True), (_tril_buffer_eq0, True), (_arange_where, True), (_arange_gt_view, True), (_additive_triu, True),
     (_wrong_diagonal, False), (_transposed, False), (_row_le_col, False), (_anti_causal, False)],
)
def test_structure_proves_causal(build, causal):
    def attn(q, k, v):
        s = build((q @ k.transpose(-2, -1)) * 0.25, q.shape[-2])
        return torch.softmax(s, dim=-1) @ v

    q, k, v = (torch.randn(1, 1, N, 16) for _ in range(3))
    report = flashfuse.explain(attn, q, k, v, options=OPTS)
    if build is _anti_causal:  # masks key 0 out of row 0 only, ... and the last row entirely: still a plain mask
        assert not report.fused or not report.fused[0].spec.causal
        return
    assert len(report.fused) == 1, report
    spec = report.fused[0].spec
    assert spec.causal is causal
    assert bool(spec.mask_shapes) is not causal  # a non-causal triangle stays a mask the kernel reads
    rows = slice(N - 64, N)  # compare a slice: the full N x N oracle in fp32 is 64 MiB, fine, but slow
    want = attn(q, k, v)
    torch.testing.assert_close(report.result[..., rows, :], want[..., rows, :], rtol=1e-4, atol=1e-5, equal_nan=True)
