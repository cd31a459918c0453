"""Philox4x32 in plain torch: the dropout keep-mask that every kernel regenerates bit for bit.

Element (bh, i, j) of the [B*H, M, N] probability matrix (bh = b * H + h) takes its random
bits from one Philox4x32-7 call shared by 8 neighbouring keys, like FlashAttention-2 packs
several randoms per call:

    counter (c0, c1, c2, c3) = (j // 8, i, bh, 0)      key = the 64-bit seed split into (lo, hi)
    word    = output word (j % 8) // 2 of the four     half = j % 2 (low half first)
    u16     = (word >> (16 * half)) & 0xFFFF           keep iff u16 >= T,  T = round(p * 65536)

T is computed once on the host (`threshold`) and passed to the kernels as an int. Kept values
are scaled by 1 / (1 - p), the requested p, not the quantized one.

Quantization: u16 is uniform on [0, 65536), so the keep probability is exactly 1 - T/65536,
within 1/131072 of 1 - p (rounding p * 65536 to the nearest integer moves it by at most 1/2).

The Triton templates implement the same function (`templates/common.py.jinja`: the
[BLOCK_M, BLOCK_N] tile is interleaved from [BLOCK_M, BLOCK_N // 8] Philox outputs, so the
mapping depends only on the global key index, never on BLOCK_N); `tests/test_triton_kernels.py`
checks the two agree exactly. The counter is built from indices, not from one flat offset, so
no B*H*M*N product can overflow.

NB: until this scheme, each score element cost its own Philox call (counter (j, i, bh, 0),
24-bit uniform from the first word). Measured on an H200 (bf16, D=64, N=4096, p=0.1) that
ran the dropout forward at 108 TFLOP/s against SDPA flash's 226 (fwd+bwd 117 vs 229); one
call now feeds 8 elements.
"""

from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
# NB: Salmon et al. (SC'11) report Philox4x32 passes BigCrush from 7 rounds; 10 is
# their safety margin. Each round costs two 32-bit multiplies per call in the kernel's
# inner loop, so we take 7.
N_ROUNDS = 7
# Keys per Philox call: 4 output words of 32 bits, two 16-bit uniforms each.
KEYS_PER_CALL = 8
_MASK32 = 0xFFFFFFFF


def threshold(dropout_p: float) -> int:
    """T = round(p * 65536), clamped to [0, 65536]: an element is kept iff its u16 >= T."""
    return min(max(int(round(float(dropout_p) * 65536.0)), 0), 65536)


def keep_probability(dropout_p: float) -> float:
    """The exact keep probability of the quantized scheme: 1 - T / 65536."""
    return 1.0 - threshold(dropout_p) / 65536.0


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 products of two uint32 values are exact modulo 2**64, so the low and
    # high words come out right after masking, even where the int64 wraps negative.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor):
    """The four output words of Philox4x32-N_ROUNDS for counters (c0, c1, c2, 0), as int64 in [0, 2**32)."""
    c0, c1, c2 = torch.broadcast_tensors(c0.to(torch.int64), c1.to(torch.int64), c2.to(torch.int64))
    c0, c1, c2 = c0 & _MASK32, c1 & _MASK32, c2 & _MASK32
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform16(seed: int, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 16-bit uniforms (int64 in [0, 65536)) for the broadcast of (bh, rows, cols) index tensors."""
    cols = cols.to(torch.int64)
    words = philox4(seed, cols // KEYS_PER_CALL, rows, bh)
    k = cols % KEYS_PER_CALL
    w, half = k // 2, k % 2
    word = torch.where(w == 0, words[0], torch.where(w == 1, words[1], torch.where(w == 2, words[2], words[3])))
    return (word >> (16 * half)) & 0xFFFF


def keep_mask_block(seed: int, dropout_p: float, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Keep-mask (True = keep) for the broadcast of (bh, rows, cols) index tensors."""
    return uniform16(seed, bh, rows, cols) >= threshold(dropout_p)


def keep_mask(seed: int, dropout_p: float, batch: int, heads: int, m: int, n: int, device=None) -> torch.Tensor:
    """The whole [batch, heads, m, n] keep-mask. For tests and small sizes only: it is N x N."""
    bh = torch.arange(batch * heads, device=device).view(-1, 1, 1)
    rows = torch.arange(m, device=device).view(1, -1, 1)
    cols = torch.arange(n, device=device).view(1, 1, -1)
    return keep_mask_block(seed, dropout_p, bh, rows, cols).view(batch, heads, m, n)
