"""The Triton attention kernels on the CPU, under the Triton interpreter (TRITON_INTERPRET=1).

Every case runs the forward and backward launchers of `flashfuse.kernels.triton_attention`
on small odd sizes (so blocks end partial) and compares out, m + log_l, dq, dk, dv, dbias with
the eager oracle (`tests/oracle.py`) in fp64 on the same (rounded) inputs; dropout cases hand
the oracle the exact keep-mask from `flashfuse.kernels.philox`. Relative errors are
||x - ref|| / ||ref||. The interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to
nearest), so bf16 errors here are about twice the GPU's.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # on a GPU machine the interpreter would leak into the whole session: tests/gpu/ covers it
    pytest.skip("CPU interpreter tests (set TRITON_INTERPRET=1 to force them here)", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is rendered and loaded
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU interpreter tests: TRITON_INTERPRET is set to something other than 1", allow_module_level=True)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from flashfuse.kernels import configs, launch, philox, render, triton_attention  # noqa: E402

try:
    import oracle  # tests/ is on sys.path under pytest's default import mode
    from philox_kernel import triton_keep_mask
except ImportError:  # pragma: no cover
    from tests import oracle
    from tests.philox_kernel import triton_keep_mask

F32_MIN = torch.finfo(torch.float32).min
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SEED = 20240611

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warnings from the interpreter on padded rows


def rel_err(x, ref):
    """||x - ref|| / ||ref|| over the finite entries of ref, after checking NaN/inf patterns agree."""
    x = x.detach().double()
    ref = ref.detach().double()
    assert x.shape == ref.shape
    assert torch.equal(torch.isnan(x), torch.isnan(ref)), "NaN pattern differs from eager"
    assert torch.equal(torch.isinf(x), torch.isinf(ref)), "inf pattern differs from eager"
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    den = ref[fin].norm().item()
    num = (x[fin] - ref[fin]).norm().item()
    return num / den if den > 0 else num


def _make_qkv(dtype, b, hq, group, m, n, d, dv, layout, gen):
    hkv = hq // group

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

    if layout == "contiguous":
        return randn(b, hq, m, d), randn(b, hkv, n, d), randn(b, hkv, n, dv)
    if layout == "bnhd":
        # [B, L, H, D] storage viewed as [B, H, L, D]: the usual projection output layout
        return randn(b, m, hq, d).transpose(1, 2), randn(b, n, hkv, d).transpose(1, 2), randn(b, n, hkv, dv).transpose(1, 2)
    if layout == "sliced":
        # padded last dims and an [L, B, H, D] storage: no dim is contiguous with the next
        q = randn(m, b, hq, d + 8).permute(1, 2, 0, 3)[..., :d]
        k = randn(b, hkv, n, 2 * d)[..., d:]
        v = randn(n, hkv, b, dv).permute(2, 1, 0, 3)
        return q, k, v
    raise ValueError(layout)


def run_case(
    dtype=torch.float32, b=2, hq=2, group=1, m=17, n=17, d=16, dv=None, causal=False,
    bias_shape=None, mask_shape=None, mask_value=float("-inf"), masked_rows=(), dropout_p=0.0,
    layout="contiguous", backward=True, tol=None,
):
    dv = d if dv is None else dv
    gen = torch.Generator().manual_seed(SEED + m * 1000 + n)
    q, k, v = _make_qkv(dtype, b, hq, group, m, n, d, dv, layout, gen)
    bias = None
    if bias_shape is not None:
        bias = torch.randn(*bias_shape, generator=gen).to(dtype)
    mask = None
    if mask_shape is not None:
        mask = torch.rand(*mask_shape, generator=gen) > 0.25
        mask[..., 0] = True  # key 0 stays visible (causal row 0 sees only it), except in rows masked below
        for row in masked_rows:
            mask[..., row, :] = False  # a fully masked row
    seed = torch.tensor([SEED + 17], dtype=torch.int64)
    scale = d ** -0.5
    tol = TOL[dtype] if tol is None else tol

    out, m_stat, log_l = triton_attention.attention_forward(q, k, v, bias, mask, scale, causal, dropout_p, seed, group, mask_value)
    assert out.shape == (b, hq, m, dv) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be a [B, M, H, Dv] tensor viewed as [B, H, M, Dv]"
    assert m_stat.dtype == log_l.dtype == torch.float32 and m_stat.is_contiguous() and m_stat.shape == (b, hq, m)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    bd = bias.detach().double().requires_grad_() if bias is not None else None
    keep = philox.keep_mask(int(seed), dropout_p, b, hq, m, n) if dropout_p > 0 else None
    ref, lse = oracle.attention(qd, kd, vd, bd, mask, scale, causal, dropout_p, int(seed), group, mask_value, keep=keep)

    assert rel_err(out, ref) < tol, rel_err(out, ref)
    assert rel_err(m_stat.double() + log_l.double(), lse) < 1e-5
    if not backward:
        return

    dout = torch.randn(out.shape, generator=gen).to(dtype)
    ref.backward(dout.double())
    dq, dk, dv_, dbias = triton_attention.attention_backward(
        dout, q, k, v, bias, mask, out, m_stat, log_l, scale, causal, dropout_p, seed, group, mask_value, bias is not None
    )
    for name, got, want, like in (("dq", dq, qd.grad, q), ("dk", dk, kd.grad, k), ("dv", dv_, vd.grad, v)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        err = rel_err(got, want)
        assert err < tol, f"{name}: {err}"
    if bias is not None:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        err = rel_err(dbias, bd.grad)
        assert err < tol, f"dbias: {err}"
    else:
        assert dbias is None


# -- sizes, causal, GQA, head dims, dtypes ------------------------------------------------------

SIZES = [(1, 1), (17, 17), (100, 129), (129, 100), (1, 129), (129, 17), (64, 64), (32, 96)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("m,n", SIZES, ids=[f"M{m}-N{n}" for m, n in SIZES])
def test_sizes_fp32(m, n, causal):
    run_case(torch.float32, m=m, n=n, causal=causal)


@pytest.mark.parametrize(
    "dtype,m,n,d,group,causal,layout",
    [
        (torch.float32, 100, 129, 80, 2, True, "contiguous"),
        (torch.float32, 129, 100, 16, 2, False, "bnhd"),
        (torch.float32, 17, 100, 16, 1, True, "sliced"),
        (torch.bfloat16, 17, 100, 16, 1, False, "contiguous"),
        (torch.bfloat16, 100, 129, 80, 2, True, "contiguous"),
        (torch.bfloat16, 129, 100, 16, 1, False, "bnhd"),
        (torch.float16, 100, 17, 16, 1, True, "contiguous"),
    ],
    ids=["fp32-D80-gqa2-causal", "fp32-gqa2-bnhd", "fp32-sliced-causal", "bf16", "bf16-D80-gqa2-causal", "bf16-bnhd", "fp16-causal"],
)
def test_dtypes_layouts(dtype, m, n, d, group, causal, layout):
    run_case(dtype, hq=4 if group > 1 else 2, group=group, m=m, n=n, d=d, causal=causal, layout=layout)


def test_value_head_dim_differs():
    run_case(torch.float32, m=33, n=70, d=16, dv=32, causal=True)


# -- bias (with dbias) ---------------------------------------------------------------------------

BIASES = [((2, 2, 17, 129), False), ((1, 2, 17, 129), True), ((2, 1, 1, 129), False), ((2, 2, 1, 129), True), ((1, 1, 17, 129), False)]


@pytest.mark.parametrize("bias_shape,causal", BIASES, ids=["BHMN", "1HMN-causal", "B11N", "BH1N-causal", "11MN"])
def test_bias_fp32(bias_shape, causal):
    run_case(torch.float32, m=17, n=129, bias_shape=bias_shape, causal=causal)


def test_bias_bf16_gqa():
    run_case(torch.bfloat16, hq=4, group=2, m=100, n=65, d=16, bias_shape=(1, 4, 100, 65), causal=True)


# -- masks ---------------------------------------------------------------------------------------

def test_mask_neg_inf():
    run_case(torch.float32, m=100, n=129, mask_shape=(2, 1, 100, 129))


def test_mask_neg_inf_fully_masked_row_is_nan():
    # eager softmax over a row of -inf gives NaN; the kernel must too (forward only: eager's
    # backward then spreads NaN through dv)
    run_case(torch.float32, m=40, n=50, mask_shape=(2, 2, 40, 50), masked_rows=(3, 39), backward=False)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_finite_fill_fully_masked_row(causal):
    # finfo.min fill: a fully masked row is a uniform average, m = finfo.min exactly, and no
    # gradient reaches the replaced scores
    run_case(torch.float32, m=40, n=50, mask_shape=(2, 1, 40, 50), mask_value=F32_MIN, masked_rows=(0, 21), causal=causal)


def test_mask_key_padding_bf16():
    run_case(torch.bfloat16, m=33, n=100, mask_shape=(2, 1, 1, 100), causal=True)


def test_mask_finite_fill_with_bias():
    run_case(torch.float32, m=17, n=40, bias_shape=(2, 2, 17, 40), mask_shape=(1, 2, 17, 40), mask_value=-1e4, masked_rows=(5,))


# -- dropout (exact keep-mask) -------------------------------------------------------------------

def test_dropout_fp32():
    run_case(torch.float32, m=100, n=129, dropout_p=0.3)


def test_dropout_everything_fp32():
    run_case(
        torch.float32, hq=4, group=2, m=45, n=70, causal=True, dropout_p=0.3,
        bias_shape=(1, 4, 45, 70), mask_shape=(2, 1, 45, 70), mask_value=F32_MIN, masked_rows=(7,),
    )


def test_dropout_bf16_bnhd():
    run_case(torch.bfloat16, m=64, n=64, causal=True, dropout_p=0.3, layout="bnhd")


# -- Philox --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 7, -5], ids=["0", "1234", "2^40+7", "neg"])
def test_philox_bit_exact(seed):
    got = triton_keep_mask(seed, 0.3, 2, 3, 37, 70)
    want = philox.keep_mask(seed, 0.3, 2, 3, 37, 70)
    assert torch.equal(got, want)


def test_philox_tile_independent():
    # 8 keys per Philox call, interleaved in-kernel: the mask must not depend on BLOCK_N
    want = philox.keep_mask(77, 0.5, 1, 2, 33, 96)
    for block_n in (8, 16, 32):
        assert torch.equal(triton_keep_mask(77, 0.5, 1, 2, 33, 96, block_n=block_n), want), block_n


def test_philox_packing_spec():
    # spelled out for one element: counter (j // 8, i, bh, 0), word (j % 8) // 2, half j % 2
    seed, bh, i, j = 2**35 + 3, 5, 17, 8 * 11 + 5
    words = philox.philox4(seed, torch.tensor([j // 8]), torch.tensor([i]), torch.tensor([bh]))
    u16 = (int(words[(j % 8) // 2]) >> (16 * (j % 2))) & 0xFFFF
    assert int(philox.uniform16(seed, torch.tensor(bh), torch.tensor(i), torch.tensor(j))) == u16
    assert philox.threshold(0.1) == round(0.1 * 65536) and philox.threshold(0.0) == 0
    for p in (0.1, 0.3, 1e-6, 0.99999):
        assert abs(philox.keep_probability(p) - (1 - p)) <= 1 / 131072


def test_philox_keep_rate():
    p, b, h, m, n = 0.3, 2, 2, 128, 256
    keep = triton_keep_mask(99, p, b, h, m, n)
    count = keep.numel()
    rate = keep.double().mean().item()
    sigma = (p * (1 - p) / count) ** 0.5
    assert abs(rate - philox.keep_probability(p)) < 4 * sigma, (rate, sigma)
    # different seeds give different masks
    assert not torch.equal(keep, triton_keep_mask(100, p, b, h, m, n))


def test_dropout_output_mean_scaling():
    # E[keep / (1 - p)] = 1: with positive values the dropped output's mean matches the undropped one
    gen = torch.Generator().manual_seed(5)
    b, h, m, n, d, p = 2, 2, 128, 64, 16, 0.3
    q = 0.3 * torch.randn(b, h, m, d, generator=gen)
    k = 0.3 * torch.randn(b, h, n, d, generator=gen)
    v = 1.0 + 0.1 * torch.rand(b, h, n, d, generator=gen)
    seed = torch.tensor([7], dtype=torch.int64)
    args = (None, None, d ** -0.5, False)
    full = triton_attention.attention_forward(q, k, v, *args, 0.0, seed, 1, float("-inf"))[0]
    dropped = triton_attention.attention_forward(q, k, v, *args, p, seed, 1, float("-inf"))[0]
    ratio = (dropped.mean() / full.mean()).item()
    # per-row std of the ratio is about sqrt(p / ((1 - p) n)) = 0.08; 512 independent rows
    assert abs(ratio - 1.0) < 0.02, ratio


# -- rendering and configs -----------------------------------------------------------------------

def test_render_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFUSE_CACHE_DIR", str(tmp_path))
    paths = render.sources_for(torch.bfloat16, 80, True, True, True, True, True)
    assert set(paths) == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}
    for kind, path in paths.items():
        assert path.parent == tmp_path and path.exists()
        text = path.read_text()
        assert "Notation:" in text and "Grid:" in text and "head_dim=80 (BLOCK_D=128)" in text
        assert "def _philox4" in text and "{%" not in text and "{{" not in text
        compile(text, str(path), "exec")
    assert "reset_to_zero" in paths["bwd_dkdv"].read_text()
    # rendering again is a cache hit: same file
    assert render.render("fwd", render.template_options(torch.bfloat16, 80, True, True, True, True, False)) == paths["fwd"]


def test_configs_prune():
    for kind in configs.KINDS:
        for block_d in (16, 64, 128, 256):
            for elem in (2, 4):
                kept = configs.prune(kind, configs.CONFIGS[kind], block_d, block_d, elem, 100 * 1024)
                assert kept, (kind, block_d, elem)
                one = configs.prune(kind, configs.CONFIGS[kind], block_d, block_d, elem, 100 * 1024, autotune="first")
                assert one == kept[:1]
    assert len(configs.config_dicts("fwd")) == 1  # the interpreter's single small config


def test_shared_memory_estimate_matches_measured_kernels():
    # Shared memory the compiled forward used on the GPUs (benchmarks/results/NOTES.md,
    # 2026-11-22): the H100 (Triton 3.6) bf16 D=64 64x64/4 warps/3 stages forward, 57344 B
    # without a mask and 65536 B with one; the H200's bf16 D=80 (BLOCK_D 128) bias + mask
    # 128x128/3 forward, 262144 B (it did not fit: the prune must drop it at 227 KB).
    est = configs.shared_memory_estimate
    c64 = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    c128 = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    assert est("fwd", c64, 64, 64, 2) == 57344
    assert est("fwd", c64, 64, 64, 2, has_mask=True) == 65536
    assert est("fwd", c128, 128, 128, 2, bias_bytes=2, has_mask=True) == 262144
    kept = configs.prune("fwd", configs.CONFIGS["fwd"], 128, 128, 2, 227 * 1024, "all", bias_bytes=2, has_mask=True)
    assert all((c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) != (128, 128, 3) for c in kept)


def test_register_capped_configs_reach_triton_and_stay_distinct():
    # "maxnreg" becomes the triton.Config's register cap, not a kernel argument; a ban (by
    # signature) of the capped config leaves the uncapped one of the same tiles alone.
    for kind in ("fwd", "bwd_dq"):
        capped = [c for c in configs.CONFIGS[kind] if c.get("maxnreg")]
        assert capped and all(c.get("mask_tier") for c in capped), kind
        made = [configs._to_triton(c) for c in configs.CONFIGS[kind]]
        for c, t in zip(configs.CONFIGS[kind], made):
            assert t.maxnreg == c.get("maxnreg") and "maxnreg" not in t.kwargs
        for c, t in zip(configs.CONFIGS[kind], made):
            if c.get("maxnreg"):
                uncapped = {k: v for k, v in c.items() if k != "maxnreg"}
                assert configs._signature(t) != configs._signature(configs._to_triton(uncapped)), (kind, c)
    # a loaded mask adds its tile to the estimate; row ranges (mask_tile=False) keep the tier but not the tile
    c64 = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    with_tile = configs.prune("fwd", [c64, dict(c64, BLOCK_N=32)], 64, 64, 2, 60 * 1024, "all", has_mask=True)
    ranges = configs.prune("fwd", [c64, dict(c64, BLOCK_N=32)], 64, 64, 2, 60 * 1024, "all", has_mask=True, mask_tile=False)
    assert c64 not in with_tile and c64 in ranges


def test_autotuner_times_for_flashfuse_autotune_rep_ms(monkeypatch):
    # Every rendered kernel's autotuner times candidates through configs.autotune_bench, which
    # runs Triton's do_bench for FLASHFUSE_AUTOTUNE_REP_MS (default Triton's 100 ms).
    import triton.testing

    opts = render.template_options(torch.float16, 64, has_bias=True, has_mask=False, causal=False,
                                   dropout=False, needs_dbias=True)
    for kind in render.KINDS:
        assert render.kernel(kind, opts).do_bench is configs.autotune_bench, kind
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: calls.append((warmup, rep, quantiles)) or [1.0])
    for value, rep in ((None, 100.0), ("20", 20.0), ("2.5", 2.5), ("0", 100.0), ("-3", 100.0), ("fast", 100.0), ("inf", 100.0)):
        if value is None:
            monkeypatch.delenv("FLASHFUSE_AUTOTUNE_REP_MS", raising=False)
        else:
            monkeypatch.setenv("FLASHFUSE_AUTOTUNE_REP_MS", value)
        assert configs.autotune_bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0]
        assert calls[-1] == (max(rep / 4, 1.0), rep, (0.5, 0.2, 0.8)), value


def test_autotune_tiers(monkeypatch):
    # "default" benchmarks only the configs not marked extra, "all" every config that fits,
    # "first" one; a default tier that cannot fit falls back to the extras instead of nothing.
    fits = lambda mode, block_d=64, smem=227 * 1024, **kw: configs.prune("fwd", configs.CONFIGS["fwd"], block_d, block_d, 2, smem, mode, **kw)  # noqa: E731
    default, every = fits("default"), fits("all")
    assert default and all(not c.get("extra") for c in default)
    assert len(every) > len(default) and all(c in every for c in default)
    assert any(c.get("extra") for c in every)
    assert fits("first") == default[:1]
    # D=256 fallbacks ("extra_below_d") join the default tier only at that head dim
    assert all(c.get("extra_below_d", 0) <= 64 for c in default)
    assert any(c.get("extra_below_d") == 256 for c in fits("default", block_d=256))
    # "mask_tier" configs are extra for dense calls and default for calls that load a mask
    masked = fits("default", has_mask=True)
    assert [c for c in masked if c.get("mask_tier")] and not [c for c in default if c.get("mask_tier")]
    assert fits("first", has_mask=True) == default[:1]
    only_extra = [c for c in configs.CONFIGS["fwd"] if c.get("extra")]
    assert configs.prune("fwd", only_extra, 64, 64, 2, 227 * 1024, "default") == only_extra
    for value, mode in (("1", "default"), ("all", "all"), ("ALL", "all"), ("0", "first"), ("yes", "default"), ("", "default")):
        monkeypatch.setenv("FLASHFUSE_AUTOTUNE", value)
        assert configs.autotune_mode() == mode, value


def test_precompile_warms_every_pruned_config_in_threads(monkeypatch):
    # The autotuner's candidates are compiled (warmup) on worker threads before it benchmarks
    # them; a config that fails to compile is left to the autotuner; with one thread nothing runs.
    import threading

    from triton.runtime.autotuner import Autotuner


    seen = []

    class FakeJit:
        def warmup(self, *args, grid, **kwargs):
            seen.append((kwargs["BLOCK_M"], threading.current_thread().name))
            if kwargs["BLOCK_M"] == 32:
                raise RuntimeError("does not compile")

    class FakeTuner(Autotuner):
        def __init__(self):  # no Triton kernel behind it: only what precompile reads
            self.fn = FakeJit()
            self.arg_names = ["X", "n"]
            self.configs = [triton.Config({"BLOCK_M": m}) for m in (128, 64, 32, 16)]
            self.early_config_prune = lambda cfgs, named, **kw: [c for c in cfgs if c.kwargs["BLOCK_M"] >= named["n"]]

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setenv("FLASHFUSE_COMPILE_THREADS", "4")
    x = torch.zeros(4)
    assert launch.precompile("fwd", FakeTuner(), (1,), (x, 32), {}) == 3
    assert sorted(m for m, _ in seen) == [32, 64, 128]
    assert all(name.startswith("flashfuse-compile") for _, name in seen)
    seen.clear()
    monkeypatch.setenv("FLASHFUSE_COMPILE_THREADS", "1")
    assert launch.precompile("fwd", FakeTuner(), (1,), (x, 32), {}) == 0 and not seen
    # an unknown value warns once and uses the default thread count: never an exception inside a launch
    monkeypatch.setenv("FLASHFUSE_COMPILE_THREADS", "many")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert launch.precompile("fwd", FakeTuner(), (1,), (x, 32), {}) == 3


def test_smem_estimate_counts_bias_mask_and_stages():
    # H200, bf16, D=80 (BLOCK_D=128), bias and mask: the forward's 128x128 3-stage config needed
    # 262144 bytes of shared memory (232448 available) and must be pruned; without bias/mask it fits
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    assert configs.shared_memory_estimate("fwd", cfg, 128, 128, 2, bias_bytes=2, has_mask=True) >= 262144
    kept = configs.prune("fwd", configs.CONFIGS["fwd"], 128, 128, 2, 232448, autotune="first", bias_bytes=2, has_mask=True)
    assert (kept[0]["BLOCK_M"], kept[0]["BLOCK_N"]) != (128, 128)
    assert configs.prune("fwd", configs.CONFIGS["fwd"], 128, 128, 2, 232448, autotune="first")[0]["BLOCK_N"] == 128
    for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
        for c in configs.CONFIGS[kind]:
            # the block-sparse walk and the 8-keys-per-call dropout rely on these
            assert 128 % c["BLOCK_M"] == 0 and 128 % c["BLOCK_N"] == 0 and c["BLOCK_N"] % 8 == 0, (kind, c)


def test_out_of_resources_falls_through_to_next_config(monkeypatch):
    # A real autotuner whose first config "runs out of shared memory" at launch (raised from its
    # pre_hook, where the GPU raises it from the compiled kernel's launch): the launcher bans it for
    # this variant and runs the next config, now and on later calls, without retrying the first.
    from triton.runtime.errors import OutOfResources

    monkeypatch.setenv("FLASHFUSE_AUTOTUNE", "0")
    configs._BANNED.clear()
    calls = []

    def too_big(nargs):
        calls.append("big")
        raise OutOfResources(262144, 232448, "shared memory")

    big = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3, pre_hook=too_big)
    small = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3)

    @triton.autotune(configs=[big, small], key=["N"], prune_configs_by={"early_config_prune": configs.prune_fwd})
    @triton.jit
    def fill(Q, Out, N, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(Out + offs, tl.full([BLOCK_N], BLOCK_N, tl.int32), mask=offs < N)

    for c in (big, small):  # the estimate needs a BLOCK_M
        c.kwargs["BLOCK_M"] = 16
    q = torch.zeros(1, dtype=torch.bfloat16)  # a 16-bit Q: both configs fit the dtype bounds
    for _ in range(2):
        out = torch.zeros(100, dtype=torch.int32)
        launch.launch("fwd", fill, lambda meta: (triton.cdiv(100, meta["BLOCK_N"]),), q, out, 100, BLOCK_DV=16)
        assert (out == 32).all()
    assert calls == ["big"]
    configs._BANNED.clear()


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_dead_row_from_mask_and_causal_has_eager_grads(kernel):
    # Row 0 keeps only key 0 under causal, and the mask drops key 0: the row is empty. Eager's
    # masked_fill backward gives dS = 0 across it (dq row 0 = 0), and NaN reaches dv only.
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 17, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    keep = torch.ones(1, 1, 1, 17, dtype=torch.bool)
    keep[..., 0] = False
    out, _, _ = torch.ops.flashfuse.attention(q, k, v, None, keep, 0.25, True, 0.0, None, 1, float("-inf"), True, kernel)
    ref, _ = oracle.attention(*(t.double() for t in (q, k, v)), None, keep, 0.25, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k), do)
    want = torch.autograd.grad(ref, (q, k), do.double())
    for g, w in zip(got, want):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_direct_launch_key_separates_what_triton_specializes():
    # flashfuse.kernels.launch reuses a compiled kernel only for an equal key: the key must tell
    # apart everything Triton specializes on (pointer alignment, int values such as 1 or
    # multiples of 16, constexprs) and ignore only runtime floats.
    from flashfuse.kernels.launch import _arg_key

    buf = torch.randn(64, dtype=torch.float32)
    aligned, misaligned, aligned_too = buf[:16], buf[1:17], buf[4:20]
    assert buf.data_ptr() % 16 == 0
    base = _arg_key((aligned, 16, 1, 0.5), {"CAUSAL": True})
    assert base != _arg_key((misaligned, 16, 1, 0.5), {"CAUSAL": True})
    assert base != _arg_key((aligned.bfloat16(), 16, 1, 0.5), {"CAUSAL": True})
    assert base != _arg_key((aligned, 32, 1, 0.5), {"CAUSAL": True})
    assert base != _arg_key((aligned, 16, 2, 0.5), {"CAUSAL": True})
    assert base != _arg_key((aligned, 16, 1, 0.5), {"CAUSAL": False})
    assert base != _arg_key((None, 16, 1, 0.5), {"CAUSAL": True})
    assert base == _arg_key((aligned_too, 16, 1, 0.25), {"CAUSAL": True})
    # equal under ==, different to Triton: bool vs int, a float vs None, swapped keyword values
    assert _arg_key((aligned, True), {}) != _arg_key((aligned, 1), {})
    assert _arg_key((aligned, False), {}) != _arg_key((aligned, 0), {})
    assert _arg_key((aligned, 0.5), {}) != _arg_key((aligned, None), {})
    assert _arg_key((aligned,), {"A": 1, "B": 2}) != _arg_key((aligned,), {"B": 1, "A": 2})


def test_direct_launch_enabled_without_launch_hooks(monkeypatch):
    # Triton's launch hooks are a HookChain on newer versions (present but empty) and a plain
    # callable or None on older ones: the direct path must be on with no hook and off with one.
    from triton import knobs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not launch._hooks_installed()
    assert launch._direct_enabled()
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):
        fn = lambda *a, **k: None  # noqa: E731
        hook.add(fn)
        try:
            assert launch._hooks_installed() and not launch._direct_enabled()
        finally:
            hook.remove(fn)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a, **k: None)
        assert launch._hooks_installed() and not launch._direct_enabled()
    monkeypatch.setenv("FLASHFUSE_DIRECT_LAUNCH", "0")
    assert not launch._direct_enabled()


class _RecordingCompiled:
    """A stand-in for a compiled Triton kernel (no GPU here): records its launcher's calls."""

    function = object()
    metadata = object()

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


