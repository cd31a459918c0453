"""Block-sparse attention with a user-given block layout.

    layout = torch.zeros(Mb, Nb, dtype=torch.bool)   # Mb = cdiv(M, 128), Nb = cdiv(N, 128)
    layout[i, j] = True                               # compute query block i against key block j
    out = flashfuse.block_sparse_attention(q, k, v, layout)

The layout is at BLOCK x BLOCK = 128 x 128 granularity (the kernels' SPARSE_BLOCK) and may be
[Mb, Nb], [H|1, Mb, Nb] or [B|1, H|1, Mb, Nb] (H = query heads). Blocks marked False are not
computed: their scores are -inf, so a query row whose every block is False gives NaN, as a
softmax over nothing does. Blocks marked True are dense (the ragged last blocks of M and N
are masked by length as usual). The layout becomes the op's `block_layout` (an int8 block
summary, flashfuse.kernels.block_sparse), which both the Triton and the reference kernels honor,
forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flashfuse import ops
from flashfuse.kernels import block_sparse

BLOCK = 128  # = flashfuse.kernels.triton_attention.SPARSE_BLOCK = reference.LAYOUT_BLOCK


def layout_summary(layout: Tensor, b: int, hq: int, m: int, n: int) -> Tensor:
    """A bool block layout as the op's int8 block_layout [B|1, H|1, Mb, Nb] (FULL where True, EMPTY where False)."""
    if layout.dtype != torch.bool:
        raise TypeError(f"flashfuse.block_sparse_attention: layout must be a bool tensor, got {layout.dtype}")
    if layout.dim() not in (2, 3, 4):
        raise ValueError(f"flashfuse.block_sparse_attention: layout must be [Mb, Nb], [H, Mb, Nb] or [B, H, Mb, Nb], got {tuple(layout.shape)}")
    while layout.dim() < 4:
        layout = layout.unsqueeze(0)
    mb, nb = -(-m // BLOCK), -(-n // BLOCK)
    lb, lh, lm, ln = layout.shape
    if (lm, ln) != (mb, nb) or lb not in (1, b) or lh not in (1, hq):
        raise ValueError(
            f"flashfuse.block_sparse_attention: layout {tuple(layout.shape)} does not fit [B={b}|1, H={hq}|1, "
            f"Mb={mb}, Nb={nb}] (blocks of {BLOCK} for M={m}, N={n})"
        )
    return torch.where(layout, block_sparse.FULL, block_sparse.EMPTY).to(torch.int8).contiguous()


# Eager calls reuse a layout's summary while the layout is alive and unchanged (the rule of the
# mask cache, flashfuse.kernels.block_sparse.caching: writes through PyTorch ops are seen, writes
# that bypass the version counter need FLASHFUSE_MASK_CACHE=0), so the op's list cache (keyed
# on the summary tensor) hits as well. NB: H100, N=4096: without it every
# call rebuilt the lists, 658 us of host time per forward against 134 us for the mask API
# (benchmarks/profile_sparse.py, 2026-11-22).
_summaries = block_sparse.InputCache(size=16)


def _summary(layout: Tensor, b: int, hq: int, m: int, n: int, device) -> Tensor:
    def build():
        return layout_summary(layout.to(device), b, hq, m, n)

    if torch.compiler.is_compiling():
        return build()
    with block_sparse.eager_call():
        return _summaries.get((layout,), (b, hq, m, n, str(device)), build)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, *, scale: Optional[float] = None,
                           dropout_p: float = 0.0, gqa_group: int = 1, kernel: str = "auto") -> Tensor:
    """softmax(scale * q k^T restricted to the layout's blocks) @ v. Returns [B, Hq, M, Dv].

    q [B, Hq, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], Hq = Hkv * gqa_group; layout: see the
    module docstring. Differentiable in q, k, v. Eager calls cache the layout's lists while the
    layout is alive and unchanged: edit it with PyTorch ops (in place is fine), or set
    FLASHFUSE_MASK_CACHE=0 if it is written behind PyTorch's back (`.data`, a NumPy view).
    """
    b, hq, m, d = q.shape
    n = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    summary = _summary(layout, b, hq, m, n, q.device)
    seed = torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    return ops.call_attention(q, k, v, None, None, float(scale), False, float(dropout_p), seed, int(gqa_group), float("-inf"), kernel,
                              block_layout=summary)
