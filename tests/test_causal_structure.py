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


# HF transformers 5.x (masking_utils.sdpa_mask + eager_mask, no padding): index tensors offset
# by the cache position, laid out 4-D, compared, expanded over the batch, then made additive
# with finfo.min. At B=2, N=2048 the mask has 8.4M elements: past the folding limit.
HF_N = 2048


def _hf_mask(n, batch, device, q_offset=0, fill=torch.finfo(torch.float32).min, zero=0.0, expand_batch=None):
    q_idx = (torch.arange(n, device=device) + q_offset)[None, None, :, None]
    kv_idx = (torch.arange(n, device=device) + 0)[None, None, None, :]
    keep = (kv_idx <= q_idx).expand(expand_batch or batch, -1, n, n)
    return torch.where(keep, torch.tensor(zero, device=device, dtype=torch.float32), fill)


@pytest.mark.parametrize(
    "variant, causal",
    [
        (dict(), True),
        (dict(fill=-1e4), False),           # a fill that is not far below every score: exact only as a bias
        (dict(q_offset=1), False),          # shifted diagonal: row i keeps keys <= i + 1
        (dict(fill=1.0), False),            # a positive "fill" is no mask at all
        (dict(zero=0.5), False),            # kept positions are shifted by 0.5: a bias
        (dict(expand_batch=4), None),       # the mask widens the batch: never dropped for causal=True
    ],
)
def test_hf5_additive_causal_mask_at_size(variant, causal):
    def attn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25 + _hf_mask(q.shape[-2], q.shape[0], q.device, **variant)
        return torch.softmax(s, dim=-1) @ v

    batch = 1 if variant.get("expand_batch") else 2
    q, k, v = (torch.randn(batch, 1, HF_N, 16) for _ in range(3))
    report = flashfuse.explain(attn, q, k, v, options=OPTS)
    if causal is None:
        assert not report.fused or not report.fused[0].spec.causal
    else:
        assert len(report.fused) == 1, report
        assert report.fused[0].spec.causal is causal
    rows = slice(HF_N - 64, HF_N)
    want = attn(q, k, v)
    torch.testing.assert_close(report.result[..., rows, :], want[..., rows, :], rtol=1e-4, atol=1e-5)
