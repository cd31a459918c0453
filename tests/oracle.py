"""The readable eager oracle: attention exactly as the op's contract states it, N x N and all.

Tests compare every kernel and every compiled graph against this (in fp64 where they can).
Optimized code never imports it.
"""

from __future__ import annotations

import torch

from flashfuse.kernels import philox


def attention(q, k, v, bias=None, mask=None, scale=None, causal=False, dropout_p=0.0, seed=0, gqa_group=1, mask_value=float("-inf"), keep=None):
    """softmax(scale * q k^T + bias, masked) @ v, in the dtype of q. Returns (out, lse)."""
    b, hq, m, d = q.shape
    n = k.shape[-2]
    scale = d ** -0.5 if scale is None else scale
    k = k.repeat_interleave(gqa_group, dim=1)
    v = v.repeat_interleave(gqa_group, dim=1)
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, mask_value)
    if causal:
        s = s.masked_fill(torch.ones(m, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        if keep is None:
            keep = philox.keep_mask(seed, dropout_p, b, hq, m, n, device=q.device)
        p = p * keep / (1 - dropout_p)
    return p @ v, lse
