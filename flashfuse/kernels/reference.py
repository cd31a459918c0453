"""The reference kernel: a tiled online softmax in plain torch, forward and recompute backward.

Notation (the op's contract, shared by every kernel):
    q: [B, Hq, M, D]   k: [B, Hkv, N, D]   v: [B, Hkv, N, Dv]   G = Hq // Hkv (GQA group)
    bias: None or 4-D, broadcastable to [B, Hq, M, N]   mask: None or bool 4-D, same; True = keep
    s = scale * q @ k^T + bias
    s = where(mask, s, mask_value)            # the user's fill value, -inf or finite
    s = where(j <= i, s, -inf) if causal      # top-left aligned, like torch.tril
    s = where(layout[i // 128, j // 128] != EMPTY, s, -inf) if block_layout is given
    p = softmax(s, -1);  p = p * keep / (1 - dropout_p)  (keep from flashfuse.kernels.philox)
    out = p @ v: [B, Hq, M, Dv]
    logsumexp(s, -1) = m + log_l, both [B, Hq, M] fp32: m the row max, log_l = log(sum exp(s - m))

block_layout: None or an int8 block summary [B|1, Hq|1, cdiv(M, 128), cdiv(N, 128)]
(`flashfuse.kernels.block_sparse`: EMPTY = 0 blocks are not computed, i.e. -inf like causal).
The Triton kernels skip those blocks; this kernel masks them.

In the backward, dS is zero wherever the mask replaced a score (its fill value is a constant),
so dq, dk and dbias get nothing from those positions even when the fill value is finite; with
a mask, the causal positions are zeroed too, so a row that mask and causal leave empty gets
eager's zero dS rather than NaN.
The logsumexp stays an unevaluated sum because masks filled with finfo.min put m near
-3.4e38, where one fp32 number cannot also hold log_l; the backward needs s - m exactly as the
forward had it. A row whose every key is at -inf gives NaN, as eager softmax does.

It walks key blocks of BLOCK_N columns, so it holds [B, Hq, M, BLOCK_N] scores at a time and
never the M x N matrix; the backward recomputes each block's probabilities from lse. It is
the kernel the op runs on the CPU; the readable oracle the tests compare against is
`tests/oracle.py`, which this module never imports.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashfuse.kernels import philox

BLOCK_N = 256
# NB: query rows are taken BLOCK_M at a time too. Forward+backward peak at N=4096, D=64, fp32
# (CPU profiler): 29 MiB with key tiling alone, 7.3 MiB with BLOCK_M=512; the N x N scores
# alone are 64 MiB, and eager attention peaked at 193 MiB.
BLOCK_M = 512
# Granularity of block_layout (the Triton launcher's SPARSE_BLOCK).
LAYOUT_BLOCK = 128


def _grouped(q: Tensor, group: int) -> Tensor:
    # [B, Hq, M, D] -> [B, Hkv, G, M, D]: q heads h = kvh * G + g share kv head kvh.
    b, hq, m, d = q.shape
    return q.reshape(b, hq // group, group, m, d)


def _block_view(t: Optional[Tensor], group: int, cols: slice) -> Optional[Tensor]:
    # A broadcastable [b, h, m, n] bias/mask sliced to key columns, viewed as [b, hkv|1, G|1, m, n].
    if t is None:
        return None
    t = t[..., cols]
    b, h, m, n = t.shape
    if h == 1:
        return t.unsqueeze(2)
    return t.reshape(b, h // group, group, m, n)


def _rows(t: Optional[Tensor], rows: slice) -> Optional[Tensor]:
    # Query rows of a bias/mask; a dim of size 1 broadcasts over every row.
    return t if t is None or t.shape[2] == 1 else t[:, :, rows]


def _layout_rows(layout: Optional[Tensor], rows: slice) -> Optional[Tensor]:
    # The block layout expanded to these query rows (its query-block dim indexed per row).
    if layout is None or layout.shape[2] == 1:
        return layout
    idx = torch.arange(rows.start, rows.stop, device=layout.device) // LAYOUT_BLOCK
    return layout.index_select(2, idx)


def _layout_keep(layout: Optional[Tensor], group: int, start: int, stop: int) -> Optional[Tensor]:
    # [B|1, H|1, m, Nb] layout rows -> bool keep of key columns [start, stop), viewed like _block_view.
    if layout is None:
        return None
    idx = torch.arange(start, stop, device=layout.device) // LAYOUT_BLOCK
    keep = layout.index_select(3, idx) != 0
    return _block_view(keep, group, slice(None))


def _scores(qg, k, bias, mask, scale, causal, mask_value, group, start, stop, row0=0, layout=None):
    """Scores of key block [start, stop) in fp32: [B, Hkv, G, M, n_blk]. layout: _layout_rows of these rows."""
    cols = slice(start, stop)
    kb = k[:, :, None, start:stop].to(qg.dtype)
    s = torch.matmul(qg, kb.transpose(-2, -1)) * scale
    bias_b = _block_view(bias, group, cols)
    if bias_b is not None:
        s = s + bias_b.to(s.dtype)
    mask_b = _block_view(mask, group, cols)
    if mask_b is not None:
        s = torch.where(mask_b, s, torch.tensor(mask_value, dtype=s.dtype, device=s.device))
    if causal:
        m = qg.shape[-2]
        rows = torch.arange(row0, row0 + m, device=s.device).view(m, 1)
        keys = torch.arange(start, stop, device=s.device).view(1, -1)
        s = s.masked_fill(keys > rows, float("-inf"))
    layout_b = _layout_keep(layout, group, start, stop)
    if layout_b is not None:
        s = torch.where(layout_b, s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    return s


def _keep(seed, dropout_p, shape, group, start, stop, device, row0=0):
    b, hkv, _, m, _ = shape
    bh = torch.arange(b * hkv * group, device=device).view(b, hkv, group, 1, 1)
    rows = torch.arange(row0, row0 + m, device=device).view(1, 1, 1, m, 1)
    cols = torch.arange(start, stop, device=device).view(1, 1, 1, 1, -1)
    return philox.keep_mask_block(seed, dropout_p, bh, rows, cols)


def _acc_dtype(q: Tensor) -> torch.dtype:
    # fp32 accumulation, as the GPU kernels do; fp64 inputs (tests) stay in fp64.
    return torch.promote_types(q.dtype, torch.float32)


def _finite_max(m: Tensor) -> Tensor:
    # A row with no unmasked key so far has max -inf; subtracting it would give NaN.
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def attention_forward(q, k, v, bias, mask, scale, causal, dropout_p, seed, group, mask_value, block_layout=None):
    b, hq, m, _ = q.shape
    dv = v.shape[-1]
    seed_val = int(seed.item()) if dropout_p > 0 else 0
    # Physical layout [B, M, Hq, Dv], so the usual transpose(1, 2).reshape after attention is free.
    out = torch.empty((b, m, hq, dv), dtype=q.dtype, device=q.device).transpose(1, 2)
    m_stat = torch.empty((b, hq, m), dtype=torch.float32, device=q.device)
    log_l = torch.empty_like(m_stat)
    for r0 in range(0, m, BLOCK_M):
        rows = slice(r0, min(r0 + BLOCK_M, m))
        o, mi, li = _forward_rows(
            q[:, :, rows], k, v, _rows(bias, rows), _rows(mask, rows), scale, causal, dropout_p, seed_val, group, mask_value, r0,
            _layout_rows(block_layout, rows),
        )
        out[:, :, rows] = o
        m_stat[:, :, rows] = mi.float()
        log_l[:, :, rows] = li.float()
    return out, m_stat, log_l


def _forward_rows(q, k, v, bias, mask, scale, causal, dropout_p, seed_val, group, mask_value, row0, layout=None):
    b, hq, m, _ = q.shape
    n, dv = k.shape[-2], v.shape[-1]
    acc_dtype = _acc_dtype(q)
    qg = _grouped(q, group).to(acc_dtype)
    shape5 = (b, hq // group, group, m, 1)
    m_i = torch.full(shape5, float("-inf"), device=q.device, dtype=acc_dtype)
    l_i = torch.zeros(shape5, device=q.device, dtype=acc_dtype)
    acc = torch.zeros(shape5[:-1] + (dv,), device=q.device, dtype=acc_dtype)
    for start in range(0, n, BLOCK_N):
        stop = min(start + BLOCK_N, n)
        s = _scores(qg, k, bias, mask, scale, causal, mask_value, group, start, stop, row0, layout)
        # -- update m_i and l_i --
        m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
        m_safe = _finite_max(m_new)
        alpha = torch.exp(m_i - m_safe)
        p = torch.exp(s - m_safe)
        l_i = l_i * alpha + p.sum(-1, keepdim=True)
        # -- update the output accumulator --
        if dropout_p > 0:
            keep = _keep(seed_val, dropout_p, s.shape, group, start, stop, q.device, row0)
            p = torch.where(keep, p / (1.0 - dropout_p), torch.zeros_like(p))
        acc = acc * alpha + torch.matmul(p, v[:, :, None, start:stop].to(acc_dtype))
        m_i = m_new
    out = acc / l_i
    return out.reshape(b, hq, m, dv), m_i.reshape(b, hq, m), torch.log(l_i).reshape(b, hq, m)


def _reduce_to(t: Tensor, shape) -> Tensor:
    # Sum a [B, Hq, M, n] block gradient over the dims that `shape` broadcasts.
    dims = [i for i, (have, want) in enumerate(zip(t.shape, shape)) if want == 1 and have != 1]
    return t.sum(dims, keepdim=True) if dims else t


def attention_backward(dout, q, k, v, bias, mask, out, m_stat, log_l, scale, causal, dropout_p, seed, group, mask_value, needs_dbias,
                       block_layout=None):
    m = q.shape[2]
    seed_val = int(seed.item()) if dropout_p > 0 else 0
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    acc_dtype = _acc_dtype(q)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
    dbias = torch.zeros(bias.shape, dtype=acc_dtype, device=q.device) if needs_dbias else None
    for r0 in range(0, m, BLOCK_M):
        rows = slice(r0, min(r0 + BLOCK_M, m))
        dbias_rows = None if dbias is None else _rows(dbias, rows)
        dq[:, :, rows] = _backward_rows(
            dout[:, :, rows], q[:, :, rows], k, v, _rows(bias, rows), _rows(mask, rows), out[:, :, rows], m_stat[:, :, rows],
            log_l[:, :, rows], scale, causal, dropout_p, seed_val, group, mask_value, dk, dv, dbias_rows, r0,
            _layout_rows(block_layout, rows),
        )
    dbias_out = dbias.to(bias.dtype) if dbias is not None else None
    return dq, dk.to(k.dtype), dv.to(v.dtype), dbias_out


def _backward_rows(dout, q, k, v, bias, mask, out, m_stat, log_l, scale, causal, dropout_p, seed_val, group, mask_value, dk, dv, dbias, row0,
                   layout=None):
    """Accumulates into dk, dv (and dbias, a view of these rows or all of it); returns dq of these rows."""
    b, hq, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    acc_dtype = _acc_dtype(q)
    qg = _grouped(q, group).to(acc_dtype)
    dog = _grouped(dout, group).to(acc_dtype)
    m_g = _finite_max(m_stat.reshape(b, hkv, group, m, 1)).to(acc_dtype)
    log_l_g = log_l.reshape(b, hkv, group, m, 1).to(acc_dtype)
    # delta_i = rowsum(dO * O): the softmax backward's correction term, computed once.
    delta = (dog * _grouped(out, group).to(acc_dtype)).sum(-1, keepdim=True)
    dq = torch.zeros_like(qg)
    for start in range(0, n, BLOCK_N):
        stop = min(start + BLOCK_N, n)
        s = _scores(qg, k, bias, mask, scale, causal, mask_value, group, start, stop, row0, layout)
        p = torch.exp(s - m_g - log_l_g)  # recomputed from the logsumexp, never stored
        vb = v[:, :, None, start:stop].to(acc_dtype)
        dp = torch.matmul(dog, vb.transpose(-2, -1))
        if dropout_p > 0:
            keep = _keep(seed_val, dropout_p, s.shape, group, start, stop, q.device, row0)
            inv = 1.0 / (1.0 - dropout_p)
            p_drop = torch.where(keep, p * inv, torch.zeros_like(p))
            dp = torch.where(keep, dp * inv, torch.zeros_like(dp))
        else:
            p_drop = p
        ds = p * (dp - delta)
        mask_b = _block_view(mask, group, slice(start, stop))
        if mask_b is not None:
            # The fill value is a constant: no gradient flows to the scores it replaced.
            ds = torch.where(mask_b, ds, torch.zeros_like(ds))
            if causal:
                # The causal -inf is a constant too: a row that mask and causal leave empty gets
                # dS = 0 at every key (p is NaN there), as eager's masked_fill backward gives.
                rows = torch.arange(row0, row0 + m, device=ds.device).view(m, 1)
                keys = torch.arange(start, stop, device=ds.device).view(1, -1)
                ds = ds.masked_fill(keys > rows, 0.0)
        dv[:, :, start:stop] += torch.matmul(p_drop.transpose(-2, -1), dog).sum(2)
        kb = k[:, :, None, start:stop].to(acc_dtype)
        dk[:, :, start:stop] += (torch.matmul(ds.transpose(-2, -1), qg) * scale).sum(2)
        dq += torch.matmul(ds, kb) * scale
        if dbias is not None:
            dbias[..., start:stop] += _reduce_to(ds.reshape(b, hq, m, stop - start), dbias.shape)
    return dq.reshape(q.shape).to(q.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
