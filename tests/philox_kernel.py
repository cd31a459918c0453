"""A Triton kernel that writes the dropout keep-mask the attention templates draw (for tests).

It calls the templates' own `_seed_words` / `_dropout_keep` helpers, so the CPU (interpreter)
and GPU tests compare exactly what the kernels use against `flashfuse.kernels.philox`.
Import it only after TRITON_INTERPRET is settled: the decorator picks the interpreter then.
"""

import torch
import triton
import triton.language as tl

from flashfuse.kernels import philox, render

_COMMON = render.load_module("fwd", render.template_options(torch.float32, 16, False, False, False, True, False))


@triton.jit
def _keep_mask_kernel(Seed, Out, dropout_t, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = tl.program_id(1) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    seed_lo, seed_hi = _COMMON._seed_words(Seed)
    keep = _COMMON._dropout_keep(seed_lo, seed_hi, bh, rows, start_n, dropout_t, BLOCK_N)
    offs = bh.to(tl.int64) * M * N + rows[:, None] * N + cols[None, :]
    tl.store(Out + offs, keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < N))


def triton_keep_mask(seed: int, p: float, b: int, h: int, m: int, n: int, block_m: int = 32, block_n: int = 64, device="cpu") -> torch.Tensor:
    """The [b, h, m, n] keep-mask from the kernels' Philox; every element is checked written."""
    out = torch.full((b, h, m, n), -1, dtype=torch.int8, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), b * h)
    _keep_mask_kernel[grid](seed_t, out, philox.threshold(p), m, n, BLOCK_M=block_m, BLOCK_N=block_n)
    assert (out >= 0).all()
    return out.bool()
