"""flashfuse: a torch.compile backend that fuses hand-written attention into FlashAttention kernels.

    model = torch.compile(model, backend="flashfuse")
    print(flashfuse.explain(model, x))
"""

from __future__ import annotations

import logging

import torch

from flashfuse import ops  # noqa: F401  (registers torch.ops.flashfuse.*)
from flashfuse.backend import flashfuse_backend
from flashfuse.block_sparse_api import block_sparse_attention
from flashfuse.explain import explain
from flashfuse.options import Options
from flashfuse.report import Report
from flashfuse.spec import AttentionSpec

__all__ = ["flashfuse_backend", "explain", "Options", "Report", "AttentionSpec", "attention", "block_sparse_attention"]
__version__ = "0.1.0"

logging.getLogger("flashfuse").addHandler(logging.NullHandler())


def attention(q, k, v, bias=None, mask=None, scale=None, causal=False, dropout_p=0.0, gqa_group=1, mask_value=float("-inf"), kernel="auto"):
    """Call the fused op directly. Returns the output [B, Hq, M, Dv].

    Eagerly this runs the kernels through a plain autograd.Function (ops.call_attention: less
    host time than dispatching the custom op); under torch.compile it is the op
    torch.ops.flashfuse.attention, so compiled graphs show it.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    return ops.call_attention(q, k, v, bias, mask, float(scale), bool(causal), float(dropout_p), seed, int(gqa_group), float(mask_value), kernel)


def _register_backend() -> None:
    # The entry point makes "flashfuse" known without this import; registering here too
    # lets `import flashfuse` work from a source checkout that was never pip-installed.
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "flashfuse" not in _BACKENDS:
        register_backend(name="flashfuse")(flashfuse_backend)


_register_backend()
