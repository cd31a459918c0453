"""Block summaries: exact against brute force for real mask patterns; broadcast; cache semantics.
Then the Triton kernels' block-sparse walk on those patterns (interpreter) and the explicit
block-layout API, against the oracle.
"""

import os

import pytest
import torch

from flashfuse import mask_patterns as mp
from flashfuse.kernels import block_sparse as bs
from flashfuse.kernels import launch

try:
    import oracle  # tests/ is on sys.path under pytest's default import mode
except ImportError:  # pragma: no cover
    from tests import oracle

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warnings from the interpreter on masked rows

BM, BN = 16, 32


def _brute(keep4: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    b, h, m, n = keep4.shape
    bm = bm if m > 1 else 1
    mb, nb = -(-m // bm), -(-n // bn)
    out = torch.empty(b, h, mb, nb, dtype=torch.int8)
    for i in range(mb):
        for j in range(nb):
            tile = keep4[:, :, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            kept = tile.flatten(2).sum(-1)
            out[:, :, i, j] = torch.where(kept == 0, bs.EMPTY, torch.where(kept == tile[0, 0].numel(), bs.FULL, bs.PARTIAL))
    return out


PATTERNS = {
    "causal": lambda: mp.causal(100, 100),
    "sliding_window": lambda: mp.sliding_window(130, 130, window=40),
    "document": lambda: mp.document([30, 50, 1, 49]),
    "prefix_lm": lambda: mp.prefix_lm(97, 97, prefix=33),
    "dilated": lambda: mp.dilated(80, 80, stride=3),
    "random_blocks": lambda: mp.random_blocks(100, 129, BM, BN, density=0.3, seed=1),
    "cross_attention": lambda: torch.rand(33, 200) > 0.1,
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_summary_matches_brute_force(name):
    keep = PATTERNS[name]()[None, None]
    got = bs.summarize(keep, BM, BN)
    torch.testing.assert_close(got, _brute(keep, BM, BN), rtol=0, atol=0)


def test_padding_mask_keeps_its_broadcast():
    keep = mp.padding([5, 64, 33], 70)  # [B, 1, 1, N]
    got = bs.summarize(keep, BM, BN)
    assert got.shape == (3, 1, 1, 3)
    torch.testing.assert_close(got, _brute(keep, BM, BN), rtol=0, atol=0)


def test_expanded_mask_keeps_its_broadcast():
    # an expand()ed mask is summarized from its one distinct slice, never materialized
    keep = mp.document([30, 50, 20])[None, None].expand(4, 8, 100, 100)
    got = bs.summarize(keep, BM, BN)
    assert got.shape == (1, 1, 7, 4)
    torch.testing.assert_close(got, _brute(keep[:1, :1], BM, BN), rtol=0, atol=0)
    rows = mp.padding([5, 64], 70).expand(2, 3, 40, 70)  # [B, 1, 1, N] expanded over heads and rows
    assert bs.summarize(rows, BM, BN).shape == (2, 1, 1, 3)


def test_bias_summary_empty_and_full():
    bias = torch.zeros(1, 2, 40, 70)
    bias[:, :, :, 64:] = float("-inf")  # last key block all -inf (EMPTY)
    bias[:, 1, :5, :5] = 0.5            # one PARTIAL tile in head 1
    got = bs.summarize(bias, BM, BN)
    assert got.shape == (1, 2, 3, 3)
    assert (got[..., 2] == bs.EMPTY).all()
    assert got[0, 0, :, :2].eq(bs.FULL).all() and got[0, 1, 0, 0] == bs.PARTIAL


def test_lists_walk_only_nonempty_blocks():
    keep = mp.sliding_window(128, 128, window=32)[None, None]
    lists = bs.lists_for(None, keep, 32, 32)
    summary = bs.summarize(keep, 32, 32)
    for i in range(4):
        want = [j for j in range(4) if summary[0, 0, i, j] != bs.EMPTY]
        assert lists.kv_index[0, 0, i, : lists.kv_count[0, 0, i]].tolist() == want
        assert lists.kv_full[0, 0, i, : len(want)].tolist() == [int(summary[0, 0, i, j] == bs.FULL) for j in want]
        want_q = [r for r in range(4) if summary[0, 0, r, i] != bs.EMPTY]
        assert lists.q_index[0, 0, i, : lists.q_count[0, 0, i]].tolist() == want_q
    assert 0 < lists.density < 1


def test_cache_hits_while_unchanged_and_misses_after_change(monkeypatch):
    monkeypatch.setenv(bs.CACHE_ENV, "1")
    bs.cache.clear()
    keep = mp.causal(64, 64)[None, None]
    bs.cache.get(keep, BM, BN)
    bs.cache.get(keep, BM, BN)
    assert (bs.cache.hits, bs.cache.misses) == (1, 1)
    keep[..., 0, 1] = True  # in place: the version counter moves
    s = bs.cache.get(keep, BM, BN)
    assert bs.cache.misses == 2 and s[0, 0, 0, 0] == bs.PARTIAL
    other = keep.clone()  # an equal tensor is a different object: summarized anew
    bs.cache.get(other, BM, BN)
    assert bs.cache.misses == 3


def test_combine_mask_and_bias():
    mask = torch.ones(1, 1, 32, 64, dtype=torch.bool)
    mask[..., 32:] = False
    bias = torch.zeros(1, 4, 32, 64)
    bias[:, 0, 0, 0] = 1.0
    combined = bs.combine(bs.summarize(bias, 32, 32), bs.summarize(mask, 32, 32))
    assert combined.shape == (1, 4, 1, 2)
    assert combined[0, 0, 0].tolist() == [bs.PARTIAL, bs.EMPTY]
    assert combined[0, 1, 0].tolist() == [bs.FULL, bs.EMPTY]


def test_from_layout():
    layout = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    lists = bs.from_layout(layout, 64, 64)
    assert lists.kv_count.tolist() == [[[1, 2]]]
    assert lists.kv_full[0, 0].tolist() == [[1, 0], [1, 1]]


# -- the Triton kernels' block-sparse walk, under the interpreter, against the oracle -------------
#
# Sizes cross several 128-wide sparse blocks and end in ragged ones; every pattern runs the
# forward and the backward (dq, dk, dv) and compares with tests/oracle.py in fp64.

_GPU_SESSION = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
needs_interpreter = pytest.mark.skipif(_GPU_SESSION, reason="interpreter tests; tests/gpu/ covers the GPU")
F32_MIN = torch.finfo(torch.float32).min


def _rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    assert torch.equal(torch.isnan(x), torch.isnan(ref)), "NaN pattern differs from eager"
    fin = torch.isfinite(ref)
    return ((x[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def run_sparse(mask=None, bias=None, layout=None, dense=None, causal=False, b=1, hq=2, group=1, d=16,
               mask_value=float("-inf"), dropout_p=0.0, tol=1e-5):
    """Triton kernels (fwd + bwd) with mask / bias / layout against the oracle; dense: the layout's element mask."""
    from flashfuse.kernels import philox, triton_attention

    ref_t = next(t for t in (mask, bias, dense) if t is not None)
    m, n = ref_t.shape[-2:]
    gen = torch.Generator().manual_seed(m * 7 + n)
    q = torch.randn(b, hq, m, d, generator=gen)
    k, v = (torch.randn(b, hq // group, n, d, generator=gen) for _ in range(2))
    seed, scale = torch.tensor([11], dtype=torch.int64), d ** -0.5
    args = (scale, causal, dropout_p, seed, group, mask_value)
    out, m_stat, log_l = triton_attention.attention_forward(q, k, v, bias, mask, *args, layout)

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    bd = bias.double().requires_grad_() if bias is not None else None
    keep = philox.keep_mask(11, dropout_p, b, hq, m, n) if dropout_p > 0 else None
    omask = mask if dense is None else (dense if mask is None else mask & dense)
    ref, lse = oracle.attention(qd, kd, vd, bd, omask, scale, causal, dropout_p, 11, group, mask_value, keep=keep)
    assert _rel(out, ref) < tol, ("out", _rel(out, ref))
    assert _rel(m_stat.double() + log_l.double(), lse) < 1e-5

    dout = torch.randn(out.shape, generator=gen)
    ref.backward(dout.double())
    dq, dk, dv, dbias = triton_attention.attention_backward(dout, q, k, v, bias, mask, out, m_stat, log_l, *args, bias is not None, layout)
    grads = [("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)]
    if bias is not None:
        grads.append(("dbias", dbias, bd.grad))
    for name, got, want in grads:
        assert _rel(got, want) < tol, (name, _rel(got, want))
    return out


def _check_against_oracle(q, k, v, keep, out, dout, grads, causal=False, what=None):
    """out and grads (of q, k, v under dout) against the fp64 oracle with mask `keep`."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = oracle.attention(qd, kd, vd, None, keep, 16 ** -0.5, causal)
    want = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    assert _rel(out, ref) < 1e-5, what
    for g_, w in zip(grads, want):
        assert _rel(g_, w) < 1e-5, what


def _spy(monkeypatch, module, name, record=lambda *a, **kw: a[:1]) -> list:
    """Wrap module.name so each call appends record(*args, **kwargs) to the returned list."""
    calls, real = [], getattr(module, name)

    def spy(*a, **kw):
        calls.append(record(*a, **kw))
        return real(*a, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


# name -> (mask [.., M, N], kwargs of run_sparse)
KERNEL_PATTERNS = {
    "sliding_window-causal": lambda: (mp.sliding_window(300, 300, window=100)[None, None], dict(causal=True)),
    "document-causal": lambda: (mp.document([100, 150, 50])[None, None], dict(causal=True)),
    "prefix_lm": lambda: (mp.prefix_lm(300, 300, prefix=140)[None, None], {}),
    "padding": lambda: (mp.padding([300, 129], 300), dict(b=2)),
    "dilated": lambda: (mp.dilated(300, 300, stride=3)[None, None], {}),
    "random_blocks-dropout": lambda: (mp.random_blocks(300, 260, 128, 128, density=0.4, seed=3)[None, None], dict(dropout_p=0.2)),
    "causal-mask-cross": lambda: (mp.causal(200, 300)[None, None], {}),
}


@needs_interpreter
@pytest.mark.parametrize("name", sorted(KERNEL_PATTERNS))
def test_kernels_on_pattern(name):
    mask, kwargs = KERNEL_PATTERNS[name]()
    run_sparse(mask=mask, **kwargs)


@needs_interpreter
def test_kernels_per_head_masks_gqa():
    # lists indexed per query head (GQA: dK/dV walks each head's own lists)
    masks = [mp.sliding_window(260, 260, window=60), mp.document([128, 132]), mp.prefix_lm(260, 260, prefix=70), mp.causal(260, 260)]
    run_sparse(mask=torch.stack(masks)[None], hq=4, group=2)


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernels_additive_bias_blocks(causal):
    # a 0 / -inf document bias (EMPTY and FULL blocks) with some real values, full [B, H, M, N]:
    # dBias must be 0 on the skipped tiles
    gen = torch.Generator().manual_seed(4)
    bias = torch.where(mp.document([130, 100, 70]), 0.0, float("-inf"))[None, None].repeat(2, 2, 1, 1)
    bias[:, :, :140, :130] += torch.randn(2, 2, 140, 130, generator=gen)
    run_sparse(bias=bias, b=2, causal=causal)


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernels_finite_fill_fully_masked_rows(causal):
    # finite fill: a fully masked row averages every key, EMPTY blocks included (they are walked)
    mask = mp.document([128, 100, 72]).clone()
    mask[5, :] = False
    mask[200, :] = False
    run_sparse(mask=mask[None, None], mask_value=F32_MIN, causal=causal)


@needs_interpreter
def test_kernels_skip_empty_blocks():
    # NaN values in keys that only EMPTY blocks hold cannot reach the rows that skip them
    from flashfuse.kernels import triton_attention

    mask = mp.document([128, 128, 44])[None, None]
    q, k, v = (torch.randn(1, 1, 300, 16) for _ in range(3))
    v[..., 256:, :] = float("nan")
    out, _, _ = triton_attention.attention_forward(q, k, v, None, mask, 0.25, False, 0.0, None, 1, float("-inf"))
    assert out[..., :256, :].isfinite().all() and out[..., 256:, :].isnan().all()


def _layout_case(seed=0, hq=4, m=300, n=270):
    g = torch.Generator().manual_seed(seed)
    mb, nb = -(-m // 128), -(-n // 128)
    layout = torch.rand(hq, mb, nb, generator=g) < 0.5
    layout[:, torch.arange(min(mb, nb)), torch.arange(min(mb, nb))] = True  # no query block left empty
    dense = layout.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :m, :n][None]
    return layout, dense


@pytest.mark.parametrize("kernel", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_block_sparse_attention_explicit_layout(kernel):
    import flashfuse

    layout, dense = _layout_case()
    gen = torch.Generator().manual_seed(9)
    dt = torch.float64 if kernel == "reference" else torch.float32
    q = torch.randn(2, 4, 300, 16, generator=gen, dtype=dt, requires_grad=True)
    k, v = (torch.randn(2, 2, 270, 16, generator=gen, dtype=dt, requires_grad=True) for _ in range(2))
    out = flashfuse.block_sparse_attention(q, k, v, layout, gqa_group=2, kernel=kernel)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = oracle.attention(qd, kd, vd, mask=dense, gqa_group=2)
    assert _rel(out, ref) < 1e-5
    dout = torch.randn(out.shape, generator=gen, dtype=dt)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    for g_, w in zip(got, want):
        assert _rel(g_, w) < 1e-5


@needs_interpreter
def test_kernels_layout_with_mask_and_causal():
    # explicit layout combined with a mask and the causal flag: skip what any of them says
    from flashfuse.block_sparse_api import layout_summary

    layout, dense = _layout_case(seed=2, hq=2, m=300, n=300)
    mask = mp.sliding_window(300, 300, window=200, causal_=False)[None, None]
    run_sparse(mask=mask, layout=layout_summary(layout, 1, 2, 300, 300), dense=dense, causal=True)


def test_block_sparse_attention_rejects_bad_layouts():
    import flashfuse

    q = k = v = torch.randn(1, 2, 200, 8)
    with pytest.raises(ValueError):
        flashfuse.block_sparse_attention(q, k, v, torch.ones(3, 2, dtype=torch.bool), kernel="reference")
    with pytest.raises(TypeError):
        flashfuse.block_sparse_attention(q, k, v, torch.ones(2, 2), kernel="reference")


def test_kernel_lists_structure(monkeypatch):
    # causal sliding window over 3 x 3 sparse blocks (ragged last): the lists leave the diagonal
    # and ragged blocks to the kernels' tail and never list a block above the diagonal
    keep = mp.sliding_window(300, 300, window=100)[None, None]
    lists = bs.kernel_lists(None, keep, None, 128, 300, 300, causal=True, finite_fill=False)
    assert lists.kv.shape == (1, 1, 3, 2 + 3 * 3) and lists.q.shape == (1, 1, 3, 2 + 3 * 3)
    kv = lists.kv[0, 0]
    assert kv[:, :2].tolist() == [[0, 0], [1, 0], [1, 0]]  # row 1: block 0 partial; row 2: block 1 (block 2 is the tail)
    assert kv[1, 2] == 0 and kv[2, 2] == 1
    assert kv[:, 8:].tolist() == [[2, 0, 0], [2, 2, 0], [0, 2, 2]]  # statuses (above the diagonal EMPTY)
    q = lists.q[0, 0]
    assert q[:, :2].tolist() == [[1, 0], [0, 0], [0, 0]]  # column 0: row 1; rows 2 is ragged (tail)
    # with the opt-in cache: reused while the mask is unchanged; without it: rebuilt each call
    assert bs.kernel_lists(None, keep, None, 128, 300, 300, causal=True, finite_fill=False) is not lists
    monkeypatch.setenv(bs.CACHE_ENV, "1")
    cached = bs.kernel_lists(None, keep, None, 128, 300, 300, causal=True, finite_fill=False)
    assert bs.kernel_lists(None, keep, None, 128, 300, 300, causal=True, finite_fill=False) is cached


def test_cache_hits_for_fresh_views_of_one_mask(monkeypatch):
    # The rewrite (and users) pass `keep[None, None]`: a new view object each call, same memory.
    monkeypatch.setenv(bs.CACHE_ENV, "1")
    bs.cache.clear()
    keep = mp.causal(64, 64)
    bs.cache.get(keep[None, None], BM, BN)
    bs.cache.get(keep[None, None], BM, BN)
    assert (bs.cache.hits, bs.cache.misses) == (1, 1)
    keep[0, 1] = True  # the base changes: every view's version counter moves with it
    bs.cache.get(keep[None, None], BM, BN)
    assert bs.cache.misses == 2


def test_no_cache_by_default_so_unversioned_writes_are_seen(monkeypatch):
    # Compiled graphs write buffers without moving version counters (Inductor reuses a dead
    # mask's buffer for the next mask). `.data` writes do the same here: outside eager
    # flashfuse.attention calls (the op as compiled graphs call it) the summary must follow.
    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    assert not bs.caching()
    bs.cache.clear()
    keep = mp.causal(64, 64)[None, None].clone()
    first = bs.cache.get(keep, BM, BN)
    keep.data.fill_(False)
    second = bs.cache.get(keep, BM, BN)
    assert bs.cache.hits == 0
    assert (first != bs.EMPTY).any() and (second == bs.EMPTY).all()


# -- the Triton list kernels (block_lists_triton) against the torch oracle, element for element --

def _torch_lists(t, block, m, n, causal, finite_fill):
    summary = bs.summarize(t, block, block)
    if finite_fill:
        summary = bs._demote_empty(summary)
    return bs.pack_lists(summary, block, m, n, causal)


LIST_CASES = {
    # name: (tensor builder, M, N); the block is 32 so small tensors span several blocks
    "sliding_window": (lambda: mp.sliding_window(130, 130, window=40)[None, None], 130, 130),
    "document": (lambda: mp.document([30, 50, 1, 49])[None, None], 130, 130),
    "prefix_lm": (lambda: mp.prefix_lm(97, 97, prefix=33)[None, None], 97, 97),
    "random_blocks_cross": (lambda: mp.random_blocks(70, 161, 32, 32, density=0.4, seed=4)[None, None], 70, 161),
    "padding_rows_bcast": (lambda: mp.padding([5, 64, 33], 70), 45, 70),                # [B, 1, 1, N]
    "expanded_heads": (lambda: mp.document([40, 60])[None, None].expand(2, 3, 100, 100), 100, 100),
    "per_head_random": (lambda: torch.rand(2, 3, 64, 96) > 0.97, 64, 96),
    "bias_neg_inf_blocks": (lambda: _bias_with_blocks(), 90, 100),
    "bias_row_bcast": (lambda: _bias_with_blocks()[:, :, :1], 90, 100),
    "wide_random": (lambda: torch.rand(1, 2, 40, 600) > 0.995, 40, 600),  # 19 key blocks: several summary programs per row
}


def _bias_with_blocks():
    bias = torch.randn(1, 2, 90, 100).to(torch.bfloat16)
    bias[:, :, :, 64:] = float("-inf")   # EMPTY key blocks
    bias[:, 0, :32, :32] = 0.0           # one FULL tile
    bias[:, 1, 40:, :] = float("-inf")   # fully masked rows in head 1
    return bias


@pytest.mark.parametrize("finite_fill", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(LIST_CASES))
def test_triton_kernel_lists_match_torch(name, causal, finite_fill):
    build, m, n = LIST_CASES[name]
    t = build()
    if causal and m != n:
        pytest.skip("causal lists are square here")
    want = _torch_lists(t, 32, m, n, causal, finite_fill)
    got = bs._kernel_lists_triton(t, 32, m, n, causal, finite_fill)
    torch.testing.assert_close(got.summary, want.summary, rtol=0, atol=0)
    torch.testing.assert_close(got.kv, want.kv, rtol=0, atol=0)
    torch.testing.assert_close(got.q, want.q, rtol=0, atol=0)
    assert got.density == pytest.approx(want.density)


def _brute_intervals(keep: torch.Tensor) -> bool:
    # every row's kept keys form one run (or none)
    for row in keep.reshape(-1, keep.shape[-1]):
        idx = row.nonzero().flatten()
        if len(idx) and idx[-1] - idx[0] + 1 != len(idx):
            return False
    return True


@pytest.mark.parametrize("name", sorted(n for n in LIST_CASES if not n.startswith("bias")))
def test_summary_kernel_row_stats_match_torch(name):
    # The ROW_STATS pass of the summary kernel (one read of the mask, atomics across the programs
    # of a row) against the torch oracle; row_ranges says "intervals" exactly when every row is one.
    build, m, n = LIST_CASES[name]
    t = build()
    got = bs._kernel_lists_triton(t, 32, m, n, False, False, row_stats=True)
    collapsed = bs._collapse_expanded(t)
    torch.testing.assert_close(got.row_stats, bs.row_stats(collapsed), rtol=0, atol=0)
    if collapsed.shape[2] == 1:
        assert got.col_stats is None  # a row-broadcast mask: its columns say nothing about M rows
    else:
        torch.testing.assert_close(got.col_stats, bs.row_stats(collapsed.transpose(-2, -1)), rtol=0, atol=0)
    for stats, lines in ((got.row_stats, collapsed), (got.col_stats, collapsed.transpose(-2, -1))):
        if stats is None:
            continue
        ranges, is_ranges = bs.row_ranges(stats)
        assert bool(is_ranges) == _brute_intervals(lines)
        if is_ranges:
            j = torch.arange(lines.shape[-1])
            assert torch.equal((j >= ranges[..., :1]) & (j < ranges[..., 1:]), lines)


def test_row_ranges_of_rows_that_are_not_one_interval():
    keep = torch.zeros(1, 1, 3, 10, dtype=torch.bool)
    keep[0, 0, 0, 2:5] = True                  # one run
    keep[0, 0, 2, [1, 7]] = True               # two runs: not an interval
    ranges, is_ranges = bs.row_ranges(bs.row_stats(keep))
    assert not bool(is_ranges)
    assert ranges[0, 0, :2].tolist() == [[2, 5], [0, 0]]  # an empty row is the empty interval
    keep[0, 0, 2] = False
    assert bool(bs.row_ranges(bs.row_stats(keep))[1])


# name -> (mask, kwargs of flashfuse.attention, (every row keeps one interval of keys, every
# column one interval of queries)); a row-broadcast mask gets no column ranges
RANGE_CASES = {
    "sliding_window_causal": lambda: (mp.sliding_window(300, 300, window=100)[None, None], dict(causal=True), (True, True)),
    "sliding_window_bidirectional": lambda: (mp.sliding_window(300, 300, window=70, causal_=False)[None, None], {}, (True, True)),
    "document_unaligned_dropout": lambda: (mp.document([100, 150, 50])[None, None], dict(dropout_p=0.2), (True, True)),
    "prefix_lm_finite_fill": lambda: (mp.prefix_lm(300, 300, prefix=140)[None, None], dict(mask_value=-1e4), (True, True)),
    "padding_rows_bcast": lambda: (mp.padding([300, 129], 300), {}, (True, False)),
    "per_head_gqa": lambda: (torch.stack([mp.sliding_window(300, 300, window=60), mp.document([128, 100, 72]),
                                          mp.prefix_lm(300, 300, prefix=70), mp.causal(300, 300)])[None], dict(gqa_group=2),
                             (True, True)),
    "empty_rows": lambda: (_empty_rows_mask(), {}, (True, False)),
    "empty_rows_finite_fill": lambda: (_empty_rows_mask(), dict(mask_value=F32_MIN), (True, False)),
    "columns_only": lambda: (_empty_rows_mask().transpose(-2, -1), {}, (False, True)),
    "per_batch_documents": lambda: (torch.stack([mp.document([100, 200]), mp.document([37, 130, 133])])[:, None], {}, (True, True)),
    "expanded_heads": lambda: (mp.sliding_window(300, 300, window=90)[None, None].expand(1, 2, 300, 300), dict(causal=True), (True, True)),
    "cross_200x300_prefix": lambda: (mp.prefix_lm(200, 300, prefix=150)[None, None], {}, (True, True)),
    "dilated": lambda: (mp.dilated(300, 300, stride=3)[None, None], {}, (False, False)),
    "random_elements": lambda: (torch.rand(1, 1, 300, 300, generator=torch.Generator().manual_seed(2)) > 0.3, {}, (False, False)),
}


def _empty_rows_mask():
    keep = mp.sliding_window(300, 300, window=40, causal_=False).clone()
    keep[130:140] = False  # rows that see no key: NaN with -inf fill, a uniform average with a finite one
    return keep[None, None]


@needs_interpreter
@pytest.mark.parametrize("name", sorted(RANGE_CASES))
def test_eager_calls_compute_interval_masks_from_row_ranges(monkeypatch, name):
    # Eager calls whose mask keeps one interval of keys per row (and has PARTIAL blocks) pass
    # the forward and dQ the rows' (lo, hi) instead of the mask (MASK_RANGES), and dK/dV the
    # columns' query intervals (COL_RANGES) when every column is one: all match the oracle, as
    # do the masks that are not intervals (loaded as before).
    import flashfuse
    from flashfuse.kernels import philox

    monkeypatch.setenv("FLASHFUSE_STRICT", "1")  # a failing kernel must fail here, not fall back
    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    launched = _spy(monkeypatch, launch, "launch", lambda kind, *a, **kw: (kind, kw.get("MASK_RANGES", kw.get("COL_RANGES"))))
    bs.kernel_list_cache.clear()
    mask, kw, (rows, cols) = RANGE_CASES[name]()
    b, group, p = mask.shape[0], kw.get("gqa_group", 1), kw.get("dropout_p", 0.0)
    hq = mask.shape[1] if mask.shape[1] > 1 else 2
    m, n = (mask.shape[2] if mask.shape[2] > 1 else 300), mask.shape[3]
    gen = torch.Generator().manual_seed(len(name) + 7)
    q = torch.randn(b, hq, m, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(b, hq // group, n, 16, generator=gen, requires_grad=True) for _ in range(2))
    torch.manual_seed(3)  # the op draws its dropout seed from the global generator
    out = flashfuse.attention(q, k, v, mask=mask, kernel="triton", **kw)
    dout = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), dout)
    # the attention kernels' launches (the list kernels' go through `launch` too on their first call)
    flags = {kind: flag for kind, flag in launched if kind in ("fwd", "bwd_dkdv", "bwd_dq")}
    assert flags == {"fwd": rows, "bwd_dkdv": cols, "bwd_dq": rows}, launched
    torch.manual_seed(3)
    seed = int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64))
    keep = philox.keep_mask(seed, p, b, hq, m, n) if p > 0 else None
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = oracle.attention(*leaves, None, mask, 16 ** -0.5, kw.get("causal", False), p, seed, group,
                              kw.get("mask_value", float("-inf")), keep=keep)
    want = torch.autograd.grad(ref, leaves, dout.double().nan_to_num())
    assert _rel(out, ref) < 1e-5
    for g_, w in zip(got, want):
        assert _rel(g_, w) < 1e-5


@needs_interpreter
def test_row_ranges_can_be_switched_off(monkeypatch):
    # FLASHFUSE_MASK_RANGES=0: the same interval mask is loaded (and the cached lists follow the switch)
    import flashfuse

    monkeypatch.setenv("FLASHFUSE_STRICT", "1")
    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    launched = _spy(monkeypatch, launch, "launch", lambda kind, *a, **kw: (kind, kw.get("MASK_RANGES"), kw.get("HAS_MASK")))
    bs.kernel_list_cache.clear()
    keep = mp.sliding_window(300, 300, window=70)[None, None]
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=gen) for _ in range(3))
    outs = {}
    for env in ("1", "0", "1"):
        monkeypatch.setenv(bs.RANGES_ENV, env)
        launched.clear()
        outs[env] = flashfuse.attention(q, k, v, mask=keep, kernel="triton")
        assert launched == [("fwd", env == "1", True)]
    ref, _ = oracle.attention(q.double(), k.double(), v.double(), mask=keep)
    assert _rel(outs["0"], ref) < 1e-5 and _rel(outs["1"], ref) < 1e-5


def test_kernel_lists_take_the_triton_path_under_the_interpreter(monkeypatch):
    # kernel_lists (what the attention launchers call) must use the list kernels, not the torch ops
    calls = []
    real = bs._kernel_lists_triton
    monkeypatch.setattr(bs, "_kernel_lists_triton", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    keep = mp.sliding_window(100, 100, window=30)[None, None]
    got = bs.kernel_lists(None, keep, None, 32, 100, 100, causal=True, finite_fill=False)
    assert len(calls) == 1
    want = _torch_lists(keep, 32, 100, 100, True, False)
    torch.testing.assert_close(got.kv, want.kv, rtol=0, atol=0)


def test_eager_calls_cache_lists_until_the_mask_changes(monkeypatch):
    # flashfuse.attention run eagerly: one mask shared by "every layer" is summarized once, an
    # in-place write (version counter) makes the next call summarize again, and the output
    # follows the new mask. FLASHFUSE_MASK_CACHE=0 turns the cache off.
    import flashfuse

    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    bs.kernel_list_cache.clear()
    builds = _spy(monkeypatch, bs, "_kernel_lists_triton")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=gen) for _ in range(3))
    keep = mp.sliding_window(100, 100, window=30)[None, None].clone()
    for _ in range(3):
        out = flashfuse.attention(q, k, v, mask=keep, kernel="triton")
    assert len(builds) == 1
    keep[..., :50, :] = True  # an in-place write: version counter moves
    out = flashfuse.attention(q, k, v, mask=keep, kernel="triton")
    assert len(builds) == 2
    want, _ = oracle.attention(q.double(), k.double(), v.double(), None, keep, 16 ** -0.5, False)
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)
    monkeypatch.setenv(bs.CACHE_ENV, "0")
    flashfuse.attention(q, k, v, mask=keep, kernel="triton")
    assert len(builds) == 3


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_eager_calls_drop_a_mask_the_lists_describe(monkeypatch, causal):
    # A mask with no partially masked block says nothing the lists do not: eager calls (cached
    # lists) run the kernels without it (HAS_MASK=False), forward and backward, with the same
    # result. Partial blocks, or no cache (compiled graphs; FLASHFUSE_MASK_CACHE=0), keep it.
    import flashfuse

    launched = _spy(monkeypatch, launch, "launch", lambda kind, *a, **kw: (kind, kw.get("HAS_MASK")))
    bs.kernel_list_cache.clear()
    gen = torch.Generator().manual_seed(5)
    aligned = mp.document([128, 128, 44])[None, None]  # every 128 x 128 block is all kept or all masked
    partial = mp.document([100, 156, 44])[None, None]
    for keep, env, has_mask in ((aligned, None, False), (partial, None, True), (aligned, "0", True)):
        if env is None:
            monkeypatch.delenv(bs.CACHE_ENV, raising=False)
        else:
            monkeypatch.setenv(bs.CACHE_ENV, env)
        launched.clear()
        q, k, v = (torch.randn(1, 2, 300, 16, generator=gen, requires_grad=True) for _ in range(3))
        out = flashfuse.attention(q, k, v, mask=keep, causal=causal, kernel="triton")
        dout = torch.randn(out.shape, generator=gen)
        got = torch.autograd.grad(out, (q, k, v), dout)
        _check_against_oracle(q, k, v, keep, out, dout, got, causal)
        kinds = {kind for kind, flag in launched if flag is not None}
        assert kinds == {"fwd", "bwd_dkdv", "bwd_dq"}, launched
        assert all(flag is has_mask for _, flag in launched if flag is not None), (env, launched)


@needs_interpreter
def test_eager_backward_reuses_the_forward_lists(monkeypatch):
    # An eager fwd+bwd with a cached mask looks its lists up once: the forward hands them and its
    # plan key to the backward (triton_attention's `reuse`). Uncached calls (FLASHFUSE_MASK_CACHE=0)
    # build them in each pass, as before. Gradients match the oracle either way, and a backward
    # whose dout is laid out differently gets a plan of its own (launch.audit would refuse a
    # plan whose launches were made for another layout).
    import flashfuse
    from flashfuse.kernels import triton_attention

    bs.kernel_list_cache.clear()
    lookups = _spy(monkeypatch, triton_attention, "_lists")
    gen = torch.Generator().manual_seed(11)
    keep = mp.document([50, 90, 60])[None, None]
    for env, want_lookups in ((None, 1), ("0", 2)):
        if env is None:
            monkeypatch.delenv(bs.CACHE_ENV, raising=False)
        else:
            monkeypatch.setenv(bs.CACHE_ENV, env)
        for dout_layout in ("dense", "transposed"):
            lookups.clear()
            q, k, v = (torch.randn(1, 2, 200, 16, generator=gen, requires_grad=True) for _ in range(3))
            out = flashfuse.attention(q, k, v, mask=keep, kernel="triton")
            dout = torch.randn(out.shape, generator=gen)
            if dout_layout == "transposed":
                dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
            plans = len(triton_attention._plans)
            got = torch.autograd.grad(out, (q, k, v), dout)
            assert len(lookups) == want_lookups, (env, dout_layout)
            if dout_layout == "transposed" and env is None:
                assert len(triton_attention._plans) == plans + 1  # a new backward signature
            _check_against_oracle(q, k, v, keep, out, dout, got, what=(env, dout_layout))


@needs_interpreter
@pytest.mark.kernel_fallback
def test_a_forward_that_falls_back_hands_nothing_to_its_backward(monkeypatch):
    # A Triton forward that raises falls back to the reference kernel, whose outputs the
    # forward's plan key does not describe: its backward must build its own key (and look its
    # lists up again) rather than reuse the failed forward's, and still match the oracle.
    import flashfuse
    from flashfuse.kernels import triton_attention

    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    bs.kernel_list_cache.clear()
    real_plan = triton_attention._plan

    def failing_forward(key, build):
        plan = real_plan(key, build)
        if key[0] != "fwd":
            return plan

        def boom(*tensors):
            raise RuntimeError("injected forward launch failure")
        return boom

    monkeypatch.setattr(triton_attention, "_plan", failing_forward)
    lookups = _spy(monkeypatch, triton_attention, "_lists")
    gen = torch.Generator().manual_seed(13)
    keep = mp.document([50, 90, 60])[None, None]
    q, k, v = (torch.randn(1, 2, 200, 16, generator=gen, requires_grad=True) for _ in range(3))
    out = flashfuse.attention(q, k, v, mask=keep, kernel="triton")
    dout = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert len(lookups) == 2  # the failed forward's and the backward's own
    _check_against_oracle(q, k, v, keep, out, dout, got)


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_cached_lists_count_their_blocks_for_the_backward(monkeypatch, causal):
    # Cached lists learn how many blocks they hold (in the one sync per cached mask), and the
    # backward sizes its work from that count (triton_attention.backward_work decides whether dQ
    # runs beside dK/dV); uncached lists have no count, and the work is then the dense one.
    from flashfuse.kernels import triton_attention as ta

    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    bs.kernel_list_cache.clear()
    keep = mp.document([100, 156, 44])[None, None]  # 300 x 300: 3 x 3 blocks of 128
    with bs.eager_call():
        lists = bs.kernel_lists(None, keep, None, 128, 300, 300, causal=causal, finite_fill=False)
    summary = bs.summarize(keep, 128, 128)[0, 0]
    r = torch.arange(3)[:, None]
    c = torch.arange(3)[None, :]
    # the lists hold non-EMPTY blocks before each row's tail block: c < min(r, N // 128) if causal, else c < N // 128
    in_lists = (c < torch.clamp(r, max=300 // 128)) if causal else (c < 300 // 128)
    want = int(((summary != bs.EMPTY) & in_lists).sum())
    assert lists.listed == want > 0
    assert ta.backward_work((2, 4, 300, 64), 300, lists, causal) == (want + 3) * 2 * 4 * 64
    uncached = bs.kernel_lists(None, keep, None, 128, 300, 300, causal=causal, finite_fill=False)  # no eager_call: not cached
    assert uncached.listed is None
    dense = 2 * 4 * 3 * 3 * 64
    assert ta.backward_work((2, 4, 300, 64), 300, uncached, causal) == (dense // 2 if causal else dense)
    assert ta.backward_work((2, 4, 300, 64), 300, None, False) == dense


@needs_interpreter
def test_block_sparse_attention_caches_the_layout_summary(monkeypatch):
    # Eager calls with one layout build its lists once; an in-place change to the layout is seen.
    import flashfuse

    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    bs.kernel_list_cache.clear()
    builds = _spy(monkeypatch, bs, "_pack_lists_triton")
    layout, dense = _layout_case(seed=4, hq=2, m=300, n=300)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=gen) for _ in range(3))
    for _ in range(3):
        out = flashfuse.block_sparse_attention(q, k, v, layout, kernel="triton")
    assert len(builds) == 1
    layout[:, 2, 0] = ~layout[:, 2, 0]  # in place: the version counter moves
    dense = layout.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :300, :300][None]
    out = flashfuse.block_sparse_attention(q, k, v, layout, kernel="triton")
    assert len(builds) == 2
    ref, _ = oracle.attention(q.double(), k.double(), v.double(), mask=dense)
    assert _rel(out, ref) < 1e-5


def _aligned_doc():
    return mp.document([128, 128, 44])[None, None]


def _hidden_partial():
    # partial mask blocks only where the bias is -inf everywhere (an EMPTY bias block)
    bias = torch.zeros(1, 2, 300, 300)
    bias[..., :128, 128:256] = float("-inf")
    keep = torch.ones(1, 1, 300, 300, dtype=torch.bool)
    keep[..., :128, 128:200] = False
    return keep, bias


# name -> (mask, kwargs of flashfuse.attention): cases where dropping the mask is allowed or
# must not happen; the result must match the oracle either way.
DROP_CASES = {
    "all_kept_finite_fill": lambda: (torch.ones(1, 1, 300, 300, dtype=torch.bool), dict(mask_value=-1e4)),
    "aligned_doc_dropout": lambda: (_aligned_doc(), dict(dropout_p=0.2)),
    "aligned_doc_gqa_causal": lambda: (_aligned_doc(), dict(causal=True, gqa_group=2)),
    "padding_b11n_causal": lambda: (mp.padding([256, 300], 300), dict(causal=True)),
    "bias_hides_partial": lambda: (_hidden_partial()[0], dict(bias=_hidden_partial()[1])),
    "bias_hides_partial_finite": lambda: (_hidden_partial()[0], dict(bias=_hidden_partial()[1], mask_value=-1e4)),
}


@needs_interpreter
@pytest.mark.parametrize("name", sorted(DROP_CASES))
def test_mask_drop_matches_the_oracle(monkeypatch, name):
    # Same results with the list cache on (the mask may be dropped) and off (never dropped).
    import flashfuse
    from flashfuse.kernels import philox

    mask, kw = DROP_CASES[name]()
    b = mask.shape[0]
    group = kw.get("gqa_group", 1)
    gen = torch.Generator().manual_seed(len(name))
    q = torch.randn(b, 2 * group, 300, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(b, 2, 300, 16, generator=gen, requires_grad=True) for _ in range(2))
    bias = kw.get("bias")
    bias = bias.clone().requires_grad_() if bias is not None else None
    dout = torch.randn(q.shape, generator=gen)
    p = kw.get("dropout_p", 0.0)
    got = {}
    for env in (None, "0"):
        if env is None:
            monkeypatch.delenv(bs.CACHE_ENV, raising=False)
        else:
            monkeypatch.setenv(bs.CACHE_ENV, env)
        bs.kernel_list_cache.clear()
        torch.manual_seed(3)  # the op draws its dropout seed from the global generator
        out = flashfuse.attention(q, k, v, bias=bias, mask=mask, kernel="triton", **{k_: v_ for k_, v_ in kw.items() if k_ != "bias"})
        leaves = (q, k, v) + ((bias,) if bias is not None else ())
        got[env] = (out, torch.autograd.grad(out, leaves, dout))
    torch.manual_seed(3)
    seed = int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64))
    keep = philox.keep_mask(seed, p, b, 2 * group, 300, 300) if p > 0 else None
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v) + ((bias,) if bias is not None else ())]
    bd = leaves[3] if bias is not None else None
    ref, _ = oracle.attention(*leaves[:3], bd, mask, 16 ** -0.5, kw.get("causal", False), p, seed, group,
                              kw.get("mask_value", float("-inf")), keep=keep)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for env, (out, grads) in got.items():
        assert _rel(out, ref) < 1e-5, (env, _rel(out, ref))
        for g_, w in zip(grads, want):
            assert _rel(g_, w) < 1e-5, (env, _rel(g_, w))


@needs_interpreter
def test_inference_mode_masks_and_layouts_use_the_kernels_uncached(monkeypatch):
    # Inference tensors have no version counter: no cache key, so no caching, but the Triton
    # kernels still run (they used to fall back to the reference kernel on the key's error).
    import flashfuse

    launched = _spy(monkeypatch, launch, "launch", lambda kind, *a, **kw: kind)
    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=gen) for _ in range(3))
    layout, dense = _layout_case(seed=1, hq=2, m=300, n=300)
    with torch.inference_mode():
        keep = mp.sliding_window(300, 300, window=50)[None, None]
        lay = layout.clone()
        out_mask = flashfuse.attention(q, k, v, mask=keep, kernel="triton")
        out_lay = flashfuse.block_sparse_attention(q, k, v, lay, kernel="triton")
    assert launched.count("fwd") == 2
    ref_mask, _ = oracle.attention(q.double(), k.double(), v.double(), mask=keep)
    ref_lay, _ = oracle.attention(q.double(), k.double(), v.double(), mask=dense)
    assert _rel(out_mask, ref_mask) < 1e-5 and _rel(out_lay, ref_lay) < 1e-5
