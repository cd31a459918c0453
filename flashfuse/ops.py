"""The fused attention op `flashfuse::attention`, its backward op, fake kernels and autograd.

The contract (shapes, mask and dropout semantics) is written out in `kernels/reference.py`.
Each call picks its kernel by name ("reference" or "triton"; "auto" picks by device), so
one graph can be inspected, run on the CPU and run on CUDA without being rewritten.

Run-time fallback: Triton compiles and autotunes a kernel at its first launch, inside the
compiled graph, where the pass can no longer put the user's subgraph back. So when the
Triton path raises (a compile, autotune or launch error, a device or dtype it lacks), the op
logs a warning once per distinct error on the "flashfuse" logger, counts it in
`counters["flashfuse"]["kernel_fallback"]` and computes the same function with the reference
kernel. With `strict=True` it raises instead. The op's `strict` argument carries the
backend's `strict` option into the compiled graph (the pass sets it only when True, so other
graphs read as before), and the backward op gets it from the forward's autograd context;
the environment variable FLASHFUSE_STRICT=1 makes every call strict, including direct calls
of `flashfuse.attention`.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from flashfuse import envvars
from flashfuse.kernels import block_sparse, reference

log = logging.getLogger(__name__)

KERNELS = ("auto", "triton", "reference")
STRICT_ENV = "FLASHFUSE_STRICT"
_warned: set = set()


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """`auto`: Triton on CUDA; on the CPU the reference, unless TRITON_INTERPRET=1 asks for Triton."""
    if kernel not in KERNELS:
        raise ValueError(f"flashfuse: unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel
    if device.type == "cuda" or envvars.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


def is_strict(strict: bool = False) -> bool:
    return bool(strict) or envvars.get(STRICT_ENV, "") not in ("", "0")


def _run(kernel: str, device: torch.device, strict: bool, fn: str, *args, reuse: Optional[dict] = None):
    """impl.<fn>(*args) on the kernel `kernel` resolves to; Triton failures fall back (see above).

    reuse: a dict the Triton launchers share between an eager forward and its backward
    (`triton_attention.attention_forward`'s docstring); the reference kernel ignores it.
    """
    if resolve_kernel(kernel, device) != "triton":
        return getattr(reference, fn)(*args)
    try:
        from flashfuse.kernels import triton_attention

        if reuse is None:
            return getattr(triton_attention, fn)(*args)
        return getattr(triton_attention, fn)(*args, reuse=reuse)
    except Exception as e:
        if is_strict(strict):
            raise
        counters["flashfuse"]["kernel_fallback"] += 1
        key = (fn, type(e).__name__, str(e)[:500])
        if key not in _warned:
            _warned.add(key)
            log.warning("flashfuse: the Triton %s kernel failed (%s: %s); running the reference kernel instead", fn, type(e).__name__, e, exc_info=True)
    return getattr(reference, fn)(*args)


def _check(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], gqa_group: int) -> None:
    # Clear errors for direct callers; the compiler pass never builds a call that fails these.
    # torch._check, so symbolic shapes (the fake kernel) get no guards from them.
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "flashfuse.attention: q, k, v must be 4-D [B, H, L, D]")
    torch._check(q.shape[1] == k.shape[1] * gqa_group, lambda: f"flashfuse.attention: q heads {q.shape[1]} != kv heads {k.shape[1]} x group {gqa_group}")
    torch._check(k.shape[2] == v.shape[2], lambda: "flashfuse.attention: k and v lengths differ")
    for name, t in (("bias", bias), ("mask", mask)):
        if t is not None:
            torch._check(t.dim() == 4, lambda: f"flashfuse.attention: {name} must be 4-D")
            torch._check(t.shape[-1] == k.shape[2], lambda: f"flashfuse.attention: {name} must span all keys (last dim N)")
    if mask is not None:
        torch._check(mask.dtype == torch.bool, lambda: "flashfuse.attention: mask must be bool (True = keep)")


def _check_real(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], gqa_group: int) -> None:
    """_check for real tensors (plain ints): the same conditions tested in one expression; on a
    failure `_check` raises the message. NB: ~7 us of torch._check per call on the H100 host."""
    n = k.shape[2] if k.dim() == 4 else None
    if (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.shape[1] == k.shape[1] * gqa_group and n == v.shape[2]
            and (bias is None or (bias.dim() == 4 and bias.shape[-1] == n))
            and (mask is None or (mask.dim() == 4 and mask.shape[-1] == n and mask.dtype == torch.bool))):
        return
    _check(q, k, v, bias, mask, gqa_group)


# The ops are defined with the low-level Library API rather than torch.library.custom_op: a
# custom_op's kernel runs inside wrappers (a Dynamo-disable wrapper, aliasing checks) that
# cost host time on every call of every compiled graph.
# NB: on an H100 host (torch 2.11) cProfile put ~0.5 ms per call in custom_op's backend
# wrapper inside a compiled fwd+bwd (benchmarks/launch_overhead.py, 2026-11-22 07:14 and 07:22),
# against 71-97 us for the forward launcher itself; with this registration the wrapper is gone
# from the profile (07:33), though the unprofiled wall time stayed within the host's noise.
# On this project's CPU machine a stubbed op call went from 20.4 to 17.2 us.
if "_lib" in globals():  # importlib.reload of this module: drop the previous definitions first
    _lib._destroy()
_lib = torch.library.Library("flashfuse", "DEF")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, float scale, bool causal, float dropout_p, "
    "Tensor? seed, SymInt gqa_group, float mask_value, bool softmax_fp32, str kernel, bool strict=False, "
    "Tensor? block_layout=None) -> (Tensor, Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),  # as custom_op tags its ops: Dynamo may trace through them
)
_lib.define(
    "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor out, Tensor m, "
    "Tensor log_l, float scale, bool causal, float dropout_p, Tensor? seed, SymInt gqa_group, float mask_value, "
    "bool needs_dbias, str kernel, bool strict=False, Tensor? block_layout=None) -> (Tensor, Tensor, Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    mask: Optional[Tensor],
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[Tensor],
    gqa_group: int,
    mask_value: float,
    softmax_fp32: bool,
    kernel: str,
    strict: bool = False,
    block_layout: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused attention. Returns (out [B, Hq, M, Dv], m, log_l), m and log_l [B, Hq, M] fp32.

    logsumexp = m + log_l (see kernels/reference.py for why it is kept as two terms).

    softmax_fp32 records that the user's softmax ran in fp32; every kernel accumulates in
    fp32 regardless, so it changes no result and is kept for the report and future kernels.
    strict: a Triton failure raises instead of falling back to the reference kernel.
    block_layout: None or an int8 block summary [B|1, Hq|1, cdiv(M, 128), cdiv(N, 128)]
    (flashfuse.kernels.block_sparse: EMPTY blocks are not computed, their scores are -inf;
    see flashfuse.block_sparse_attention).
    """
    _check_real(q, k, v, bias, mask, gqa_group)
    out, m, log_l = _run(
        kernel, q.device, strict, "attention_forward", q, k, v, bias, mask, scale, causal, dropout_p, seed, gqa_group, mask_value,
        block_layout,
    )
    return _as_layout(out, q, (q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), _out_strides(q, v)), m.contiguous(), log_l.contiguous()


def _as_layout(t: Tensor, like: Tensor, shape, strides) -> Tensor:
    # Real outputs must have the strides (and dtype) the fake kernel promised, or views that
    # AOTAutograd traced against the fake strides fail at run time. Compared without allocating:
    # this runs on every call of a compiled graph.
    if t.stride() == strides and t.dtype == like.dtype:
        return t
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device).copy_(t)


