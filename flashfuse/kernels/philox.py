"""Philox4x32 in plain torch: the dropout keep-mask that every kernel regenerates bit for bit.

The counter of element (bh, i, j) of the [B*H, M, N] probability matrix is
(c0, c1, c2, c3) = (j, i, bh, 0) and the key is the 64-bit seed split into (lo, hi).
The first output word c0, shifted to 24 bits, is the uniform u = (c0 >> 8) / 2**24,
exact in fp32 on every backend. An element is kept when u >= p.

The Triton templates implement the same function (`templates/common.py.jinja`);
`tests/test_philox.py` checks the two agree exactly. The counter is built from
indices, not from one flat offset, so no B*H*M*N product can overflow.
"""

from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
# NB: Salmon et al. (SC'11) report Philox4x32 passes BigCrush from 7 rounds; 10 is
# their safety margin. Each round costs two 32-bit multiplies per element in the
# kernel's inner loop, so we take 7.
N_ROUNDS = 7
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 products of two uint32 values are exact modulo 2**64, so the low and
    # high words come out right after masking, even where the int64 wraps negative.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox_uint32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-N_ROUNDS for counters (c0, c1, c2, 0)."""
    c0, c1, c2 = torch.broadcast_tensors(c0.to(torch.int64), c1.to(torch.int64), c2.to(torch.int64))
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0


def uniform(seed: int, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in [0, 1) for the broadcast of (bh, rows, cols) index tensors."""
    return (philox_uint32(seed, cols, rows, bh) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def keep_mask_block(seed: int, dropout_p: float, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return uniform(seed, bh, rows, cols) >= dropout_p


def keep_mask(seed: int, dropout_p: float, batch: int, heads: int, m: int, n: int, device=None) -> torch.Tensor:
    """The whole [batch, heads, m, n] keep-mask. For tests and small sizes only: it is N x N."""
    bh = torch.arange(batch * heads, device=device).view(-1, 1, 1)
    rows = torch.arange(m, device=device).view(1, -1, 1)
    cols = torch.arange(n, device=device).view(1, 1, -1)
    return keep_mask_block(seed, dropout_p, bh, rows, cols).view(batch, heads, m, n)
