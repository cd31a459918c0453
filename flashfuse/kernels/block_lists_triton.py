"""Block summaries and packed kernel lists on the GPU: three small Triton launches per call.

`block_sparse.summarize` and `block_sparse.pack_lists` compute the same thing with ~40 torch
ops (pad, reshape, reductions, a stable sort per list); they stay the readable oracle that the
tests compare these kernels against, element for element.

    summarize:  grid (Mb|1, cdiv(Nb, COLS_PER_PROGRAM), Bs * Hs)  one program per query-block
                row and run of key blocks of one (batch, head) of the mask/bias; it reads each
                element once and writes EMPTY / FULL / PARTIAL (int8) per block. For a bool
                mask it can also gather, in the same read, each row's kept count and first /
                last kept key (atomics across the programs of a row): the row ranges.
    pack:       grid (rows, Bs * Hs), launched twice  one program per list row: kv lists (row = query block,
                entries = key blocks) or, with the summary's strides swapped, q lists (row =
                key block, entries = query blocks). A prefix sum places the partial and full
                blocks first, in increasing order, then the others, as the stable sort does.

NB: on an H100 (2026-11-22, HF GPT-2 small with its mask reaching the op as a tensor) the
torch path issued ~40 aten launches per op call: a 4-layer training step took 23.8 ms against
17.8 ms for SDPA + Inductor, and the 12-layer step 70.7 ms. With these kernels (three launches
per call, none waiting on the GPU) the 12-layer step took 35.5 ms (benchmarks/results/NOTES.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashfuse.kernels.launch import launch as _launch

# block_sparse.EMPTY / FULL / PARTIAL, as constexprs the kernels can read
EMPTY: tl.constexpr = tl.constexpr(0)
FULL: tl.constexpr = tl.constexpr(1)
PARTIAL: tl.constexpr = tl.constexpr(2)


def _single(fn):
    # One config: the autotuner never benchmarks it, and the launch takes the direct path
    # (flashfuse.kernels.launch) from the second call on.
    return triton.autotune(configs=[triton.Config({}, num_warps=4)], key=[])(fn)


@_single
@triton.jit
def _summary_kernel(
    t_ptr, out_ptr, stats_ptr, col_stats_ptr,
    stride_tz, stride_th, stride_tm, stride_tn,
    stride_oz, stride_oh, stride_om, stride_on,
    stride_sz, stride_sh, stride_sm,
    stride_cz, stride_ch, stride_cn,
    heads, m_len, n_len, n_blocks,
    IS_BOOL: tl.constexpr, DEMOTE_EMPTY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COLS_PER_PROGRAM: tl.constexpr, ROW_STATS: tl.constexpr, COL_STATS: tl.constexpr,
):
    row = tl.program_id(0)
    c_first = tl.program_id(1) * COLS_PER_PROGRAM
    zh = tl.program_id(2)
    z = zh // heads
    h = zh % heads
    # int64 offsets: a [64K, 64K] mask has 2^32 elements
    offs_m = row * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    in_m = offs_m < m_len
    rows_valid = tl.minimum(m_len - row * BLOCK_M, BLOCK_M)
    base = t_ptr + z.to(tl.int64) * stride_tz + h.to(tl.int64) * stride_th + offs_m.to(tl.int64)[:, None] * stride_tm
    out_base = out_ptr + z.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh + row.to(tl.int64) * stride_om
    if ROW_STATS:
        # per row of this program's key range: kept keys, first and last kept key
        row_kept = tl.zeros([BLOCK_M], dtype=tl.int32)
        row_first = tl.full([BLOCK_M], n_len, dtype=tl.int32)
        row_last = tl.full([BLOCK_M], -1, dtype=tl.int32)
    for c in range(c_first, tl.minimum(c_first + COLS_PER_PROGRAM, n_blocks)):
        cols = c * BLOCK_N + offs_n
        inb = in_m[:, None] & (cols[None, :] < n_len)
        valid = rows_valid * tl.minimum(n_len - c * BLOCK_N, BLOCK_N)
        ptrs = base + cols.to(tl.int64)[None, :] * stride_tn
        if IS_BOOL:
            keep = tl.load(ptrs, mask=inb, other=0) != 0
            keep_i = keep.to(tl.int32)
            per_row = tl.sum(keep_i, 1)
            kept = tl.sum(per_row, 0)
            if ROW_STATS:
                row_kept += per_row
                row_first = tl.minimum(row_first, tl.min(tl.where(keep, cols[None, :], n_len), 1))
                row_last = tl.maximum(row_last, tl.max(tl.where(keep, cols[None, :], -1), 1))
            if COL_STATS:
                # the same per key column over this program's rows, merged across row blocks at once
                col_kept = tl.sum(keep_i, 0)
                cp = col_stats_ptr + z.to(tl.int64) * stride_cz + h.to(tl.int64) * stride_ch + cols.to(tl.int64) * stride_cn
                some_c = (cols < n_len) & (col_kept > 0)
                tl.atomic_add(cp, col_kept, mask=some_c, sem="relaxed")
                tl.atomic_min(cp + 1, tl.min(tl.where(keep, offs_m[:, None], m_len), 0), mask=some_c, sem="relaxed")
                tl.atomic_max(cp + 2, tl.max(tl.where(keep, offs_m[:, None], -1), 0), mask=some_c, sem="relaxed")
            empty = kept == 0
            full = kept == valid
        else:
            x = tl.load(ptrs, mask=inb, other=float("-inf")).to(tl.float32)
            n_neg_inf = tl.sum(tl.sum((x == float("-inf")).to(tl.int32), 1), 0)
            n_zero = tl.sum(tl.sum(((x == 0.0) & inb).to(tl.int32), 1), 0)
            empty = n_neg_inf == BLOCK_M * BLOCK_N  # the ragged edge is padded with -inf, as in block_sparse._tiles
            full = n_zero == valid
        status = tl.where(empty, EMPTY, tl.where(full, FULL, PARTIAL))
        if DEMOTE_EMPTY:
            status = tl.where(status == EMPTY, PARTIAL, status)
        tl.store(out_base + c * stride_on, status.to(tl.int8))
    if ROW_STATS:
        # programs of one row meet here; rows with nothing kept in this range leave the
        # initial (0, n_len, -1) alone, so sparse masks issue few atomics
        sp = stats_ptr + z.to(tl.int64) * stride_sz + h.to(tl.int64) * stride_sh + offs_m.to(tl.int64) * stride_sm
        some = in_m & (row_kept > 0)
        tl.atomic_add(sp, row_kept, mask=some, sem="relaxed")
        tl.atomic_min(sp + 1, row_first, mask=some, sem="relaxed")
        tl.atomic_max(sp + 2, row_last, mask=some, sem="relaxed")


@_single
@triton.jit
def _pack_kernel(
    s_ptr, out_ptr,
    stride_sz, stride_sh, stride_srow, stride_sent,
    stride_oz, stride_oh, stride_orow,
    heads, n_entries, main_limit,
    IS_CAUSAL: tl.constexpr, Q_LISTS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # One list row. kv lists: row r = query block, entry c = key block. q lists: row c = key
    # block, entry r = query block (the summary read through swapped strides).
    row = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // heads
    h = zh % heads
    idx = tl.arange(0, BLOCK_L)
    valid = idx < n_entries
    status = tl.load(s_ptr + z.to(tl.int64) * stride_sz + h.to(tl.int64) * stride_sh + row * stride_srow + idx * stride_sent,
                     mask=valid, other=EMPTY).to(tl.int32)
    if Q_LISTS:
        r = idx
        c = row
    else:
        r = row
        c = idx
    if IS_CAUSAL:
        status = tl.where(c > r, EMPTY, status)  # blocks above the diagonal hold no visible key
    # main_limit: N // block (kv lists) or M // block (q lists); see block_sparse.pack_lists
    if Q_LISTS:
        main = r < main_limit
        if IS_CAUSAL:
            main = main & (r > c)
    else:
        if IS_CAUSAL:
            main = c < tl.minimum(r, main_limit)
        else:
            main = c < main_limit
    out = out_ptr + z.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh + row * stride_orow
    _compact(out, out + 2, idx, valid, valid & main & (status == PARTIAL))
    _compact(out + 1, out + 2 + n_entries, idx, valid, valid & main & (status == FULL))
    tl.store(out + 2 + 2 * n_entries + idx, status, mask=valid)


@triton.jit
def _compact(count_ptr, list_ptr, idx, valid, sel):
    # The selected indices first, ascending, then the rest, ascending (a stable sort's order).
    sel_i = sel.to(tl.int32)
    count = tl.sum(sel_i, 0)
    pos = tl.where(sel, tl.cumsum(sel_i, 0) - 1, count + tl.cumsum((valid & (sel == 0)).to(tl.int32), 0) - 1)
    tl.store(count_ptr, count)
    tl.store(list_ptr + pos, idx, mask=valid)


# Key blocks one summary program walks. NB: on an H100 a whole row of key blocks per program
# (128 programs at N=16K) took ~0.3 ms per [16K, 16K] bool mask (block_sparse_20261122-055231:
# flashfuse_op vs flashfuse_layout), several times the 268 MB read at memory bandwidth.
COLS_PER_PROGRAM = 8


def summarize(t, block: int, out, demote_empty: bool = False, stats=None, col_stats=None) -> None:
    """Fill `out` [Bs, Hs, Mb|1, Nb] int8 with the summary of a 4-D bool mask or additive bias
    whose stride-0 dims were already collapsed to size 1 (block_sparse._collapse_expanded).

    stats: None, or (bool masks) an int32 [Bs, Hs, M, 3] filled with (0, N, -1), which the same
    pass over the mask turns into (kept keys, first kept key, last kept key) per query row
    (block_sparse.row_ranges reads it). col_stats: the same per key column over query rows,
    [Bs, Hs, N, 3] filled with (0, M, -1), for a mask with M > 1 rows.
    """
    bs, hs, m, n = t.shape
    block_m = block if m > 1 else 16  # a row-broadcast bias: one valid row, masked tile
    nb = out.shape[3]
    grid = (out.shape[2], -(-nb // COLS_PER_PROGRAM), bs * hs)
    row_stats = stats is not None
    assert not row_stats or t.dtype == torch.bool
    stats_strides = stats.stride()[:3] if row_stats else (0, 0, 0)
    assert col_stats is None or (t.dtype == torch.bool and m > 1)
    col_strides = col_stats.stride()[:3] if col_stats is not None else (0, 0, 0)
    _launch(
        "block_summary", _summary_kernel, grid, t, out, stats, col_stats, *t.stride(), *out.stride(), *stats_strides, *col_strides,
        hs, m, n, nb,
        IS_BOOL=t.dtype == torch.bool, DEMOTE_EMPTY=bool(demote_empty), BLOCK_M=block_m, BLOCK_N=block,
        COLS_PER_PROGRAM=COLS_PER_PROGRAM, ROW_STATS=row_stats, COL_STATS=col_stats is not None,
    )


def pack(summary, out, main_limit: int, causal: bool, q_lists: bool) -> None:
    """Fill `out` [Bs, Hs, rows, 2 + 3 L] int32 from `summary` [Bs, Hs, Mb, Nb] (dims 2/3 may be expanded)."""
    bs, hs = summary.shape[:2]
    sz, sh, sm, sn = summary.stride()
    if q_lists:
        rows, entries, s_row, s_ent = summary.shape[3], summary.shape[2], sn, sm
    else:
        rows, entries, s_row, s_ent = summary.shape[2], summary.shape[3], sm, sn
    _launch(
        "block_pack", _pack_kernel, (rows, bs * hs), summary, out, sz, sh, s_row, s_ent, *out.stride()[:3],
        hs, entries, main_limit, IS_CAUSAL=bool(causal), Q_LISTS=bool(q_lists), BLOCK_L=max(16, 1 << (entries - 1).bit_length()),
    )
