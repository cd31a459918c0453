"""Per-block summaries of masks and biases, so the kernels skip empty blocks and load nothing on full ones.

For a [BLOCK_M, BLOCK_N] tile of the scores, a bool keep-mask (True = keep) is
    EMPTY   (0): every element masked      -> the kernels skip the tile
    FULL    (1): nothing masked            -> the kernels do not load the mask
    PARTIAL (2): otherwise                 -> the kernels load the mask
and an additive bias is EMPTY when every element is -inf, FULL when every element is 0.

Summaries keep the input's broadcast: a [1, 1, M, N] mask gives a [1, 1, Mb, Nb] summary,
computed once, not once per batch and head. Each element of the input is read once per
summary (one padded copy, one reduction; on the GPU `block_lists_triton` does it in one
kernel). For eager calls a summary is cached while the tensor object is alive and unchanged
(same storage, offset, strides and version counter), so one mask used by every layer is
summarized once per step; calls from compiled graphs do not cache, because compiled graphs
reuse buffers without moving version counters (see `caching`).

The kernels walk compact per-row-block lists built from the summary (as block-sparse
FlashAttention does): for each query block, the indices of its non-empty key blocks and
whether each is full; for each key block, the same over query blocks, for the dK/dV pass.
`lists_for` gives those lists; `kernel_lists` packs them the way the Triton kernels read
them (partial and full blocks in separate lists, the causal diagonal and ragged edge blocks
left to the kernels' bounds-checked tail), cached like the summaries.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from flashfuse import envvars
from flashfuse.kernels.configs import interpreting

EMPTY, FULL, PARTIAL = 0, 1, 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(t: Tensor, block_m: int, block_n: int, fill) -> Tensor:
    # [B, H, M, N] -> [B, H, Mb, bm, Nb, bn], padding the ragged edge with `fill`.
    # A dim of size 1 along M stays one row: it broadcasts over every query block.
    b, h, m, n = t.shape
    bm = block_m if m > 1 else 1
    mb, nb = _cdiv(m, bm), _cdiv(n, block_n)
    pad = (0, nb * block_n - n, 0, mb * bm - m)
    if any(pad):
        t = torch.nn.functional.pad(t, pad, value=fill)
    return t.reshape(b, h, mb, bm, nb, block_n)


def _valid_counts(m: int, n: int, bm: int, bn: int, device) -> Tensor:
    # Real (unpadded) elements of each [bm, bn] tile: [Mb, Nb].
    rows = torch.clamp(m - torch.arange(0, m, bm, device=device), max=bm)
    cols = torch.clamp(n - torch.arange(0, n, bn, device=device), max=bn)
    return (rows[:, None] * cols[None, :]).to(torch.int32)


def _collapse_expanded(t: Tensor) -> Tensor:
    # An expand()ed dim (stride 0) holds one distinct slice: summarize that one, as for size 1.
    for dim in range(3):
        if t.shape[dim] > 1 and t.stride(dim) == 0:
            t = t.narrow(dim, 0, 1)
    return t


def summarize(t: Tensor, block_m: int, block_n: int) -> Tensor:
    """int8 summary [B|1, H|1, Mb|1, Nb] of a 4-D bool keep-mask or additive bias.

    Dims of size 1, or expanded with stride 0, stay 1 in the summary (they broadcast).
    """
    t = _collapse_expanded(t)
    m, n = t.shape[-2:]
    bm = block_m if m > 1 else 1
    valid = _valid_counts(m, n, bm, block_n, t.device)
    if t.dtype == torch.bool:
        tiles = _tiles(t, block_m, block_n, False)  # padding counts as masked
        kept = tiles.sum(dim=(3, 5), dtype=torch.int32)
        empty, full = kept == 0, kept == valid
    else:
        tiles = _tiles(t, block_m, block_n, float("-inf"))  # padding counts as -inf
        neg_inf = torch.isneginf(tiles).sum(dim=(3, 5), dtype=torch.int32)
        zero = (tiles == 0).sum(dim=(3, 5), dtype=torch.int32)
        empty = neg_inf == tiles.shape[3] * tiles.shape[5]
        full = zero == valid
    # torch.where, not masked assignment: no host sync, so it can run inside a CUDA graph capture
    return torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)


@dataclasses.dataclass
class BlockLists:
    """Compact per-block work lists, broadcast dims kept at 1.

    kv_count [Bs, Hs, Mb]       non-empty key blocks of each query block
    kv_index [Bs, Hs, Mb, Nb]   their indices, first kv_count valid
    kv_full  [Bs, Hs, Mb, Nb]   1 where that block needs no mask load
    q_count / q_index / q_full: the same per key block over query blocks (for dK/dV)
    """

    kv_count: Tensor
    kv_index: Tensor
    kv_full: Tensor
    q_count: Tensor
    q_index: Tensor
    q_full: Tensor
    block_m: int
    block_n: int

    @property
    def density(self) -> float:
        return float(self.kv_count.sum()) / max(1, self.kv_index.numel())


def _lists(summary: Tensor):
    nonempty = summary != EMPTY
    count = nonempty.sum(-1, dtype=torch.int32)
    # Stable sort puts the non-empty blocks first, in increasing index order.
    order = torch.sort((~nonempty).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    full = torch.gather((summary == FULL).to(torch.int8), -1, order.long())
    return count.contiguous(), order.contiguous(), full.contiguous()


def combine(*summaries: Optional[Tensor]) -> Optional[Tensor]:
    """Summary of the elementwise combination of a mask and a bias (EMPTY wins, FULL needs both)."""
    present = [s for s in summaries if s is not None]
    if not present:
        return None
    out = present[0]
    for s in present[1:]:
        a, b = torch.broadcast_tensors(out, s)
        out = torch.where((a == EMPTY) | (b == EMPTY), EMPTY, torch.where((a == FULL) & (b == FULL), FULL, PARTIAL)).to(torch.int8)
    return out


def lists_from_summary(summary: Tensor, block_m: int, block_n: int) -> BlockLists:
    kv = _lists(summary)
    q = _lists(summary.transpose(-2, -1))
    return BlockLists(*kv, *q, block_m=block_m, block_n=block_n)


def from_layout(layout: Tensor, block_m: int, block_n: int) -> BlockLists:
    """User-given block layout [Mb, Nb], [H|1, Mb, Nb] or [B|1, H|1, Mb, Nb] of bools: True = compute the block."""
    while layout.dim() < 4:
        layout = layout.unsqueeze(0)
    summary = torch.where(layout.bool(), FULL, EMPTY).to(torch.int8)
    return lists_from_summary(summary, block_m, block_n)


class _Cache:
    """Summaries of live, unchanged tensors. A dead tensor object never matches (weakref)."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(t: Tensor, block_m: int, block_n: int):
        # Keyed on the tensor that owns the memory: a fresh view of one mask (`keep[None, None]`,
        # the rewrite's unsqueeze) hits. Views share their base's version counter.
        return (id(_owner(t)), t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version, block_m, block_n)

    def get(self, t: Tensor, block_m: int, block_n: int) -> Tensor:
        if not cacheable(t):
            return summarize(t, block_m, block_n)
        key = self._key(t, block_m, block_n)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is _owner(t):
            self.entries.move_to_end(key)
            self.hits += 1
            return hit[1]
        self.misses += 1
        summary = summarize(t, block_m, block_n)
        self.entries[key] = (weakref.ref(_owner(t)), summary)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return summary

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0


