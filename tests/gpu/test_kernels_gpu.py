"""The Triton attention kernels on CUDA at real sizes, against torch references.

bf16 / fp16 inputs are checked against the eager oracle run in fp32 on the same (rounded)
inputs, fp32 inputs (exact "ieee" dots) against the oracle in fp64. Errors are
||x - ref|| / ||ref||. Autotuning is switched off (FLASHFUSE_AUTOTUNE=0: the first config that
fits runs) so the file compiles one config per kernel variant; set FLASHFUSE_GPU_SWEEP=1 to also
run every forward config of one shape. Run: pytest -q tests/gpu/test_kernels_gpu.py
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 runs the CPU interpreter; these tests need the GPU compiler", allow_module_level=True)
triton = pytest.importorskip("triton")

from flashfuse import mask_patterns as mp  # noqa: E402
from flashfuse.block_sparse_api import layout_summary  # noqa: E402
from flashfuse.kernels import block_sparse as bs, configs, philox, render, triton_attention  # noqa: E402

try:
    import oracle
    from philox_kernel import triton_keep_mask
except ImportError:  # pragma: no cover
    from tests import oracle
    from tests.philox_kernel import triton_keep_mask

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
F32_MIN = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    monkeypatch.setenv("FLASHFUSE_AUTOTUNE", "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def rel_err(x, ref):
    x = x.detach().to(ref.dtype)
    ref = ref.detach()
    assert torch.equal(torch.isnan(x), torch.isnan(ref)), "NaN pattern differs from eager"
    fin = torch.isfinite(ref)
    return ((x[fin] - ref[fin]).norm() / ref[fin].norm()).item()


def run_case(dtype, b=2, hq=8, group=1, m=1000, n=1000, d=64, causal=False, bias_shape=None, mask_shape=None,
             mask_value=float("-inf"), dropout_p=0.0, layout="contiguous", backward=True, mask=None, block_layout=None,
             dense=None, draw=0, eager=False):
    """mask: a given keep-mask instead of a random one of mask_shape; block_layout: the op's int8
    block summary, with dense its element mask for the oracle; draw: another set of random inputs.
    layout: "contiguous", "bnhd" (q, k, v transposed views) or "offset" (q, k, v start 2 bytes
    past a 16-byte boundary, so Triton compiles them without its pointer-alignment assumption)."""
    gen = torch.Generator(device=DEV).manual_seed(1000 * d + n + m + 7919 * draw)
    hkv = hq // group

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)

    if layout == "bnhd":
        q, k, v = randn(b, m, hq, d).transpose(1, 2), randn(b, n, hkv, d).transpose(1, 2), randn(b, n, hkv, d).transpose(1, 2)
    elif layout == "offset":
        def randn_offset(shape):
            return randn(shape.numel() + 1)[1:].view(shape)

        q, k, v = randn_offset(torch.Size((b, hq, m, d))), randn_offset(torch.Size((b, hkv, n, d))), randn_offset(torch.Size((b, hkv, n, d)))
        assert q.data_ptr() % 16 != 0
    else:
        q, k, v = randn(b, hq, m, d), randn(b, hkv, n, d), randn(b, hkv, n, d)
    bias = randn(*bias_shape) if bias_shape is not None else None
    if mask is not None:
        mask = mask.to(DEV)
    elif mask_shape is not None:
        mask = torch.rand(*mask_shape, generator=gen, device=DEV) > 0.2
        mask[..., 0] = True
        if mask_value != float("-inf") and mask_shape[-2] > 1:
            mask[..., 7, :] = False  # a fully masked row (finite fill: a uniform average)
    seed = torch.tensor([424242], dtype=torch.int64, device=DEV)
    scale = d ** -0.5

    # eager: launch as flashfuse.attention's eager calls do (cached lists, mask drop, row ranges)
    context = bs.eager_call if eager else contextlib.nullcontext
    with context():
        out, m_stat, log_l = triton_attention.attention_forward(q, k, v, bias, mask, scale, causal, dropout_p, seed, group, mask_value,
                                                                block_layout)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
    br = bias.detach().to(ref_dtype).requires_grad_() if bias is not None else None
    keep = philox.keep_mask(424242, dropout_p, b, hq, m, n, device=DEV) if dropout_p > 0 else None
    omask = mask if dense is None else (dense.to(DEV) if mask is None else mask & dense.to(DEV))
    ref, lse = oracle.attention(qr, kr, vr, br, omask, scale, causal, dropout_p, 424242, group, mask_value, keep=keep)
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    assert rel_err(m_stat.to(ref_dtype) + log_l.to(ref_dtype), lse) < 1e-5
    if not backward:
        return
    dout = randn(*out.shape)
    ref.backward(dout.to(ref_dtype))
    with context():
        dq, dk, dv, dbias = triton_attention.attention_backward(
            dout, q, k, v, bias, mask, out, m_stat, log_l, scale, causal, dropout_p, seed, group, mask_value, bias is not None,
            block_layout,
        )
    for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
    if bias is not None:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        assert rel_err(dbias, br.grad) < tol, ("dbias", rel_err(dbias, br.grad))


@pytest.mark.parametrize(
    "dtype,d,m,n,causal",
    [
        (torch.bfloat16, 64, 1000, 1000, True),
        (torch.bfloat16, 128, 4096, 4096, False),
        (torch.bfloat16, 128, 4096, 4096, True),
        (torch.bfloat16, 80, 512, 1000, True),
        (torch.bfloat16, 128, 512, 4096, False),
        (torch.float16, 64, 512, 512, False),
        (torch.float16, 128, 1000, 1000, True),
    ],
    ids=["bf16-D64-1000-causal", "bf16-D128-4096", "bf16-D128-4096-causal", "bf16-D80-cross-causal",
         "bf16-D128-cross", "fp16-D64-512", "fp16-D128-1000-causal"],
)
def test_plain(dtype, d, m, n, causal):
    run_case(dtype, d=d, m=m, n=n, causal=causal)


def test_fp32_ieee_mask_bias():
    run_case(torch.float32, b=2, hq=4, m=512, n=512, d=64, bias_shape=(2, 1, 1, 512), mask_shape=(2, 1, 1, 512))


def test_gqa_bias_finite_mask_bf16():
    run_case(torch.bfloat16, hq=8, group=2, m=1000, n=1000, d=80, causal=True,
             bias_shape=(1, 8, 1000, 1000), mask_shape=(2, 1, 1000, 1000), mask_value=F32_MIN)


def test_noncontiguous_bf16():
    run_case(torch.bfloat16, m=1000, n=1000, d=64, layout="bnhd", bias_shape=(2, 8, 1, 1000))


def test_direct_launch_repeats_and_misaligned_inputs():
    # flashfuse.kernels.launch: the first launch of an argument key autotunes, the second runs the
    # chosen config through Triton, later ones call the compiled kernel directly. Fresh inputs on
    # each call must all be right, and a misaligned q/k/v with the same sizes and strides must not
    # reuse the binary compiled for aligned pointers.
    from flashfuse.kernels import launch

    before = launch.stats["direct"]
    for draw in range(3):
        run_case(torch.bfloat16, b=1, hq=4, m=300, n=300, d=64, causal=True, mask_shape=(1, 1, 300, 300), draw=draw)
    assert launch.stats["direct"] >= before + 4  # third forward and third backward's three launches
    run_case(torch.bfloat16, b=1, hq=4, m=300, n=300, d=64, causal=True, mask_shape=(1, 1, 300, 300), layout="offset", draw=3)
    # Another batch size: a contiguous q has the same strides, so every kernel argument but the
    # pointers is equal; only the grid differs, and it must not be the remembered one.
    run_case(torch.bfloat16, b=3, hq=4, m=300, n=300, d=64, causal=True, mask_shape=(1, 1, 300, 300), draw=4)


def test_dropout_exact_mask_bf16():
    run_case(torch.bfloat16, m=1000, n=1000, d=64, causal=True, dropout_p=0.1)


def test_dropout_exact_mask_gqa_fp16():
    run_case(torch.float16, hq=8, group=4, m=512, n=1000, d=128, dropout_p=0.3, mask_shape=(2, 8, 512, 1000))


# -- block sparsity found from the mask, and an explicit layout, at N=4096 ----------------------------

SPARSE_PATTERNS = {
    "sliding_window-causal": (lambda: mp.sliding_window(4096, 4096, window=512), True),
    "document-causal": (lambda: mp.document([1000, 2000, 1096]), True),
    "prefix_lm": (lambda: mp.prefix_lm(4096, 4096, prefix=1000), False),
    "dilated": (lambda: mp.dilated(4096, 4096, stride=3), False),
    "random_blocks": (lambda: mp.random_blocks(4096, 4096, 128, 128, density=0.3, seed=1), False),
}


@pytest.mark.parametrize("name", sorted(SPARSE_PATTERNS))
def test_block_sparse_patterns_bf16(name):
    make, causal = SPARSE_PATTERNS[name]
    run_case(torch.bfloat16, b=1, hq=4, m=4096, n=4096, d=64, causal=causal, mask=make()[None, None])


# every row keeps one interval of keys, with PARTIAL blocks: eager calls compute the mask from row ranges
RANGE_PATTERNS = {
    "sliding_window-500": (lambda: mp.sliding_window(4096, 4096, window=500)[None, None], True, 0.0),
    "sliding_window-bidirectional-dropout": (lambda: mp.sliding_window(4096, 4096, window=300, causal_=False)[None, None], False, 0.1),
    "document-unaligned": (lambda: mp.document([1000, 2000, 1096])[None, None], False, 0.0),
    "prefix_lm": (lambda: mp.prefix_lm(4096, 4096, prefix=1000)[None, None], False, 0.0),
    "padding": (lambda: mp.padding([4000, 2500], 4096), True, 0.0),
}


@pytest.mark.parametrize("name", sorted(RANGE_PATTERNS))
def test_block_sparse_row_ranges_bf16(monkeypatch, name):
    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    bs.kernel_list_cache.clear()
    make, causal, p = RANGE_PATTERNS[name]
    mask = make()
    run_case(torch.bfloat16, b=mask.shape[0], hq=4, m=4096, n=4096, d=64, causal=causal, dropout_p=p, mask=mask, eager=True)
    cached = [value for _, value in bs.kernel_list_cache.entries.values()]
    # rows as ranges for the forward and dQ; columns for dK/dV, except a row-broadcast mask's
    assert cached and all(lists.ranges is not None and (lists.col_ranges is not None) == (mask.shape[2] > 1) for lists in cached)


def test_block_sparse_padding_bf16():
    run_case(torch.bfloat16, b=2, hq=4, m=4096, n=4096, d=64, mask=mp.padding([4096, 2500], 4096))


def test_block_sparse_ragged_document_bias_gqa_bf16():
    # 0 / -inf document bias with grad (EMPTY / FULL tiles, dBias zero on skipped ones), ragged N
    bias = torch.where(mp.document([1000, 1500, 1500]), 0.0, float("-inf"))[None, None].repeat(1, 8, 1, 1)
    gen = torch.Generator().manual_seed(3)
    bias[..., :1000, :1000] += 0.1 * torch.randn(1, 8, 1000, 1000, generator=gen)
    _run_bias_case(bias.to(DEV).to(torch.bfloat16))


def _run_bias_case(bias):
    """Causal GQA (group 2), D=128, a bias that requires grad; bf16 against the fp32 oracle."""
    b, hq, m, n = bias.shape
    gen = torch.Generator(device=DEV).manual_seed(7)
    q = torch.randn(b, hq, m, 128, generator=gen, device=DEV).to(torch.bfloat16)
    k, v = (torch.randn(b, hq // 2, n, 128, generator=gen, device=DEV).to(torch.bfloat16) for _ in range(2))
    scale = 128 ** -0.5
    args = (scale, True, 0.0, None, 2, float("-inf"))
    out, m_stat, log_l = triton_attention.attention_forward(q, k, v, bias, None, *args)
    qr, kr, vr, br = (t.detach().float().requires_grad_() for t in (q, k, v, bias))
    ref, _ = oracle.attention(qr, kr, vr, br, None, scale, True, gqa_group=2)
    assert rel_err(out, ref) < 1e-2
    dout = torch.randn(out.shape, generator=gen, device=DEV).to(torch.bfloat16)
    ref.backward(dout.float())
    grads = triton_attention.attention_backward(dout, q, k, v, bias, None, out, m_stat, log_l, *args, True)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, (qr.grad, kr.grad, vr.grad, br.grad)):
        assert rel_err(got, want) < 1e-2, (name, rel_err(got, want))


def test_block_sparse_explicit_layout_gqa_bf16():
    gen = torch.Generator().manual_seed(5)
    layout = torch.rand(8, 32, 32, generator=gen) < 0.25
    layout[:, torch.arange(32), torch.arange(32)] = True
    dense = layout.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :4096, :4096][None]
    run_case(torch.bfloat16, b=1, hq=8, group=2, m=4096, n=4096, d=64, dropout_p=0.1,
             block_layout=layout_summary(layout.to(DEV), 1, 8, 4096, 4096), dense=dense)


@pytest.mark.parametrize("name", sorted(SPARSE_PATTERNS))
def test_block_lists_kernels_match_torch(name):
    # the launchers' GPU list kernels against block_sparse's torch ops, bit for bit, at N=4096

    make, causal = SPARSE_PATTERNS[name]
    keep = make()[None, None].to(DEV)
    bias = torch.where(keep, 0.0, float("-inf")).to(torch.bfloat16).expand(2, 4, -1, -1)  # stride-0 broadcast
    for t, finite in ((keep, False), (keep, True), (bias, False)):
        got = bs._kernel_lists_triton(t, 128, 4096, 4096, causal, finite)
        summary = bs.summarize(t, 128, 128)
        want = bs.pack_lists(bs._demote_empty(summary) if finite else summary, 128, 4096, 4096, causal)
        for a, b in ((got.summary, want.summary), (got.kv, want.kv), (got.q, want.q)):
            assert torch.equal(a, b), name


def test_block_lists_kernels_int64_offsets():
    # a mask view whose row offsets pass 2^31 elements (4096 rows x 2^20 + 128 stride): the
    # summary kernel must address it with 64-bit offsets (int32 ones crashed at N=64K)

    big = torch.zeros(4096, 2**20 + 128, dtype=torch.bool, device=DEV)
    keep = big[:, :4096]
    keep.copy_(mp.sliding_window(4096, 4096, window=300).to(DEV))
    keep4 = keep[None, None]
    got = bs._kernel_lists_triton(keep4, 128, 4096, 4096, True, False)
    want = bs.pack_lists(bs.summarize(keep4, 128, 128), 128, 4096, 4096, True)
    assert torch.equal(got.kv, want.kv) and torch.equal(got.q, want.q)
    del big


# -- Philox bit-exactness at size ---------------------------------------------------------------

@pytest.mark.parametrize("seed", [3, 2**33 + 11, -77])
def test_philox_bit_exact_large(seed):
    b, h, m, n, p = 2, 8, 1000, 1000, 0.3
    got = triton_keep_mask(seed, p, b, h, m, n, block_m=64, block_n=64, device=DEV)
    want = philox.keep_mask(seed, p, b, h, m, n, device=DEV)
    assert torch.equal(got, want)
    rate = want.double().mean().item()
    assert abs(rate - philox.keep_probability(p)) < 4 * (p * (1 - p) / want.numel()) ** 0.5


def test_cuda_graph_replays_prepared_launches_with_new_inputs(monkeypatch):
    # A masked eager call captured in a CUDA graph: the capture runs the plan's prepared launches
    # (their direct entries, on the capture stream) and the mask's summary kernels; each replay
    # must compute the attention of the inputs copied into the static buffers, mask included.
    # FLASHFUSE_MASK_CACHE=0: the warm-up calls take the uncached path a capture takes.
    import flashfuse
    from flashfuse.kernels import launch

    monkeypatch.setenv(bs.CACHE_ENV, "0")
    gen = torch.Generator(device=DEV).manual_seed(11)
    q, k, v = (torch.randn(1, 4, 1000, 64, device=DEV, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    keep = mp.sliding_window(1000, 1000, window=200, device=DEV)[None, None].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, then remember the direct entries
            flashfuse.attention(q, k, v, mask=keep)
    torch.cuda.current_stream().wait_stream(side)
    before = launch.stats["direct"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flashfuse.attention(q, k, v, mask=keep)
    assert launch.stats["direct"] > before  # the capture ran the prepared launch's entry
    for window, causal_ in ((200, True), (500, False)):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device=DEV, generator=gen, dtype=t.dtype))
        keep.copy_(mp.sliding_window(1000, 1000, window=window, causal_=causal_, device=DEV)[None, None])
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = oracle.attention(q.float(), k.float(), v.float(), mask=keep)
        assert rel_err(out, ref) < TOL[torch.bfloat16], window


def _overlap_inputs(seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v, dout = (torch.randn(1, 4, 1000, 64, device=DEV, generator=gen, dtype=torch.bfloat16) for _ in range(4))
    keep = mp.document([300, 450, 250], device=DEV)[None, None].clone()
    return gen, [t.requires_grad_() for t in (q, k, v)], dout, keep


def _fwd_bwd(q, k, v, dout, keep):
    import flashfuse

    for t in (q, k, v):
        t.grad = None
    out = flashfuse.attention(q, k, v, mask=keep)
    out.backward(dout)
    return out


def test_backward_overlap_gives_the_bits_of_one_stream(monkeypatch):
    # The backward runs dQ on a side stream beside dK/dV; no kernel reads what the other writes,
    # so the results are the bits that one stream gives.
    _, (q, k, v), dout, keep = _overlap_inputs(23)
    results, overlapped = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv(triton_attention.OVERLAP_ENV, flag)
        before = triton_attention.overlap_stats["backward"]
        out = _fwd_bwd(q, k, v, dout, keep)
        torch.cuda.synchronize()
        overlapped[flag] = triton_attention.overlap_stats["backward"] - before
        results[flag] = [out.detach().clone()] + [t.grad.clone() for t in (q, k, v)]
    assert overlapped == {"0": 0, "1": 1}, overlapped
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["0"], results["1"]):
        assert torch.equal(a, b), name


def test_backward_overlap_follows_the_work(monkeypatch):
    # FLASHFUSE_BWD_OVERLAP unset: dQ goes beside dK/dV only when the backward's work reaches
    # OVERLAP_MIN_WORK. A small masked call (its cached lists count its blocks) stays on one
    # stream; a dense call of 16 heads x 32 x 32 blocks at D=128 (exactly the threshold) and a
    # masked one whose mask keeps every block go beside; the same call with
    # FLASHFUSE_BWD_OVERLAP=0 does not.
    monkeypatch.delenv(triton_attention.OVERLAP_ENV, raising=False)
    monkeypatch.delenv(bs.CACHE_ENV, raising=False)
    _, (q, k, v), dout, keep = _overlap_inputs(31)
    gen = torch.Generator(device=DEV).manual_seed(37)
    big = [torch.randn(1, 16, 4096, 128, device=DEV, generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
    big_dout = torch.randn(1, 16, 4096, 128, device=DEV, generator=gen, dtype=torch.bfloat16)
    all_kept = torch.ones(1, 1, 4096, 4096, dtype=torch.bool, device=DEV)
    assert triton_attention.backward_work((1, 16, 4096, 128), 4096, None, False) == triton_attention.OVERLAP_MIN_WORK
    cases = [("small", (q, k, v, dout, keep), None, 0), ("dense", (*big, big_dout, None), None, 1),
             ("all kept", (*big, big_dout, all_kept), None, 1), ("dense, off", (*big, big_dout, None), "0", 0)]
    for name, args, flag, want in cases:
        if flag is not None:
            monkeypatch.setenv(triton_attention.OVERLAP_ENV, flag)
        before = triton_attention.overlap_stats["backward"]
        _fwd_bwd(*args)
        torch.cuda.synchronize()
        assert triton_attention.overlap_stats["backward"] - before == want, name


def test_backward_side_streams_are_per_thread(monkeypatch):
    # The fork / join events are reused by every backward of a thread; another thread recording
    # them between one backward's record and its wait would let dQ start before the preprocess.
    import threading

    monkeypatch.setenv(triton_attention.OVERLAP_ENV, "1")
    t = torch.empty(1, device=DEV)
    got = []
    worker = threading.Thread(target=lambda: got.extend([triton_attention._side_stream(t), triton_attention._side_stream(t)]))
    worker.start()
    worker.join()
    mine = triton_attention._side_stream(t)
    assert got[0] is got[1] and mine is triton_attention._side_stream(t)
    assert mine is not got[0] and mine.stream != got[0].stream and mine.fork is not got[0].fork


def test_backward_overlap_in_a_cuda_graph(monkeypatch):
    # A CUDA graph of a whole fwd+bwd captures the side stream's fork and join, and replays with
    # new inputs and a new mask. Fresh leaves: autograd keeps each leaf's gradient node on the
    # stream of its first backward, and the capture must be that stream.
    monkeypatch.setenv(bs.CACHE_ENV, "0")
    monkeypatch.setenv(triton_attention.OVERLAP_ENV, "1")
    gen, (q, k, v), dout, keep = _overlap_inputs(29)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, then remember the direct entries
            _fwd_bwd(q, k, v, dout, keep)
    torch.cuda.current_stream().wait_stream(side)
    for t in (q, k, v):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _fwd_bwd(q, k, v, dout, keep)
    for lengths in ([500, 500], [100, 650, 250]):
        with torch.no_grad():
            for t in (q, k, v, dout):
                t.copy_(torch.randn(t.shape, device=DEV, generator=gen, dtype=t.dtype))
            keep.copy_(mp.document(lengths, device=DEV)[None, None])
        graph.replay()
        torch.cuda.synchronize()
        qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref, _ = oracle.attention(qr, kr, vr, mask=keep)
        ref.backward(dout.float())
        assert rel_err(out, ref) < TOL[torch.bfloat16], lengths
        for name, got, want in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
            assert rel_err(got, want) < TOL[torch.bfloat16], (lengths, name)


# -- every forward config of one shape (opt-in: compiles each) --------------------------------------

def _all_fwd_configs():
    return [c for c in configs.CONFIGS["fwd"] if not c.get("fp32") and c.get("max_block_d", 256) >= 64]


@pytest.mark.skipif(os.environ.get("FLASHFUSE_GPU_SWEEP") != "1", reason="set FLASHFUSE_GPU_SWEEP=1 to compile every forward config")
@pytest.mark.parametrize("cfg", _all_fwd_configs(), ids=lambda c: "BM{BLOCK_M}-BN{BLOCK_N}-w{num_warps}-s{num_stages}".format(**c))
def test_fwd_config_sweep(cfg):
    b, h, m, n, d = 2, 4, 1000, 1000, 64
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen, device=DEV).to(torch.bfloat16) for length in (m, n, n))
    opts = render.template_options(torch.bfloat16, d, False, False, True, False, False)
    heuristics = render.kernel("fwd", opts).fn  # below the autotuner: run this config directly
    out = torch.empty((b, m, h, d), dtype=torch.bfloat16, device=DEV).transpose(1, 2)
    m_stat = torch.empty((b, h, m), dtype=torch.float32, device=DEV)
    log_l = torch.empty_like(m_stat)
    meta = {key: val for key, val in cfg.items() if key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), b * h)
    heuristics[grid](
        q, k, v, None, None, None, out, m_stat, log_l, None,
        *q.stride(), *k.stride(), *v.stride(), 0, 0, 0, 0, 0, 0, 0, 0, *out.stride(), 0, 0, 0,
        h, 1, m, n, 0, 1024, 1024, d ** -0.5 * 1.4426950408889634, float("-inf"), 0, 1.0,
        HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, IS_CAUSAL=True, HAS_BIAS=False, HAS_MASK=False,
        DROPOUT=False, LOG2_DOMAIN=True, DOT_PRECISION="tf32", HAS_SPARSE=False, SPARSE_BLOCK=128, **meta,
    )
    ref, _ = oracle.attention(q.float(), k.float(), v.float(), scale=d ** -0.5, causal=True)
    assert rel_err(out, ref) < 1e-2
