"""Launchers of the Triton attention kernels: the op's "triton" implementation.

Same signatures and semantics as `flashfuse/kernels/reference.py` (read its docstring for the
contract). The kernels are rendered from `flashfuse/templates/*.py.jinja` by
`flashfuse.kernels.render` and autotuned over `flashfuse.kernels.configs`.

    forward:  attn_fwd                     grid (cdiv(M, BLOCK_M), B * Hq)
    backward: attn_bwd_preprocess (delta)  grid (cdiv(M, BLOCK_M), B * Hq)
              attn_bwd_dkdv                grid (cdiv(N, BLOCK_N), B * Hkv)   no atomics for dk/dv
              attn_bwd_dq                  grid (cdiv(M, BLOCK_M), B * Hq)

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
calls the compiled kernel directly once a launch with the same arguments has been seen.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

import triton
from flashfuse.kernels import block_sparse, configs, philox, render
from flashfuse.kernels.launch import launch as _launch

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


def _sparse(bias, mask, block_layout, mask_value: float, causal: bool, m_len: int, n_len: int):
    """(lists or None, HAS_SPARSE constexpr kwargs): block_sparse.KernelLists for this call."""
    lists = block_sparse.kernel_lists(
        bias, mask, block_layout, SPARSE_BLOCK, m_len, n_len, bool(causal),
        finite_fill=mask is not None and math.isfinite(mask_value),
    )
    return lists, dict(HAS_SPARSE=lists is not None, SPARSE_BLOCK=SPARSE_BLOCK)


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
                           bool(needs_dbias), v.shape[-1], torch.backends.cuda.matmul.allow_tf32, configs.interpreting(),
                           os.environ.get("FLASHFUSE_CACHE_DIR"))


def attention_forward(q, k, v, bias, mask, scale, causal, dropout_p, seed, group, mask_value, block_layout=None):
    """-> (out [B, Hq, M, Dv] as a transpose of a [B, M, Hq, Dv] tensor, m, log_l [B, Hq, M] fp32).

    block_layout: None or an int8 block summary [B|1, Hq|1, cdiv(M, 128), cdiv(N, 128)]
    (block_sparse.EMPTY blocks are not computed: their scores are -inf).
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

    lists, sparse = _sparse(bias, mask, block_layout, _fp32(mask_value), causal, m_len, n_len)
    mask, ranges = _kernel_mask(mask, lists)
    mask_value, log2_domain, qk_scale, dropout, dropout_scale = _scalars(scale, bias, mask, mask_value, dropout_p)
    variant = _variant(q, k, v, bias, mask, causal, dropout, False)
    options, kernel = variant.options, variant.kernel("fwd")
    seed_t = _seed_tensor(seed, q.device) if dropout else None
    kv_lists, *kv_list_args = _list_args(None if lists is None else lists.kv)

    def grid(meta):
        return (triton.cdiv(m_len, meta["BLOCK_M"]), b * hq)

    with _device_guard(q):
        _launch(
            "fwd", kernel, grid,
            q, k, v, bias, mask, seed_t, out, m_stat, log_l, kv_lists,
            *q.stride(), *k.stride(), *v.stride(), *_bcast_strides(bias), *_bcast_strides(mask), *out.stride(),
            *kv_list_args[:3],
            hq, group, m_len, n_len, kv_list_args[3], _bucket(m_len), _bucket(n_len),
            qk_scale, mask_value, philox.threshold(dropout_p) if dropout else 0, dropout_scale,
            HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=options["block_d"], BLOCK_DV=options["block_dv"],
            IS_CAUSAL=bool(causal), HAS_BIAS=bias is not None, HAS_MASK=mask is not None, DROPOUT=dropout,
            LOG2_DOMAIN=log2_domain, DOT_PRECISION=options["input_precision"], **sparse, MASK_RANGES=ranges,
        )
    return out, m_stat, log_l


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
                       block_layout=None):
    """-> (dq, dk, dv, dbias or None) with the shapes and dtypes of q, k, v, bias."""
    b, hq, m_len, d = q.shape
    hkv, n_len, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    needs_dbias = bool(needs_dbias) and bias is not None
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if b * hq * m_len == 0 or n_len == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, (torch.zeros_like(bias) if needs_dbias else None)

    lists, sparse = _sparse(bias, mask, block_layout, _fp32(mask_value), causal, m_len, n_len)
    mask_kv, col_ranges = _kernel_mask(mask, lists, kv_walk=True)
    mask, ranges = _kernel_mask(mask, lists)
    mask_value, log2_domain, qk_scale, dropout, dropout_scale = _scalars(scale, bias, mask, mask_value, dropout_p)
    variant = _variant(q, k, v, bias, mask, causal, dropout, needs_dbias)
    options = variant.options
    seed_t = _seed_tensor(seed, q.device) if dropout else None
    m = m.contiguous()  # the forward's own [B, Hq, M] outputs: already contiguous, no copy
    log_l = log_l.contiguous()
    delta = torch.empty((b, hq, m_len), dtype=torch.float32, device=q.device)
    kv_lists, *kv_list_args = _list_args(None if lists is None else lists.kv)
    q_lists, *q_list_args = _list_args(None if lists is None else lists.q)
    if needs_dbias:
        dbias_buf, dbias_atomic, bias_row_bcast = _dbias_buffer(bias, (b, hq, m_len, n_len), bool(causal) or lists is not None)
        db_strides = _bcast_strides(dbias_buf)
    else:
        dbias_buf, dbias_atomic, bias_row_bcast = None, False, False
        db_strides = (0, 0, 0, 0)
    common = dict(
        HEAD_DIM=d, HEAD_DIM_V=dv_dim, BLOCK_D=options["block_d"], BLOCK_DV=options["block_dv"],
        IS_CAUSAL=bool(causal), HAS_BIAS=bias is not None, HAS_MASK=mask is not None, DROPOUT=dropout,
        LOG2_DOMAIN=log2_domain, DOT_PRECISION=options["input_precision"], **sparse,
    )
    dropout_t = philox.threshold(dropout_p) if dropout else 0
    k_dkdv, k_dq = variant.kernel("bwd_dkdv"), variant.kernel("bwd_dq")

    with _device_guard(q):
        _launch(
            "bwd_preprocess", variant.kernel("bwd_preprocess"), lambda meta: (triton.cdiv(m_len, meta["BLOCK_M"]), b * hq),
            out, dout, delta, *out.stride(), *dout.stride(), hq, m_len, _bucket(m_len),
            HEAD_DIM_V=dv_dim, BLOCK_DV=options["block_dv"],
        )
        _launch(
            "bwd_dkdv", k_dkdv, lambda meta: (triton.cdiv(n_len, meta["BLOCK_N"]), b * hkv),
            q, k, v, bias, mask_kv, seed_t, dout, m, log_l, delta, dk, dv, dbias_buf, q_lists,
            *q.stride(), *k.stride(), *v.stride(), *_bcast_strides(bias), *_bcast_strides(mask_kv),
            *dout.stride(), *dk.stride(), *dv.stride(), *db_strides, *q_list_args[:3],
            hq, hkv, group, m_len, n_len, q_list_args[3], _bucket(m_len), _bucket(n_len),
            qk_scale, float(scale), mask_value, dropout_t, dropout_scale,
            BIAS_GRAD=needs_dbias, DBIAS_ATOMIC=dbias_atomic, BIAS_ROW_BCAST=bias_row_bcast,
            **common, COL_RANGES=col_ranges,
        )
        _launch(
            "bwd_dq", k_dq, lambda meta: (triton.cdiv(m_len, meta["BLOCK_M"]), b * hq),
            q, k, v, bias, mask, seed_t, dout, m, log_l, delta, dq, kv_lists,
            *q.stride(), *k.stride(), *v.stride(), *_bcast_strides(bias), *_bcast_strides(mask),
            *dout.stride(), *dq.stride(), *kv_list_args[:3],
            hq, group, m_len, n_len, kv_list_args[3], _bucket(m_len), _bucket(n_len),
            qk_scale, float(scale), mask_value, dropout_t, dropout_scale,
            **common, MASK_RANGES=ranges,
        )

    dbias = None
    if needs_dbias:
        dbias = dbias_buf.to(bias.dtype) if dbias_atomic else dbias_buf
    return dq, dk, dv, dbias

