"""The reference kernel (tiled online softmax) against the N x N oracle in fp64, and its memory."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import oracle
from flashfuse.kernels import philox, reference


def _run(q, k, v, bias=None, mask=None, causal=False, p=0.0, group=1, fill=float("-inf"), seed=987654321):
    seed_t = torch.tensor([seed], dtype=torch.int64)
    scale = q.shape[-1] ** -0.5
    out, m, log_l = torch.ops.flashfuse.attention(q, k, v, bias, mask, scale, causal, p, seed_t, group, fill, True, "reference")
    ref, lse = oracle.attention(q, k, v, bias, mask, scale, causal, p, seed, group, fill)
    return out, m + log_l, ref, lse


@pytest.mark.parametrize("m, n", [(1, 1), (17, 17), (129, 129), (1, 129), (129, 17), (17, 300)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2])
def test_matches_oracle_fp64(m, n, causal, group, monkeypatch):
    # Small tiles so several query and key blocks are walked even at these sizes.
    monkeypatch.setattr(reference, "BLOCK_M", 16)
    monkeypatch.setattr(reference, "BLOCK_N", 32)
    torch.manual_seed(m * 1000 + n)
    dt = torch.float64
    q = torch.randn(2, 4, m, 24, dtype=dt, requires_grad=True)
    k, v = (torch.randn(2, 4 // group, n, 24, dtype=dt, requires_grad=True) for _ in range(2))
    bias = torch.randn(1, 4, m, n, dtype=dt, requires_grad=True)
    mask = torch.rand(2, 1, 1, n) > 0.2
    mask[..., 0] = True  # keep one key per row so no row is fully masked (tested separately)
    out, lse, ref, ref_lse = _run(q, k, v, bias, mask, causal=causal, group=group, p=0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # the reference accumulates in fp32
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)  # m, log_l are fp32
    do = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, bias), do)
    want = torch.autograd.grad(ref, (q, k, v, bias), do)
    for name, g, w in zip("q k v bias".split(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda s: f"d{name}: {s}")


def test_dropout_uses_the_philox_keep_mask(monkeypatch):
    monkeypatch.setattr(reference, "BLOCK_M", 8)
    monkeypatch.setattr(reference, "BLOCK_N", 16)
    dt = torch.float64
    q, k, v = (torch.randn(2, 2, 33, 16, dtype=dt, requires_grad=True) for _ in range(3))
    keep = philox.keep_mask(42, 0.3, 2, 2, 33, 33)
    assert 0.6 < keep.float().mean() < 0.8
    out, _, ref, _ = _run(q, k, v, p=0.3, seed=42)
    ref2, _ = oracle.attention(q, k, v, dropout_p=0.3, keep=keep)
    torch.testing.assert_close(out, ref2, rtol=1e-5, atol=1e-6)
    do = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref2, (q, k, v), do)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_fully_masked_rows_follow_eager():
    dt = torch.float64
    q, k, v = (torch.randn(1, 1, 6, 8, dtype=dt) for _ in range(3))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    for fill in (float("-inf"), torch.finfo(torch.float32).min, -1e9):
        out, _, ref, _ = _run(q, k, v, mask=mask, fill=fill)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert out[..., 2, :].isnan().all() == (fill == float("-inf"))


def _peak_cpu_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_peak_memory_is_linear_not_quadratic():
    n, d = 4096, 64
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))

    def fused():
        out, _, _ = torch.ops.flashfuse.attention(q, k, v, None, None, d ** -0.5, True, 0.0, None, 1, float("-inf"), True, "reference")
        out.sum().backward()

    peak = _peak_cpu_bytes(fused)
    scores_bytes = n * n * 4
    assert 0 < peak < scores_bytes / 4, f"peak {peak / 2**20:.1f} MiB vs N^2 floats {scores_bytes / 2**20:.0f} MiB"
