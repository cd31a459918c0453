"""Launchers of the Triton attention kernels: the op's "triton" implementation.

Same signatures and semantics as `flashfuse/kernels/reference.py` (read its docstring for the
contract). The kernels are rendered from `flashfuse/templates/*.py.jinja` by
`flashfuse.kernels.render` and autotuned over `flashfuse.kernels.configs`.

    forward:  attn_fwd                     grid (cdiv(M, BLOCK_M), B * Hq)
    backward: attn_bwd_preprocess (delta)  grid (cdiv(M, BLOCK_M), B * Hq)
              attn_bwd_dkdv                grid (cdiv(N, BLOCK_N), B * Hkv)   no atomics for dk/dv
              attn_bwd_dq                  grid (cdiv(M, BLOCK_M), B * Hq)    beside dK/dV on a side stream, for large work (_overlap)

q, k, v, bias, mask, dout are read through their strides (size-1 bias/mask dims get stride 0);
nothing is made contiguous and nothing M x N is allocated.

Block sparsity: whenever a bias, a mask or an explicit block layout reaches the kernels, the
launchers summarize them per SPARSE_BLOCK x SPARSE_BLOCK tile (`block_sparse.kernel_lists`;
three Triton launches; cached across eager calls, see `block_sparse.caching`) and the kernels walk only
the non-empty tiles, loading no mask or bias on full ones. Causal skipping stays compile-time and combines with the lists.
Eager calls also learn (one host sync per cached mask) whether the mask has PARTIAL tiles at
all (if not, the kernels run without it) and whether each row keeps one interval of keys (then
the kernels get the rows' (lo, hi) and compute the keep-mask instead of loading it, MASK_RANGES).

Resources: the autotuner's configs are pruned by a shared-memory estimate
(`configs.prune`); a launch that still fails with OutOfResources drops that config for the
kernel variant and runs the next one. Launches go through `flashfuse.kernels.launch`, which
calls the compiled kernel directly once a launch with the same arguments has been seen; each
call signature's launches are kept as a plan (below), so a repeated call only passes tensors.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import threading
from typing import Optional

import torch
from torch import Tensor

from flashfuse import envvars
from flashfuse.kernels import block_sparse, configs, philox, render
from flashfuse.kernels.launch import Prepared

LOG2E = 1.4426950408889634
# Granularity of the block-sparse summaries and lists: every config's BLOCK_M and BLOCK_N divide it.
SPARSE_BLOCK = 128


def _bcast_strides(t: Optional[Tensor]):
    """Strides of a broadcastable 4-D bias/mask, 0 on size-1 dims; zeros when absent."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(4))


def _bucket(n: int) -> int:
    # autotune key: lengths in the same power-of-two bucket share a config
    # (plain bit arithmetic: triton.next_power_of_2 is a jit-aware function, ~5 us per call)
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def _device_guard(t: Tensor):
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# torch.backends.cuda.matmul.allow_tf32 goes through a settings object (~0.5 us); its getter is
# the same flag (older torch without it: the public attribute)
_get_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def _allow_tf32() -> bool:
    return _get_tf32() if _get_tf32 is not None else torch.backends.cuda.matmul.allow_tf32


@functools.lru_cache(maxsize=64)
def _fp32(x: float) -> float:
    # the value the kernels see: the reference also rounds the fill value to fp32 scores
    return float(torch.tensor(float(x), dtype=torch.float32))