def _out_strides(q: Tensor, v: Tensor) -> tuple:
    # [B, M, H, Dv] memory read as [B, H, M, Dv]: the layout of _out_like (torch's contiguous
    # strides count a size-0 dim as 1)
    _, h, m, _ = q.shape
    h, m, dv = max(h, 1), max(m, 1), max(v.shape[-1], 1)
    return (m * h * dv, dv, h * dv, 1)


def _dense_strides(t: Tensor) -> tuple:
    # the strides torch.empty_like(t) gives: t's own when t is non-overlapping and dense (size-1
    # dims aside, its strides are the running products of the sizes in stride order), else
    # those of a fresh empty_like
    if t.numel() == 0:
        return torch.empty_like(t).stride()
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return torch.empty_like(t).stride()
        expect *= sz
    return t.stride()


def _out_like(q: Tensor, v: Tensor) -> Tensor:
    b, h, m, _ = q.shape
    return q.new_empty((b, m, h, v.shape[-1])).transpose(1, 2)


_lib.impl("attention", attention, "CompositeExplicitAutograd")


@torch.library.register_fake("flashfuse::attention", lib=_lib)
def _(q, k, v, bias, mask, scale, causal, dropout_p, seed, gqa_group, mask_value, softmax_fp32, kernel, strict=False, block_layout=None):
    _check(q, k, v, bias, mask, gqa_group)
    b, h, m, _ = q.shape
    stat = q.new_empty((b, h, m), dtype=torch.float32)
    return _out_like(q, v), stat, torch.empty_like(stat)


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    mask: Optional[Tensor],
    out: Tensor,
    m: Tensor,
    log_l: Tensor,
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[Tensor],
    gqa_group: int,
    mask_value: float,
    needs_dbias: bool,
    kernel: str,
    strict: bool = False,
    block_layout: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is an empty tensor when not needed."""
    dq, dk, dv, dbias = _run(
        kernel, q.device, strict, "attention_backward",
        dout, q, k, v, bias, mask, out, m, log_l, scale, causal, dropout_p, seed, gqa_group, mask_value, needs_dbias, block_layout,
    )
    dbias = q.new_empty((0,)) if dbias is None else _as_layout(dbias, bias, bias.shape, _dense_strides(bias))
    return (_as_layout(dq, q, q.shape, _dense_strides(q)), _as_layout(dk, k, k.shape, _dense_strides(k)),
            _as_layout(dv, v, v.shape, _dense_strides(v)),
            dbias)


_lib.impl("attention_backward", attention_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("flashfuse::attention_backward", lib=_lib)
def _(dout, q, k, v, bias, mask, out, m, log_l, scale, causal, dropout_p, seed, gqa_group, mask_value, needs_dbias, kernel, strict=False,
      block_layout=None):
    dbias = torch.empty_like(bias) if needs_dbias else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    # Autograd runs this only when grad mode is on and an input requires grad: under no_grad
    # or inference_mode nothing is saved, and m / log_l are plain outputs freed when unused.
    q, k, v, bias, mask, scale, causal, dropout_p, seed, gqa_group, mask_value, _, kernel, *rest = inputs
    strict = bool(rest[0]) if rest else False
    block_layout = rest[1] if len(rest) > 1 else None
    out, m, log_l = output
    ctx.save_for_backward(q, k, v, bias, mask, seed, out, m, log_l, block_layout)
    ctx.args = (scale, causal, dropout_p, gqa_group, mask_value, kernel, strict)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(m, log_l)


def _backward(ctx, dout, _dm, _dlog_l):
    q, k, v, bias, mask, seed, out, m, log_l, block_layout = ctx.saved_tensors
    scale, causal, dropout_p, gqa_group, mask_value, kernel, strict = ctx.args
    needs_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.flashfuse.attention_backward(
        dout, q, k, v, bias, mask, out, m, log_l, scale, causal, dropout_p, seed, gqa_group, mask_value, needs_dbias, kernel,
        **({"strict": True} if strict else {}),
        **({"block_layout": block_layout} if block_layout is not None else {}),
    )
    return (dq, dk, dv, (dbias if needs_dbias else None)) + (None,) * (ctx.n_inputs - 4)


torch.library.register_autograd("flashfuse::attention", _backward, setup_context=_setup_context, lib=_lib)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("flashfuse: attention has no second derivative (double backward through flashfuse::attention_backward "
                       "is not supported); use eager attention where you need higher-order gradients")


# Without an autograd formula the dispatcher's fallback would run the backward op with grad
# mode on under create_graph=True (in-place writes on leaves, or silently wrong second-order
# grads): register one that refuses, as custom_op did.
torch.library.register_autograd("flashfuse::attention_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None,
                                lib=_lib)


class _EagerAttention(torch.autograd.Function):
    """The op's math for eager callers, without the custom op's dispatch and autograd wrappers.

    NB: on an H100 host, torch.ops.flashfuse.attention with inputs that need grad cost ~1.4 ms
    more host time per forward+backward than its launchers (benchmarks/launch_overhead.py:
    2028 us vs 129 + 434 us), several times the N=1024 kernels' GPU time. Inside compiled
    graphs the op is still what runs (flashfuse.attention routes there while Dynamo traces).
    """

    # One tuple carries the arguments that need no gradient: Function.apply costs host time per
    # argument. NB: an empty Function's fwd+bwd took 27.0 us with these 13 arguments and 22.5 us
    # with 5 on this project's CPU machine (2026-11-22). The tensors in it are still saved with
    # save_for_backward, so an in-place change of the mask before the backward is an error.

    @staticmethod
    def forward(ctx, q, k, v, bias, rest):
        mask, seed, block_layout, scale, causal, dropout_p, gqa_group, mask_value, kernel = rest
        _check_real(q, k, v, bias, mask, gqa_group)
        reuse = {}
        with block_sparse.eager_call():
            out, m, log_l = _run(kernel, q.device, False, "attention_forward", q, k, v, bias, mask, scale, causal, dropout_p, seed,
                                 gqa_group, mask_value, block_layout, reuse=reuse)
        ctx.save_for_backward(q, k, v, bias, mask, seed, out, m, log_l, block_layout)
        ctx.args = rest[3:]
        ctx.reuse = reuse
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, bias, mask, seed, out, m, log_l, block_layout = ctx.saved_tensors
        scale, causal, dropout_p, gqa_group, mask_value, kernel = ctx.args
        needs_dbias = bias is not None and ctx.needs_input_grad[3]
        with block_sparse.eager_call():
            dq, dk, dv, dbias = _run(kernel, q.device, False, "attention_backward", dout, q, k, v, bias, mask, out, m, log_l, scale,
                                     causal, dropout_p, seed, gqa_group, mask_value, needs_dbias, block_layout, reuse=ctx.reuse)
        return dq, dk, dv, (dbias if needs_dbias else None), None


def call_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], scale: float, causal: bool,
                   dropout_p: float, seed: Optional[Tensor], gqa_group: int, mask_value: float, kernel: str,
                   block_layout: Optional[Tensor] = None) -> Tensor:
    """The output of flashfuse::attention: the op itself while torch.compile traces, else `_EagerAttention`."""
    if torch.compiler.is_compiling():
        extra = {"block_layout": block_layout} if block_layout is not None else {}
        return torch.ops.flashfuse.attention(q, k, v, bias, mask, scale, causal, dropout_p, seed, gqa_group, mask_value, True, kernel,
                                             **extra)[0]
    return _EagerAttention.apply(q, k, v, bias, (mask, seed, block_layout, scale, causal, dropout_p, gqa_group, mask_value, kernel))