def _owner(t: Tensor) -> Tensor:
    return t if t._base is None else t._base


def keyable(t: Optional[Tensor]) -> bool:
    """Whether a cache key can prove `t` unchanged: not for inference tensors (no version
    counter) nor tensors without storage (fake tensors while tracing), which are not cached."""
    if t is None:
        return True
    try:
        return not t.is_inference() and t.data_ptr() is not None and t._version >= 0
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def cacheable(*tensors: Optional[Tensor]) -> bool:
    """Whether a call with these inputs reads and fills the caches: caching() is on and every
    input has a key."""
    return caching() and all(keyable(t) for t in tensors)


CACHE_ENV = "FLASHFUSE_MASK_CACHE"
# FLASHFUSE_MASK_RANGES=0: never pass an interval mask as row ranges (the kernels load it)
RANGES_ENV = "FLASHFUSE_MASK_RANGES"
_eager = threading.local()


class _EagerCall:
    """`with eager_call():` marks a call from `flashfuse.attention` / `block_sparse_attention` run
    eagerly (ops._EagerAttention). A class, not a generator context manager: it runs twice per
    eager fwd+bwd."""

    __slots__ = ("before",)

    def __enter__(self):
        self.before = getattr(_eager, "on", False)
        _eager.on = True

    def __exit__(self, *exc):
        _eager.on = self.before