def _seed_tensor(seed, device) -> Tensor:
    if isinstance(seed, Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def _scalars(scale: float, bias, mask, mask_value: float, dropout_p: float):
    mask_value = _fp32(mask_value)
    # log2 units are safe when every score is small or -inf: no bias, no finite fill value
    log2_domain = bias is None and (mask is None or mask_value == float("-inf"))
    qk_scale = scale * LOG2E if log2_domain else scale
    dropout = dropout_p > 0.0
    dropout_scale = 1.0 / (1.0 - dropout_p) if dropout else 1.0
    return mask_value, log2_domain, float(qk_scale), dropout, float(dropout_scale)


def _lists(bias, mask, block_layout, mask_value: float, causal: bool, m_len: int, n_len: int):
    """block_sparse.KernelLists for this call, or None (no bias, mask or layout)."""
    if bias is None and mask is None and block_layout is None:
        return None
    return block_sparse.kernel_lists(
        bias, mask, block_layout, SPARSE_BLOCK, m_len, n_len, bool(causal),
        finite_fill=mask is not None and math.isfinite(_fp32(mask_value)),
    )


def _sparse_options(lists) -> dict:
    return dict(HAS_SPARSE=lists is not None, SPARSE_BLOCK=SPARSE_BLOCK)


def _kernel_mask(mask, lists, kv_walk: bool = False):
    """(the kernels' Mask argument, whether it is ranges): what the kernels need of the mask.

    None when the lists already say all it says: no block of the combined summary is PARTIAL
    (`KernelLists.no_partial`, known for eager calls only). EMPTY blocks are not walked and
    FULL ones load no mask anyway, but a kernel variant with HAS_MASK still pays for it.
    NB: H100, N=64K, a 128-aligned document mask (B=1, H=16, D=64 bf16): forward kernel
    7.19 ms with the mask variant, 5.63 ms without (benchmarks/profile_sparse.py, 2026-11-22);
    same config, 156 vs 126 registers.
    Else the row ranges, when every row of the mask keeps one interval of keys (sliding
    windows, documents, prefix-LM, padding; `KernelLists.ranges`, eager calls): the kernels
    compute PARTIAL tiles' keep-masks from them and load no mask tile.
    kv_walk (dK/dV, which walks the queries of a key block): the column ranges instead
    (`KernelLists.col_ranges`, COL_RANGES), else the mask itself. NB: H100, N=64K sliding window
    4096, dK/dV with per-step row ranges 5.76 ms against 5.65 ms loading the mask tiles
    (32x128/4 warps; benchmarks/config_probe.py, 2026-11-22 11:24), so row ranges are not used there.
    """
    if mask is not None and lists is not None:
        if lists.no_partial:
            return None, False
        ranges = lists.col_ranges if kv_walk else lists.ranges
        if ranges is not None:
            return ranges, True
    return mask, False


def _list_args(t: Optional[Tensor]):
    """(tensor, stride_z, stride_h, stride_row, row length in blocks) of packed lists; 0 on broadcast dims."""
    if t is None:
        return (None, 0, 0, 0, 0)
    return (t, *(0 if t.shape[i] == 1 else t.stride(i) for i in range(3)), (t.shape[-1] - 2) // 3)


_checked: set = set()


def _check_blocks(kind: str, kernel) -> None:
    # the sparse walk steps inside SPARSE_BLOCK-wide blocks: every config's tiles must divide it
    if id(kernel) in _checked:
        return
    for c in getattr(kernel, "configs", ()):
        for name in ("BLOCK_M", "BLOCK_N"):
            size = c.kwargs.get(name)
            assert size is None or SPARSE_BLOCK % size == 0, f"flashfuse: {kind} config {c} has {name}={size}, which does not divide SPARSE_BLOCK={SPARSE_BLOCK}"
    _checked.add(id(kernel))


class _Variant:
    """The rendered options of one kernel variant and its kernels, by kind (rendered on first use)."""

    def __init__(self, options: dict):
        self.options = options
        self._kernels: dict = {}

    def kernel(self, kind: str):
        fn = self._kernels.get(kind)
        if fn is None:
            fn = self._kernels[kind] = render.kernel(kind, self.options)
            _check_blocks(kind, fn)
        return fn


@functools.lru_cache(maxsize=None)
def _cached_variant(dtype, head_dim, has_bias, has_mask, causal, dropout, needs_dbias, head_dim_v, allow_tf32, interpret, cache_dir):
    # template_options reads the TF32 flag and TRITON_INTERPRET, render.kernel the cache dir: all in the key
    return _Variant(render.template_options(dtype, head_dim, has_bias, has_mask, causal, dropout, needs_dbias, head_dim_v=head_dim_v))


def _variant(q, k, v, bias, mask, causal, dropout, needs_dbias) -> _Variant:
    """This call's kernel variant, memoized: the launchers run this on every op call."""
    return _cached_variant(q.dtype, k.shape[-1], bias is not None, mask is not None, bool(causal), bool(dropout),
                           bool(needs_dbias), v.shape[-1], _allow_tf32(), configs.interpreting(), envvars.get("FLASHFUSE_CACHE_DIR"))


# -- per-call-signature plans ---------------------------------------------------------------------
#
# Everything a launch needs besides its tensors (strides, sizes, scalars, the kernel variant, the
# constexpr options, the grid) is a function of the inputs' shapes, strides, dtypes, devices and
# 16-byte alignments, the call's scalars, the lists' status and a few switches. A plan computes
# it once per such signature and keeps it as `launch.Prepared` launches; a repeated call looks
# the plan up and passes its tensors. Tensors outside the key are fresh allocations of this call
# (out, statistics, gradients, delta) or come from the lists cache, whose shapes the key holds.
# NB: an eager fwd+bwd with a mask took 179 us of Python host time before plans and 76-88 us
# after (benchmarks/host_profile.py --stub, CPU proxy; docs/architecture.md has the breakdown).

_plans: dict = {}
_MAX_PLANS = 512


def _tkey(t: Optional[Tensor]):
    """A tensor's part of a plan key: everything its launches specialize on except its data."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15 == 0)


def _lists_key(lists) -> Optional[tuple]:
    if lists is None:
        return None
    r, c = lists.ranges, lists.col_ranges
    return (lists.kv.shape, lists.q.shape, lists.no_partial, None if r is None else r.shape, None if c is None else c.shape)


def _env_key() -> tuple:
    # the switches the variant, the rendered kernels and the launch path read
    get = envvars.get
    return (get("TRITON_INTERPRET"), get("FLASHFUSE_CACHE_DIR"), get("FLASHFUSE_DIRECT_LAUNCH"), _allow_tf32())


def _plan(key: tuple, build):
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:  # many distinct signatures: start over rather than grow
            _plans.clear()
        plan = _plans[key] = build()
    return plan


def _prepared(kind: str, kernel, grid, static: tuple, kwargs: dict):
    # the one place plans make launches: benchmarks/kernel_resources.py swaps it to capture them
    return Prepared(kind, kernel, grid, static, kwargs)


def reset() -> None:
    """Forget plans and rendered variants (benchmarks that swap the configs call this)."""
    _plans.clear()
    _cached_variant.cache_clear()


def attention_forward(q, k, v, bias, mask, scale, causal, dropout_p, seed, group, mask_value, block_layout=None, reuse=None):
    """-> (out [B, Hq, M, Dv] as a transpose of a [B, M, Hq, Dv] tensor, m, log_l [B, Hq, M] fp32).

    block_layout: None or an int8 block summary [B|1, Hq|1, cdiv(M, 128), cdiv(N, 128)]
    (block_sparse.EMPTY blocks are not computed: their scores are -inf).
    reuse: a dict (an eager call's, ops._EagerAttention) that this call fills for the backward
    of the same call, which gets it back: the lists it used and its plan key, with which the
    backward skips its own lists lookup and most of its key (see attention_backward).
    """
    b, hq, m_len, d = q.shape
    n_len, dv = k.shape[2], v.shape[3]
    out = torch.empty((b, m_len, hq, dv), dtype=q.dtype, device=q.device).transpose(1, 2)
    m_stat = torch.empty((b, hq, m_len), dtype=torch.float32, device=q.device)
    log_l = torch.empty_like(m_stat)
    if b * hq * m_len == 0:
        return out, m_stat, log_l
    if n_len == 0 or dv == 0:
        # no keys: every row is fully masked (NaN out, as eager softmax over nothing gives)
        out.fill_(float("nan") if n_len == 0 else 0.0)
        m_stat.fill_(float("-inf") if n_len == 0 else 0.0)
        log_l.fill_(float("-inf") if n_len == 0 else 0.0)
        return out, m_stat, log_l

    lists = _lists(bias, mask, block_layout, mask_value, causal, m_len, n_len)
    kmask, ranges = _kernel_mask(mask, lists)
    seed_t = _seed_tensor(seed, q.device) if dropout_p > 0.0 else None
    key = ("fwd", _env_key(), _tkey(q), _tkey(k), _tkey(v), _tkey(bias), _tkey(kmask), ranges, _lists_key(lists),
           _tkey(seed_t), scale, causal, dropout_p, group, mask_value)
    plan = _plan(key, lambda: _forward_plan(q, k, v, bias, kmask, ranges, lists, out, scale, causal, dropout_p, group, mask_value))
    with _device_guard(q):
        plan(q, k, v, bias, kmask, seed_t, out, m_stat, log_l, None if lists is None else lists.kv)
    if reuse is not None and (lists is None or lists.no_partial is not None):
        # Only after the launch: a forward that raises falls back to the reference kernel,
        # whose outputs this key does not describe. Only cached lists (no_partial is known for
        # those alone): the backward's own lookup would find the same ones, or rebuild equal
        # ones from the same unchanged tensors.
        reuse["lists"], reuse["key"] = lists, (key, _tkey(mask))
    return out, m_stat, log_l


def _forward_plan(q, k, v, bias, mask, ranges, lists, out, scale, causal, dropout_p, group, mask_value):
    """The forward's launch for this call's signature; `mask` is the kernels' mask argument (`_kernel_mask`)."""
    b, hq, m_len, d = q.shape
    n_len, dv = k.shape[2], v.shape[3]
    mask_value, log2_domain, qk_scale, dropout, dropout_scale = _scalars(scale, bias, mask, mask_value, dropout_p)
    variant = _variant(q, k, v, bias, mask, causal, dropout, False)
    options = variant.options
    sparse = _sparse_options(lists)
    _, *kv_list_args = _list_args(None if lists is None else lists.kv)
    static = (
        *q.stride(), *k.stride(), *v.stride(), *_bcast_strides(bias), *_bcast_strides(mask), *out.stride(),
        *kv_list_args[:3],
        hq, group, m_len, n_len, kv_list_args[3], _bucket(m_len), _bucket(n_len),
        qk_scale, mask_value, philox.threshold(dropout_p) if dropout else 0, dropout_scale,
    )
    kwargs = dict(
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=options["block_d"], BLOCK_DV=options["block_dv"],
        IS_CAUSAL=bool(causal), HAS_BIAS=bias is not None, HAS_MASK=mask is not None, DROPOUT=dropout,
        LOG2_DOMAIN=log2_domain, DOT_PRECISION=options["input_precision"], **sparse, MASK_RANGES=ranges,
    )
    return _prepared("fwd", variant.kernel("fwd"), lambda meta: (-(-m_len // meta["BLOCK_M"]), b * hq), static, kwargs)


def _dbias_buffer(bias: Tensor, full_shape, skips: bool):
    """(buffer, atomic, row_bcast): fp32 zeros for atomics when bias broadcasts, else bias's dtype.

    skips: the kernels leave some tiles unvisited (causal, block-sparse): their dBias is 0.
    """
    broadcast = any(bias.shape[i] == 1 and full_shape[i] != 1 for i in range(3))
    if not broadcast:
        alloc = torch.zeros if skips else torch.empty
        return alloc(bias.shape, dtype=bias.dtype, device=bias.device), False, False
    row_bcast = bias.shape[2] == 1 and full_shape[2] != 1
    return torch.zeros(bias.shape, dtype=torch.float32, device=bias.device), True, row_bcast


def attention_backward(dout, q, k, v, bias, mask, out, m, log_l, scale, causal, dropout_p, seed, group, mask_value, needs_dbias,
                       block_layout=None, reuse=None):
    """-> (dq, dk, dv, dbias or None) with the shapes and dtypes of q, k, v, bias.

    reuse: what attention_forward left for this backward (its docstring), or None. Only for a
    backward that gets the forward's own inputs and outputs, as autograd hands them back: the
    forward's key then covers every input here but dout (out, m and log_l are the forward's
    fresh allocations, laid out by q, k and v) and the forward's mask.
    NB: an eager fwd+bwd with a mask took 76-82 us of Python host time before and 68-71 us with
    reuse (host_profile.py's stub launches, N=4K sliding window 1024, CPU machine, three runs
    each, 2026-11-22).
    """
    b, hq, m_len, d = q.shape
    n_len = k.shape[2]
    needs_dbias = bool(needs_dbias) and bias is not None
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if b * hq * m_len == 0 or n_len == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, (torch.zeros_like(bias) if needs_dbias else None)

    fwd_key = reuse.get("key") if reuse else None
    lists = reuse["lists"] if fwd_key is not None else _lists(bias, mask, block_layout, mask_value, causal, m_len, n_len)
    mask_kv, col_ranges = _kernel_mask(mask, lists, kv_walk=True)
    mask, ranges = _kernel_mask(mask, lists)
    seed_t = _seed_tensor(seed, q.device) if dropout_p > 0.0 else None
    m = m.contiguous()  # the forward's own [B, Hq, M] outputs: already contiguous, no copy
    log_l = log_l.contiguous()
    if fwd_key is not None:
        key = ("bwd", fwd_key, _env_key(), _tkey(dout), needs_dbias)
    else:
        key = ("bwd", _env_key(), _tkey(dout), _tkey(q), _tkey(k), _tkey(v), _tkey(bias), _tkey(mask), ranges, _tkey(mask_kv),
               col_ranges, _tkey(out), _tkey(m), _tkey(log_l), _lists_key(lists), _tkey(seed_t), scale, causal, dropout_p, group,
               mask_value, needs_dbias)
    plan = _plan(key, lambda: _BackwardPlan(dout, q, k, v, bias, mask, ranges, mask_kv, col_ranges, out, dq, dk, dv, lists, scale,
                                            causal, dropout_p, group, mask_value, needs_dbias))
    delta = torch.empty((b, hq, m_len), dtype=torch.float32, device=q.device)
    # LOG2_DOMAIN: the preprocess folds m and log_l into one row statistic, Lse, which dK/dV reads
    # in m's place; otherwise there is no Lse and dK/dV reads m and log_l
    lse = torch.empty_like(delta) if plan.log2_domain else None
    dbias_buf = plan.dbias_buffer(bias) if needs_dbias else None
    kv_lists, q_lists = (None, None) if lists is None else (lists.kv, lists.q)
    with _device_guard(q):
        plan.preprocess(out, dout, delta, m, log_l, lse)
        row_stat = m if lse is None else lse
        side = _side_stream(q) if _overlap(q, k, lists, causal) else None
        if side is not None:
            # dQ runs beside dK/dV (they read the same inputs and write different outputs), so
            # the SMs that one kernel's last wave leaves idle start the other's programs.
            # dK/dV, the longer one, is launched first. The join comes before returning, also
            # when a launch raises: every tensor dQ touched is then ordered before any later use
            # or reuse of its memory on the caller's stream.
            # NB: H100, D=128 quick grid, one machine (2026-11-22 17:45, against
            # FLASHFUSE_BWD_OVERLAP=0): fwd+bwd at N=64K documents of 2048 9.93 -> 9.48 ms,
            # documents of 512 3.60 -> 3.31, sliding window 4096 18.72 -> 18.02, N=16K documents
            # of 2048 2.46 -> 2.33; causal and documents of 8192 unchanged; N=64K sliding
            # window 1024 5.94 -> 6.18.
            overlap_stats["backward"] += 1
            main = torch.cuda.current_stream(q.device)
            side.fork.record(main)
            side.stream.wait_event(side.fork)
        plan.dkdv(q, k, v, bias, mask_kv, seed_t, dout, row_stat, log_l, delta, dk, dv, dbias_buf, q_lists)
        if side is None:
            plan.dq(q, k, v, bias, mask, seed_t, dout, m, log_l, delta, dq, kv_lists)
        else:
            torch.cuda.set_stream(side.stream)
            try:
                plan.dq(q, k, v, bias, mask, seed_t, dout, m, log_l, delta, dq, kv_lists)
            finally:
                torch.cuda.set_stream(main)
                side.join.record(side.stream)
                main.wait_event(side.join)
    dbias = None
    if needs_dbias:
        dbias = dbias_buf.to(bias.dtype) if plan.dbias_atomic else dbias_buf
    return dq, dk, dv, dbias


# FLASHFUSE_BWD_OVERLAP: unset, dQ runs beside dK/dV when the backward's work reaches
# OVERLAP_MIN_WORK (below, one stream); 1: always beside; 0: never (one kernel at a time, as a
# per-kernel profile wants them)
OVERLAP_ENV = "FLASHFUSE_BWD_OVERLAP"
# The backward's work in (head, query block, key block) visits x head dim, at SPARSE_BLOCK tiles,
# from which the side stream pays. Its fork and join cost host time (two event records, two
# waits, two stream switches), which an eager call whose GPU work is shorter than its host
# time pays in full, while the overlap's gain grows with the work.
# NB: H100 host, eager fwd+bwd with dQ always beside dK/dV against one stream, in alternating
# rounds (benchmarks/paired_cells.py at c88839c, 2026-11-22 19:43): cells of 2K-8K visits at
# D=64/128 (0.3-0.5 M here; 0.45-0.7 ms per call, host-bound) took 0.45-0.61 ms on one stream
# and 0.53-0.68 ms beside it, host time 460-570 against 540-650 us; N=16K documents of 2048 at D=128 (32K visits, 4.2 M) took 2.52 ms beside, 2.57 on
# one stream, and N=64K documents of 512 (4.2 M) 3.31 against 3.60 ms (17:45). 16K visits at
# D=128 is about 1 ms of backward on the H100.
OVERLAP_MIN_WORK = 16384 * 128


def _overlap(q: Tensor, k: Tensor, lists, causal: bool) -> bool:
    """Whether dQ runs beside dK/dV: FLASHFUSE_BWD_OVERLAP, else backward_work >= OVERLAP_MIN_WORK."""
    if not q.is_cuda:
        return False
    flag = envvars.get(OVERLAP_ENV, "")
    if flag in ("0", "1"):
        return flag == "1"
    return backward_work(q.shape, k.shape[2], lists, causal) >= OVERLAP_MIN_WORK


def backward_work(q_shape, n_len: int, lists, causal: bool) -> int:
    """(head, query block, key block) visits x head dim of a backward, at SPARSE_BLOCK tiles: the
    cached lists' blocks plus one tail block per query block row (one too many for rows whose
    last block is a listed full one: a sizing estimate); without a count (no lists, or uncached
    ones: compiled graphs) every block, half of them when causal."""
    b, hq, m_len, d = q_shape
    mb, nb = -(-m_len // SPARSE_BLOCK), -(-n_len // SPARSE_BLOCK)
    listed = None if lists is None else lists.listed
    if listed is not None:
        bs, hs = lists.kv.shape[:2]
        blocks = (listed + bs * hs * mb) * (b * hq // (bs * hs))
    else:
        blocks = b * hq * mb * nb // (2 if causal else 1)
    return blocks * d


# Side streams per thread and device: the reused fork / join events must not be recorded by
# another thread between one backward's record and its wait (the autograd engine runs a
# device's backward on one thread, but the launchers may be called from any).
_side_local = threading.local()
# backward calls that ran dQ on the side stream (tests assert on it: the backward runs on the
# autograd engine's thread, where the caller cannot see the thread-local streams)
overlap_stats: collections.Counter = collections.Counter()


class _SideStream:
    """The stream dQ runs on beside dK/dV, with the two events of its fork and join. The events
    are reused: a wait is enqueued on the event's state when it is issued, and each backward
    issues its waits before it records the event again (Stream.wait_stream made a new event per
    call)."""

    __slots__ = ("stream", "fork", "join")

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.fork = torch.cuda.Event()
        self.join = torch.cuda.Event()


def _side_stream(t: Tensor) -> Optional[_SideStream]:
    """dQ's side stream for t's CUDA device, made once per thread; None off CUDA."""
    if not t.is_cuda:
        return None
    streams = getattr(_side_local, "streams", None)
    if streams is None:
        streams = _side_local.streams = {}
    side = streams.get(t.device.index)
    if side is None:
        side = streams[t.device.index] = _SideStream(t.device)
    return side


class _BackwardPlan:
    """The backward's three launches for one call signature (see the plans section above)."""

    __slots__ = ("preprocess", "dkdv", "dq", "full_shape", "skips", "dbias_atomic", "log2_domain")

    def __init__(self, dout, q, k, v, bias, mask, ranges, mask_kv, col_ranges, out, dq, dk, dv, lists, scale, causal, dropout_p,
                 group, mask_value, needs_dbias):
        b, hq, m_len, d = q.shape
        hkv, n_len, dv_dim = k.shape[1], k.shape[2], v.shape[3]
        mask_value, log2_domain, qk_scale, dropout, dropout_scale = _scalars(scale, bias, mask, mask_value, dropout_p)
        variant = _variant(q, k, v, bias, mask, causal, dropout, needs_dbias)
        options = variant.options
        self.log2_domain = log2_domain
        _, *kv_list_args = _list_args(None if lists is None else lists.kv)
        _, *q_list_args = _list_args(None if lists is None else lists.q)
        self.full_shape, self.skips = (b, hq, m_len, n_len), bool(causal) or lists is not None
        if needs_dbias:
            buf, self.dbias_atomic, bias_row_bcast = _dbias_buffer(bias, self.full_shape, self.skips)
            db_strides = _bcast_strides(buf)
        else:
            self.dbias_atomic, bias_row_bcast, db_strides = False, False, (0, 0, 0, 0)
        common = dict(
            HEAD_DIM=d, HEAD_DIM_V=dv_dim, BLOCK_D=options["block_d"], BLOCK_DV=options["block_dv"],
            IS_CAUSAL=bool(causal), HAS_BIAS=bias is not None, HAS_MASK=mask is not None, DROPOUT=dropout,
            LOG2_DOMAIN=log2_domain, DOT_PRECISION=options["input_precision"], **_sparse_options(lists),
        )
        dropout_t = philox.threshold(dropout_p) if dropout else 0
        # q's strides serve dq, k's dk, v's dv: empty_like keeps a dense input's layout
        self.preprocess = _prepared(
            "bwd_preprocess", variant.kernel("bwd_preprocess"), lambda meta: (-(-m_len // meta["BLOCK_M"]), b * hq),
            (*out.stride(), *dout.stride(), hq, m_len, _bucket(m_len)),
            dict(HEAD_DIM_V=dv_dim, BLOCK_DV=options["block_dv"], LOG2_DOMAIN=log2_domain),
        )
        self.dkdv = _prepared(
            "bwd_dkdv", variant.kernel("bwd_dkdv"), lambda meta: (-(-n_len // meta["BLOCK_N"]), b * hkv),
            (*q.stride(), *k.stride(), *v.stride(), *_bcast_strides(bias), *_bcast_strides(mask_kv),
             *dout.stride(), *dk.stride(), *dv.stride(), *db_strides, *q_list_args[:3],
             hq, hkv, group, m_len, n_len, q_list_args[3], _bucket(m_len), _bucket(n_len),
             qk_scale, float(scale), mask_value, dropout_t, dropout_scale),
            dict(BIAS_GRAD=needs_dbias, DBIAS_ATOMIC=self.dbias_atomic, BIAS_ROW_BCAST=bias_row_bcast, **common,
                 COL_RANGES=col_ranges),
        )
        self.dq = _prepared(
            "bwd_dq", variant.kernel("bwd_dq"), lambda meta: (-(-m_len // meta["BLOCK_M"]), b * hq),
            (*q.stride(), *k.stride(), *v.stride(), *_bcast_strides(bias), *_bcast_strides(mask),
             *dout.stride(), *dq.stride(), *kv_list_args[:3],
             hq, group, m_len, n_len, kv_list_args[3], _bucket(m_len), _bucket(n_len),
             qk_scale, float(scale), mask_value, dropout_t, dropout_scale),
            dict(**common, MASK_RANGES=ranges),
        )

    def dbias_buffer(self, bias: Tensor) -> Tensor:
        return _dbias_buffer(bias, self.full_shape, self.skips)[0]
