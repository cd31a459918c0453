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


# Graphs that look causal but are not: each must keep its mask (or bias) and match eager.
# (Found by review; the first one was let through by the leading-dims rule above.)
FMIN = torch.finfo(torch.float32).min


def _tri(n, device, dtype=torch.bool):
    return torch.ones(n, n, dtype=dtype, device=device).tril()


NOT_CAUSAL = {
    # a triangle indexed off the last two dims: rows of the mask become batch entries
    "triangle_moved_by_none": (lambda s, n: torch.where(_tri(n, s.device)[:, None, :], s, NEG), (1, 4096, 1, 16), (1, 4096, 4096, 16)),
    "triangle_moved_by_ellipsis": (lambda s, n: torch.where(_tri(4096, s.device)[None, ..., None][:, :1], s, NEG), (1, 1, 4096, 16), (1, 1, 1, 16)),
    # in-place writes after the factory ops
    "arange_add_": (lambda s, n: _inplace_arange(s, n), (1, 1, 4096, 16), None),
    "triangle_setitem": (lambda s, n: s.masked_fill(~_tri_set(n, s.device), NEG), (1, 1, 4096, 16), None),
    "bias_masked_fill_": (lambda s, n: s + _hf_bias_filled(n, s.device), (1, 1, 4096, 16), None),
    "small_folded_setitem": (lambda s, n: s.masked_fill(~_tri_set(n, s.device), NEG), (1, 1, 256, 16), None),
    # values that are no longer one index per position, or no longer 0 / 1 / -inf
    "arange_uint8_wraps": (lambda s, n: _arange_cmp(s, n, torch.uint8), (1, 1, 4096, 16), None),
    "arange_fp16_ties": (lambda s, n: _arange_cmp(s, n, torch.float16), (1, 1, 4096, 16), None),
    "arange_step_keyword": (lambda s, n: torch.where(torch.arange(0, 2 * n, step=2, device=s.device)[:, None]
                                                     >= torch.arange(n, device=s.device)[None, :], s, NEG), (1, 1, 4096, 16), None),
    "bool_full_neg_inf": (lambda s, n: s + torch.full((n, n), NEG, dtype=torch.bool, device=s.device).triu(1), (1, 1, 4096, 16), None),
    "neg_above_cast_to_bool": (lambda s, n: s + torch.full((n, n), NEG, device=s.device).triu(1).bool(), (1, 1, 4096, 16), None),
    "int_bitwise_invert": (lambda s, n: torch.where((~_tri(n, s.device, torch.int64)) == 0, s, NEG), (1, 1, 4096, 16), None),
    "bitcast_view": (lambda s, n: s + torch.where(_tri(n, s.device), 0.0, FMIN).to(torch.bfloat16).view(torch.float16), (1, 1, 4096, 16), None),
}


def _inplace_arange(s, n):
    qi, ki = torch.arange(n, device=s.device), torch.arange(n, device=s.device)
    qi.add_(1)
    return torch.where(qi[:, None] >= ki[None, :], s, NEG)


def _tri_set(n, device):
    keep = _tri(n, device)
    keep[:, -1] = True
    return keep


def _hf_bias_filled(n, device):
    b = torch.where(_tri(n, device), torch.tensor(0.0, device=device), FMIN)
    b.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device), 0.0)
    return b


def _arange_cmp(s, n, dtype):
    i = torch.arange(n, device=s.device, dtype=dtype)
    return torch.where(i[:, None] >= i[None, :], s, NEG)


@pytest.mark.parametrize("name", sorted(NOT_CAUSAL))
def test_lookalikes_are_not_made_causal(name):
    build, q_shape, k_shape = NOT_CAUSAL[name]

    def attn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = build(s, k.shape[-2])
        return torch.softmax(s.float(), dim=-1) @ v

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(q_shape, generator=gen)
    k = torch.randn(k_shape or q_shape, generator=gen)
    v = torch.randn(k_shape or q_shape, generator=gen)
    report = flashfuse.explain(attn, q, k, v, options=OPTS)
    assert not any(r.spec.causal for r in report.fused), report
    want = attn(q, k, v)
    rows = slice(max(0, q_shape[-2] - 64), q_shape[-2])
    torch.testing.assert_close(report.result[..., rows, :], want[..., rows, :], rtol=1e-4, atol=1e-5, equal_nan=True)