def _plain_autotuned(config):
    @triton.autotune(configs=[config], key=["N"])
    @triton.jit
    def plain(X, N, FLAG: tl.constexpr, BLOCK: tl.constexpr):
        pass

    return plain


def test_direct_entry_orders_arguments_for_kernels_with_and_without_heuristics(monkeypatch):
    # The direct entry replays a launch: positional args, then every remaining parameter of the
    # jit function in order (launch kwargs, the config's meta-parameters, heuristics values).
    # On a GPU those go to CompiledKernel.run; here a stand-in compiled kernel records them.

    config = triton.Config({"BLOCK": 32}, num_warps=4, num_stages=1)

    @triton.autotune(configs=[config], key=["N"])
    @triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK"] == 0})
    @triton.jit
    def with_heuristics(X, N, FLAG: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        pass

    plain = _plain_autotuned(config)

    x = torch.zeros(8)
    for kernel, tail in ((with_heuristics, (True, 32, False)), (plain, (True, 32))):
        compiled = _RecordingCompiled()
        entry = launch._direct_entry(kernel, compiled, config, lambda meta: (triton.cdiv(100, meta["BLOCK"]),), (x, 100), {"FLAG": True})
        assert entry is not None and entry.tail == tail and entry.meta["BLOCK"] == 32
        assert not any(isinstance(a, torch.Tensor) for a in entry.meta.values())
        # launch() with the entry in place calls the compiled kernel's launcher and nothing else
        monkeypatch.setattr(launch, "_direct_enabled", lambda: True)
        monkeypatch.setattr(launch, "_stream", lambda: "stream")
        dkey = (id(kernel), launch._arg_key((x, 100), {"FLAG": True}))
        launch._direct[dkey] = entry
        try:
            launch.launch("fwd", kernel, lambda meta: (triton.cdiv(100, meta["BLOCK"]),), x, 100, FLAG=True)
            assert len(compiled.calls) == 1
            assert compiled.calls[0][:3] == (4, 1, 1) and compiled.calls[0][3] == "stream"
            assert compiled.calls[0][4:6] == (_RecordingCompiled.function, _RecordingCompiled.metadata)
            assert compiled.calls[0][9:] == (x, 100, *tail)
            # Same arguments, another grid (a launcher's grid may read sizes that are not kernel
            # arguments, e.g. the batch): the grid is evaluated again, never remembered.
            launch.launch("fwd", kernel, lambda meta: (triton.cdiv(100, meta["BLOCK"]), 3), x, 100, FLAG=True)
            assert compiled.calls[1][:3] == (4, 3, 1)
        finally:
            launch._direct.pop(dkey, None)


def test_prepared_launch_runs_the_remembered_entry_until_forgotten(monkeypatch):
    # launch.Prepared: the first call goes through launch() and keeps the direct entry it left;
    # later calls run that entry with their own tensors (no argument key); launch.forget() or a
    # launch hook sends the next call through launch() again.
    config = triton.Config({"BLOCK": 32}, num_warps=4, num_stages=1)

    plain = _plain_autotuned(config)

    compiled, slow = _RecordingCompiled(), []

    def checked_launch(kind, kernel, grid, *args, **kwargs):
        slow.append(args)
        launch._direct[(id(kernel), launch._arg_key(args, kwargs))] = launch._direct_entry(kernel, compiled, config, grid, args, kwargs)

    monkeypatch.setattr(launch, "_direct_enabled", lambda: True)
    monkeypatch.setattr(launch, "_stream", lambda: "stream")
    monkeypatch.setattr(launch, "launch", checked_launch)
    buf = torch.randn(64)
    x, y = buf[:16], buf[16:32]  # both 16-byte aligned: the same launch key
    prepared = launch.Prepared("fwd", plain, lambda meta: (-(-100 // meta["BLOCK"]), 2), (100,), {"FLAG": True})
    try:
        prepared(x)
        assert len(slow) == 1 and slow[0][0] is x and compiled.calls == []
        prepared(y)
        assert len(slow) == 1 and len(compiled.calls) == 1
        call = compiled.calls[0]
        assert call[:4] == (4, 2, 1, "stream") and call[4:6] == (_RecordingCompiled.function, _RecordingCompiled.metadata)
        assert call[9] is y and call[10:] == (100, True, 32)
        launch.forget()
        prepared(x)
        assert len(slow) == 2 and len(compiled.calls) == 1
        prepared(y)
        assert len(compiled.calls) == 2
        monkeypatch.setattr(launch, "_hooks_installed", lambda: True)  # a profiler installed a launch hook
        prepared(x)
        assert len(slow) == 3 and len(compiled.calls) == 2
        # tests run with launch.audit on: a call whose launch key differs from the first call's
        # (a misaligned pointer here) is an error, not a launch of the wrong binary
        with pytest.raises(AssertionError, match="another launch key"):
            prepared(buf[1:17])
    finally:
        launch.forget(plain)


def test_plans_follow_the_call_signature():
    # triton_attention's plans: one per (forward | backward) call signature, reused by equal
    # signatures and never by different ones (every prepared launch checks its key: launch.audit).
    triton_attention.reset()
    run_case(torch.float32, b=1, m=40, n=40, mask_shape=(1, 1, 40, 40))
    assert len(triton_attention._plans) == 2  # the forward's and the backward's
    run_case(torch.float32, b=1, m=40, n=40, mask_shape=(1, 1, 40, 40))
    assert len(triton_attention._plans) == 2
    cases = [dict(b=2), dict(b=1, layout="bnhd"), dict(b=1, layout="sliced"), dict(b=1, causal=True), dict(b=1, dropout_p=0.2),
             dict(b=1, mask_value=F32_MIN), dict(b=1, bias_shape=(1, 2, 1, 40)), dict(b=1, dtype=torch.bfloat16)]
    for i, extra in enumerate(cases):
        args = {**dict(dtype=torch.float32, m=40, n=40, mask_shape=(1, 1, 40, 40)), **extra}
        run_case(**args)
        assert len(triton_attention._plans) == 4 + 2 * i, extra
        run_case(**args)
        assert len(triton_attention._plans) == 4 + 2 * i, extra


def test_envvars_read_what_os_environ_holds(monkeypatch):
    # flashfuse.envvars.get reads os.environ's own dict: every change made through os.environ
    # (monkeypatch included) must show, and a missing name gives the default
    from flashfuse import envvars

    monkeypatch.setenv("FLASHFUSE_TEST_ENV", "a=b ü")
    assert envvars.get("FLASHFUSE_TEST_ENV") == "a=b ü" == os.environ.get("FLASHFUSE_TEST_ENV")
    monkeypatch.setenv("FLASHFUSE_TEST_ENV", "0")
    assert envvars.get("FLASHFUSE_TEST_ENV", "1") == "0"
    monkeypatch.delenv("FLASHFUSE_TEST_ENV")
    assert envvars.get("FLASHFUSE_TEST_ENV") is None and envvars.get("FLASHFUSE_TEST_ENV", "1") == "1"


def test_op_output_layout_checks_match_the_fake_kernels():
    # ops._as_layout compares outputs with the strides the fake kernels promise, computed without
    # allocating: they must equal what the fake kernels' empty / empty_like give, for dense,
    # permuted, sliced, expanded and empty inputs.
    from flashfuse import ops

    base = torch.randn(4, 6, 5, 8)
    inputs = [base, base.transpose(1, 2), base[:, :, :3], base.permute(2, 0, 3, 1), base[:1], torch.randn(1, 1, 1, 1),
              torch.randn(4, 1, 5, 8).expand(4, 6, 5, 8), torch.randn(0, 3, 2, 2), base[..., ::2],
              torch.randn(2, 1, 3, 4).as_strided((2, 1, 3, 4), (12, 99, 4, 1))]
    for t in inputs:
        assert ops._dense_strides(t) == torch.empty_like(t).stride(), (t.shape, t.stride())
    for shape in [(2, 3, 5, 4), (1, 1, 1, 1), (2, 0, 5, 4), (2, 3, 0, 4)]:
        for dv in (4, 1, 0):
            q, v = torch.empty(shape), torch.empty(shape[0], shape[1], 7, dv)
            assert ops._out_strides(q, v) == ops._out_like(q, v).stride(), (shape, dv)
    # a mismatching layout or dtype is copied into the promised one
    t = base.transpose(1, 2).contiguous().transpose(1, 2)  # [4, 6, 5, 8] viewed from [4, 5, 6, 8]
    fixed = ops._as_layout(t, base.double(), base.shape, base.stride())
    assert fixed.stride() == base.stride() and fixed.dtype == torch.float64 and torch.equal(fixed, t.double())
    assert ops._as_layout(base, base, base.shape, base.stride()) is base
