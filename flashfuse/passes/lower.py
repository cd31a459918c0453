"""Lowering: pick and prepare the kernel for a region. It reads only the AttentionSpec."""

from __future__ import annotations

import dataclasses
import os

import torch

from flashfuse.spec import AttentionSpec

MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
TRITON_MIN_HEAD_DIM = 16


class LoweringError(Exception):
    """A region cannot run on the requested kernel; the pass keeps its original subgraph."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    name: str          # what the op is called with: "auto", "triton" or "reference"
    runs_as: str       # what it resolves to on this region's device
    sources: tuple = ()  # generated Triton source files, for the report


def _wants_triton(kernel: str, device: str) -> bool:
    if kernel == "triton":
        return True
    return kernel == "auto" and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def lower(spec: AttentionSpec, kernel: str, device: str) -> KernelChoice:
    d = spec.head_dim
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM or spec.v_shape[-1] > MAX_HEAD_DIM:
        raise LoweringError("unsupported_head_dim", f"head dim {d} is outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if not _wants_triton(kernel, device):
        return KernelChoice(kernel, "reference")
    if not (TRITON_MIN_HEAD_DIM <= d and spec.v_shape[-1] == d):
        if kernel == "auto":
            # The reference kernel computes the same function for any head dim; on CUDA it is slower.
            return KernelChoice("reference", "reference")
        raise LoweringError("unsupported_head_dim", f"the Triton kernels take head dims {TRITON_MIN_HEAD_DIM}..{MAX_HEAD_DIM} with Dv == D, got D={d}, Dv={spec.v_shape[-1]}")
    try:
        from flashfuse.kernels import render
    except ImportError as e:
        raise LoweringError("triton_unavailable", f"the Triton kernels cannot be imported: {e}") from e
    dtype = getattr(torch, spec.dtype)
    paths = render.sources_for(
        dtype=dtype, head_dim=d, has_bias=bool(spec.bias_shapes), has_mask=bool(spec.mask_shapes),
        causal=spec.causal, dropout=spec.dropout_p > 0, needs_dbias=spec.bias_requires_grad,
    )
    return KernelChoice(kernel, "triton", tuple(str(p) for p in paths))
