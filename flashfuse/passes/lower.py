"""Lowering: pick and prepare the kernel for a region. It reads only the AttentionSpec.

For a Triton region it renders the four kernels and imports the rendered modules, so a
template or Triton API error surfaces here, at compile time, where the region can keep its
original subgraph. Triton compiles and autotunes at the first launch (it needs the real
arguments), inside the compiled graph: failures there are handled by the op, which falls
back to the reference kernel (see flashfuse/ops.py).
"""

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


def _triton_runs_on(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _wants_triton(kernel: str, device: str) -> bool:
    if kernel == "triton":
        return True
    return kernel == "auto" and _triton_runs_on(device)


def lower(spec: AttentionSpec, kernel: str, device: str) -> KernelChoice:
    d = spec.head_dim
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM or spec.v_shape[-1] > MAX_HEAD_DIM:
        raise LoweringError("unsupported_head_dim", f"head dim {d} is outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if not _wants_triton(kernel, device):
        return KernelChoice(kernel, "reference")
    if not _triton_runs_on(device):
        raise LoweringError("unsupported_device", f"the Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {device}")
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
    flags = dict(
        dtype=dtype, head_dim=d, has_bias=bool(spec.bias_shapes), has_mask=bool(spec.mask_shapes),
        causal=spec.causal, dropout=spec.dropout_p > 0, needs_dbias=spec.bias_requires_grad,
    )
    paths = render.sources_for(**flags)
    if isinstance(paths, dict):  # {kind: path}
        options = render.template_options(**flags)
        for kind in paths:  # import each rendered module: template errors surface now
            render.load_module(kind, options)
        paths = paths.values()
    return KernelChoice(kernel, "triton", tuple(str(p) for p in paths))