def eager_call() -> _EagerCall:
    return _EagerCall()


def caching() -> bool:
    """Reuse summaries across calls: by default for eager calls only, never in a CUDA graph capture.

    FLASHFUSE_MASK_CACHE=1 turns the cache on for every call, =0 off for every call.

    The key (owner, storage, strides, version counter) proves a tensor unchanged only for writes
    that go through PyTorch's dispatcher. Inductor's generated kernels write buffers through raw
    pointers, and its memory planner hands a dead mask's buffer, same Python object and all, to
    the next mask of the same shape (per-layer sliding windows, masks recomputed in the
    backward): a cached summary would then skip the wrong blocks. So calls from compiled graphs
    summarize their mask afresh (one read of the mask, three kernel launches). Eager callers
    pass their own tensors, whose in-place writes move the version counter; writes that do not
    (through `.data`, or a raw pointer handed to another library) need FLASHFUSE_MASK_CACHE=0.
    """
    if _capturing():
        return False
    env = envvars.get(CACHE_ENV, "")
    if env in ("0", "1"):
        return env == "1"
    return getattr(_eager, "on", False)


def _capturing() -> bool:
    # Inside a CUDA graph capture the summary must be computed by captured kernels, so a replay
    # sees the inputs of that replay: no cached results go in or come out. (No capture can run
    # before CUDA is initialized, and is_initialized is the cheaper test.)
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


cache = _Cache()


def lists_for(bias: Optional[Tensor], mask: Optional[Tensor], block_m: int, block_n: int) -> Optional[BlockLists]:
    """Block lists for a call's bias and mask (None when neither is given)."""
    summaries = [cache.get(t, block_m, block_n) for t in (bias, mask) if t is not None]
    summary = combine(*summaries)
    return None if summary is None else lists_from_summary(summary, block_m, block_n)


# -- the Triton kernels' packed lists -------------------------------------------------------------


