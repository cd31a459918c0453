"""Keep-masks that occur in practice (True = attend), for tests, benchmarks and users' experiments."""

from __future__ import annotations

import torch


def _grid(m: int, n: int, device=None):
    return torch.arange(m, device=device)[:, None], torch.arange(n, device=device)[None, :]


def causal(m: int, n: int, device=None) -> torch.Tensor:
    i, j = _grid(m, n, device)
    return j <= i


def sliding_window(m: int, n: int, window: int, causal_: bool = True, device=None) -> torch.Tensor:
    """Mistral / Longformer style: each query sees the `window` keys up to itself (or around it)."""
    i, j = _grid(m, n, device)
    if causal_:
        return (j <= i) & (j > i - window)
    return (j - i).abs() < window


def document(lengths, device=None) -> torch.Tensor:
    """Block-diagonal masking of packed sequences: tokens attend within their own document."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return doc[:, None] == doc[None, :]


def prefix_lm(m: int, n: int, prefix: int, device=None) -> torch.Tensor:
    """Bidirectional over the first `prefix` keys, causal after them."""
    i, j = _grid(m, n, device)
    return (j <= i) | (j < prefix)


def padding(lengths, n: int, device=None) -> torch.Tensor:
    """[B, 1, 1, N] key-padding mask: batch b attends to its first lengths[b] keys."""
    j = torch.arange(n, device=device)[None, :]
    return (j < torch.tensor(lengths, device=device)[:, None]).view(len(lengths), 1, 1, n)


def dilated(m: int, n: int, stride: int, device=None) -> torch.Tensor:
    """Strided sparsity: each query sees keys at its own offset modulo `stride`, causally."""
    i, j = _grid(m, n, device)
    return (j <= i) & ((i - j) % stride == 0)


def random_blocks(m: int, n: int, block_m: int, block_n: int, density: float, seed: int = 0, device=None) -> torch.Tensor:
    """Random block sparsity at the given block density (the diagonal blocks always kept)."""
    g = torch.Generator().manual_seed(seed)
    mb, nb = -(-m // block_m), -(-n // block_n)
    blocks = torch.rand(mb, nb, generator=g) < density
    blocks |= torch.eye(mb, nb, dtype=torch.bool)
    full = blocks.repeat_interleave(block_m, 0).repeat_interleave(block_n, 1)[:m, :n]
    return full.to(device)
