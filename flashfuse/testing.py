"""pytest-friendly checks for users: is my attention fused, and does it match eager?

    from flashfuse.testing import assert_fused, assert_matches_eager
    assert_fused(model, x, count=2)
    assert_matches_eager(model, x)
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import torch

from flashfuse.explain import explain
from flashfuse.kernels.philox import keep_mask as dropout_keep_mask  # noqa: F401  (test helper)

# Relative tolerances: the fused kernels accumulate in fp32 and skip the rounding of the
# N x N scores to the input dtype that eager does, so bf16/fp16 gaps come from eager's side.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_fused(model_or_fn, *args, count: Optional[int] = None, options: Optional[Mapping[str, Any]] = None, **kwargs):
    """Compile with flashfuse, run once, and check how many attention regions were fused.

    count=None asks for at least one. On failure the message carries the explain report,
    so every refusal reason is in front of you. Returns the report.
    """
    report = explain(model_or_fn, *args, options=options, **kwargs)
    fused = len(report.fused)
    ok = fused >= 1 if count is None else fused == count
    if not ok:
        want = "at least 1" if count is None else str(count)
        raise AssertionError(f"flashfuse fused {fused} attention region(s), expected {want}.\n{report}")
    return report


def _tensors(x) -> list:
    out = []
    torch.utils._pytree.tree_map(lambda t: out.append(t) if isinstance(t, torch.Tensor) else None, x)
    return out


def _tol(dtype: torch.dtype, rtol, atol):
    r, a = DEFAULT_TOLERANCES.get(dtype, (1e-4, 1e-5))
    return (r if rtol is None else rtol), (a if atol is None else atol)


def _clone_inputs(args, kwargs):
    def clone(t):
        if isinstance(t, torch.Tensor):
            c = t.detach().clone()
            c.requires_grad_(t.requires_grad)
            return c
        return t

    return torch.utils._pytree.tree_map(clone, (args, kwargs))


def assert_matches_eager(model_or_fn, *args, grads: bool = True, rtol=None, atol=None, options: Optional[Mapping[str, Any]] = None, seed: int = 0, **kwargs):
    """Compiled (backend="flashfuse") vs eager: outputs and, with grads=True, gradients of the
    inputs that require grad and of the module's parameters. Tolerances default by dtype.

    Dropout makes eager and compiled draw different masks: compare with dropout p = 0 or in
    eval mode, or compare against an oracle run with `dropout_keep_mask`.
    """
    is_module = isinstance(model_or_fn, torch.nn.Module)
    eager_model = copy.deepcopy(model_or_fn) if is_module else model_or_fn
    (e_args, e_kwargs), (c_args, c_kwargs) = _clone_inputs(args, kwargs), _clone_inputs(args, kwargs)

    torch.manual_seed(seed)
    expected = eager_model(*e_args, **e_kwargs)
    compiled = torch.compile(model_or_fn, backend="flashfuse", options=dict(options or {}))
    torch.manual_seed(seed)
    actual = compiled(*c_args, **c_kwargs)

    exp_t, act_t = _tensors(expected), _tensors(actual)
    assert len(exp_t) == len(act_t), f"eager returned {len(exp_t)} tensors, compiled {len(act_t)}"
    for i, (e, a) in enumerate(zip(exp_t, act_t)):
        r, t = _tol(e.dtype, rtol, atol)
        torch.testing.assert_close(a, e, rtol=r, atol=t, equal_nan=True, msg=lambda m: f"output {i}: {m}")
    if not grads:
        return actual
    leaves_e = [t for t in _tensors((e_args, e_kwargs)) if t.requires_grad]
    leaves_c = [t for t in _tensors((c_args, c_kwargs)) if t.requires_grad]
    names = []
    if is_module:
        params_e = dict(eager_model.named_parameters())
        for name, p in model_or_fn.named_parameters():
            if p.requires_grad:
                names.append(name)
                leaves_e.append(params_e[name])
                leaves_c.append(p)
    diff_e = [t for t in exp_t if t.requires_grad and t.is_floating_point()]
    diff_a = [t for t in act_t if t.requires_grad and t.is_floating_point()]
    if not diff_e or not leaves_e:
        return actual
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype) for t in diff_e]
    ge = torch.autograd.grad(diff_e, leaves_e, cot, allow_unused=True)
    ga = torch.autograd.grad(diff_a, leaves_c, cot, allow_unused=True)
    labels = [f"input grad {i}" for i in range(len(leaves_e) - len(names))] + [f"grad of {n}" for n in names]
    for label, e, a in zip(labels, ge, ga):
        if e is None and a is None:
            continue
        assert e is not None and a is not None, f"{label}: eager grad {e is not None}, compiled grad {a is not None}"
        r, t = _tol(e.dtype, rtol, atol)
        torch.testing.assert_close(a, e, rtol=r, atol=t, equal_nan=True, msg=lambda m: f"{label}: {m}")
    return actual