@dataclasses.dataclass
class KernelLists:
    """Block-sparse work lists as the Triton kernels read them, broadcast batch/head dims kept at 1.

    kv [Bs, Hs, Mb, 2 + 3 * Nb] int32, one row per query block r (forward and dQ):
        [n_partial, n_full, partial key blocks (Nb slots, first n_partial valid),
         full key blocks (Nb slots, first n_full valid), status of every key block (Nb)]
    q  [Bs, Hs, Nb, 2 + 3 * Mb] int32: the same per key block c over query blocks (dK/dV).

    The partial/full lists hold only blocks the kernels can walk with no bounds or causal
    checks; the kernels handle the rest from the status entries:
        kv: key blocks c < tail(r), tail(r) = min(r, N // block) if causal else N // block
            (the diagonal block or the ragged last one, whichever comes first);
        q:  query blocks r < M // block, and r > c if causal (the diagonal block c and the
            ragged last block are the tail).
    Status is the combined summary (EMPTY / FULL / PARTIAL) of mask, bias and layout.
    """

    kv: Tensor
    q: Tensor
    summary: Tensor  # mask, bias and layout combined, before the causal cut
    block: int
    causal: bool = False
    # No block of `summary` is PARTIAL, so the lists say all the mask says (the kernels then
    # drop it). Known only for cached (eager) lists: finding out costs one host sync.
    no_partial: Optional[bool] = None
    # The bool mask as row ranges (`row_ranges`): int32 [Bs, Hs, M|1, 2] of (lo, hi), set when
    # every row of the mask keeps one interval of keys lo <= j < hi. The kernels then compute
    # the keep-mask of a tile instead of loading it. Known only for cached (eager) lists of one
    # bool mask on the Triton path (the same host sync as no_partial).
    ranges: Optional[Tensor] = None
    # The same per key column: int32 [Bs, Hs, N, 2] of query intervals (lo, hi), set when every
    # column keeps one interval of queries (and the mask has more than one row). dK/dV, which
    # walks the queries of a fixed key block, computes its tiles from these (COL_RANGES).
    col_ranges: Optional[Tensor] = None
    # Blocks the kv lists hold (PARTIAL + FULL, over the lists' [Bs, Hs] dims; the tail blocks
    # the kernels take from the status entries are not in it). Known only for cached lists (the
    # same host sync); the backward sizes its work with it (triton_attention._overlap).
    listed: Optional[int] = None
    # (kept, first, last) per mask row / column from the summary pass, until build_cached reads them
    row_stats: Optional[Tensor] = None
    col_stats: Optional[Tensor] = None

    @property
    def density(self) -> float:
        """Fraction of (batch, head, query block, key block) tiles that are not EMPTY."""
        nonempty = self.summary != EMPTY
        if self.causal:
            mb, nb = self.summary.shape[-2:]
            above = torch.arange(nb, device=self.summary.device)[None, :] > torch.arange(mb, device=self.summary.device)[:, None]
            nonempty = nonempty & ~above
        return float(nonempty.float().mean())


def _compact(sel: Tensor):
    # [..., L] bool -> (count [...], indices [..., L]): the selected positions first, ascending.
    count = sel.sum(-1, dtype=torch.int32)
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return count, order


def _pack(status: Tensor, main: Tensor) -> Tensor:
    # status [..., R, L] int8, main [R, L] bool -> [..., R, 2 + 3 L] int32
    n_part, part = _compact((status == PARTIAL) & main)
    n_full, full = _compact((status == FULL) & main)
    return torch.cat([n_part[..., None], n_full[..., None], part, full, status.to(torch.int32)], dim=-1).contiguous()


def pack_lists(summary: Tensor, block: int, m: int, n: int, causal: bool) -> KernelLists:
    """KernelLists of a [Bs, Hs, Mb|1, Nb] summary at `block` granularity for M queries, N keys."""
    summary = given = _tiled(summary, block, m, n)
    mb, nb = summary.shape[-2:]
    r = torch.arange(mb, device=summary.device)[:, None]
    c = torch.arange(nb, device=summary.device)[None, :]
    if causal:
        # blocks above the diagonal hold no visible key
        summary = torch.where(c > r, EMPTY, summary).to(torch.int8)
        kv_main = c < torch.clamp(r, max=n // block)
        q_main = (r < m // block) & (r > c)
    else:
        kv_main = (c < n // block).expand(mb, nb)
        q_main = (r < m // block).expand(mb, nb)
    kv = _pack(summary, kv_main)
    q = _pack(summary.transpose(-2, -1), q_main.transpose(0, 1))
    return KernelLists(kv=kv, q=q, summary=given, block=block, causal=causal)


def _tiled(summary: Tensor, block: int, m: int, n: int) -> Tensor:
    """The summary expanded to [Bs, Hs, Mb, Nb] for M queries and N keys (a row-broadcast one repeats)."""
    mb, nb = _cdiv(m, block), _cdiv(n, block)
    if summary.shape[-1] != nb or summary.shape[-2] not in (1, mb):
        raise ValueError(f"flashfuse: block summary {tuple(summary.shape)} does not tile [{m}, {n}] in blocks of {block}")
    return summary.expand(*summary.shape[:2], mb, nb)


def _demote_empty(summary: Tensor) -> Tensor:
    return torch.where(summary == EMPTY, PARTIAL, summary).to(torch.int8)


class InputCache:
    """Values built from live, unchanged input tensors (same rule as _Cache), keyed with extra
    call arguments: the kernels' lists here, layout summaries in flashfuse.block_sparse_api."""

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    def get(self, tensors, extra, build, checked: bool = False):
        """The cached value for these tensors and `extra`, else build(); checked: the caller
        already found the tensors `cacheable`."""
        if not (checked or cacheable(*tensors)):
            return build()
        key = tuple(None if t is None else _Cache._key(t, 0, 0) for t in tensors) + tuple(extra)
        hit = self.entries.get(key)
        if hit is not None and all((ref is None and t is None) or (ref is not None and ref() is _owner(t)) for ref, t in zip(hit[0], tensors)):
            self.entries.move_to_end(key)
            return hit[1]
        value = build()
        self.entries[key] = (tuple(None if t is None else weakref.ref(_owner(t)) for t in tensors), value)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


kernel_list_cache = InputCache()


def kernel_lists(bias: Optional[Tensor], mask: Optional[Tensor], layout: Optional[Tensor], block: int,
                 m: int, n: int, causal: bool, finite_fill: bool) -> Optional[KernelLists]:
    """The Triton kernels' lists for one call (None when there is no bias, mask or layout).

    layout: an int8 summary at `block` granularity (EMPTY blocks are not computed at all).
    finite_fill: the mask's fill value is finite. Then a row whose keys are all masked is a
    uniform average over every key, masked blocks included, so mask/bias EMPTY blocks are
    walked like PARTIAL ones (FULL blocks still skip their loads); layout EMPTY blocks still go.
    """
    if bias is None and mask is None and layout is None:
        return None

    def build(row_stats: bool = False):
        given = [t for t in (bias, mask) if t is not None]
        if _on_triton(*given, layout) and layout is None and len(given) == 1:
            # the common call (one mask or one bias): one summary kernel, two pack kernels
            return _kernel_lists_triton(given[0], block, m, n, causal, finite_fill, row_stats=row_stats and mask is not None)
        summary = combine(*(cache.get(t, block, block) for t in given))
        if summary is not None and finite_fill:
            summary = _demote_empty(summary)
        summary = combine(summary, layout)
        if _on_triton(summary):
            return _pack_lists_triton(summary, block, m, n, causal)
        return pack_lists(summary, block, m, n, causal)

    def build_cached():
        lists = build(row_stats=ranges_on)
        found = [(name, *row_ranges(stats)) for name, stats in (("ranges", lists.row_stats), ("col_ranges", lists.col_stats))
                 if stats is not None]
        flags = [(lists.summary == PARTIAL).any()] + [ok for _, _, ok in found]
        listed = lists.kv[..., :2].sum(dtype=torch.int64)
        values = torch.cat([torch.stack(flags).to(torch.int64), listed[None]]).tolist()  # the one sync per cached mask
        lists.no_partial = not values[0]
        lists.listed = values[-1]
        for (name, ranges, _), ok in zip(found, values[1:-1]):
            if ok:
                setattr(lists, name, ranges)
        lists.row_stats = lists.col_stats = None
        return lists

    if not cacheable(bias, mask, layout):  # an uncached call: no sync for no_partial
        return build()
    ranges_on = envvars.get(RANGES_ENV, "1") != "0"
    return kernel_list_cache.get((bias, mask, layout), (block, m, n, bool(causal), bool(finite_fill), ranges_on), build_cached,
                                 checked=True)


def _on_triton(*tensors: Optional[Tensor]) -> bool:
    # the Triton list kernels run where the attention kernels do: CUDA, or the interpreter
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda or (t.device.type == "cpu" and interpreting()) for t in present)


def _kernel_lists_triton(t: Tensor, block: int, m: int, n: int, causal: bool, finite_fill: bool, row_stats: bool = False) -> KernelLists:
    from flashfuse.kernels import block_lists_triton

    t = _collapse_expanded(t)
    tm, tn = t.shape[-2:]
    summary = torch.empty((t.shape[0], t.shape[1], _cdiv(tm, block) if tm > 1 else 1, _cdiv(tn, block)), dtype=torch.int8, device=t.device)
    stats = _stats_buffer(t, tm, tn) if row_stats and t.dtype == torch.bool else None
    col_stats = _stats_buffer(t, tn, tm) if stats is not None and tm > 1 else None  # a row-broadcast mask: rows only
    block_lists_triton.summarize(t, block, summary, demote_empty=finite_fill, stats=stats, col_stats=col_stats)
    lists = _pack_lists_triton(summary, block, m, n, causal)
    lists.row_stats, lists.col_stats = stats, col_stats
    return lists


def _stats_buffer(t: Tensor, lines: int, length: int) -> Tensor:
    # (kept, first, last) per row (or column) of a [Bs, Hs, M, N] mask, before anything is seen
    init = torch.tensor([0, length, -1], dtype=torch.int32, device=t.device)
    return init.expand(*t.shape[:2], lines, 3).contiguous()


def row_stats(t: Tensor) -> Tensor:
    """(kept keys, first kept key, last kept key) per row of a 4-D bool mask: int32 [B, H, M, 3]
    (first = N, last = -1 for a row that keeps nothing). The torch oracle of the summary
    kernel's ROW_STATS pass; it builds int64 [B, H, M, N] temporaries, so it is for tests."""
    n = t.shape[-1]
    keys = torch.arange(n, device=t.device)
    kept = t.sum(-1, dtype=torch.int32)
    first = torch.where(t, keys, n).amin(-1)
    last = torch.where(t, keys, -1).amax(-1)
    return torch.stack([kept, first.to(torch.int32), last.to(torch.int32)], -1)


def row_ranges(stats: Tensor):
    """(ranges int32 [..., M, 2], is_ranges 0-dim bool tensor) from row statistics.

    Row i keeps the interval lo <= j < hi exactly when its kept count equals last - first + 1;
    a row that keeps nothing gets (0, 0). is_ranges: every row is such an interval, so
    `keep[i, j] == (lo_i <= j < hi_i)` for the whole mask. No host sync here.
    """
    kept, first, last = stats.unbind(-1)
    some = kept > 0
    is_ranges = (~some | (kept == last - first + 1)).all()
    ranges = torch.stack([torch.where(some, first, 0), torch.where(some, last + 1, 0)], -1).to(torch.int32).contiguous()
    return ranges, is_ranges


def _pack_lists_triton(summary: Tensor, block: int, m: int, n: int, causal: bool) -> KernelLists:
    """pack_lists computed by two Triton kernels (block_lists_triton.pack); same KernelLists."""
    from flashfuse.kernels import block_lists_triton

    summary = _tiled(summary, block, m, n)
    bs, hs, mb, nb = summary.shape
    kv = torch.empty((bs, hs, mb, 2 + 3 * nb), dtype=torch.int32, device=summary.device)
    q = torch.empty((bs, hs, nb, 2 + 3 * mb), dtype=torch.int32, device=summary.device)
    block_lists_triton.pack(summary, kv, n // block, causal, q_lists=False)
    block_lists_triton.pack(summary, q, m // block, causal, q_lists=True)
    return KernelLists(kv=kv, q=q, summary=summary, block=block, causal=causal)
