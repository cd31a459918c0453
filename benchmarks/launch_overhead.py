"""Host-side cost of one flashfuse call: tiny shapes, so the GPU finishes first and wall time is CPU time.

    python benchmarks/launch_overhead.py
Prints microseconds per call for the op's forward (no grad), forward+backward, flashfuse.attention
and a compiled plain attention function (forward+backward), the raw launchers, how many launches
took each path of flashfuse.kernels.launch, and a cProfile of the backward launcher's Python hot spots.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch

import flashfuse
from flashfuse.kernels import launch
from flashfuse.kernels import triton_attention as ta


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    args = (None, None, 0.125, True, 0.0, None, 1, float("-inf"))
    out, m, log_l = ta.attention_forward(q, k, v, *args)
    do = torch.randn_like(out)

    def op_fwd():
        with torch.no_grad():
            torch.ops.flashfuse.attention.default(q, k, v, None, None, 0.125, True, 0.0, None, 1, float("-inf"), True, "triton")

    def op_fwdbwd():
        o = torch.ops.flashfuse.attention.default(q, k, v, None, None, 0.125, True, 0.0, None, 1, float("-inf"), True, "triton")[0]
        torch.autograd.grad(o, (q, k, v), do)

    def launch_fwd():
        ta.attention_forward(q, k, v, *args)

    def launch_bwd():
        ta.attention_backward(do, q, k, v, None, None, out, m, log_l, 0.125, True, 0.0, None, 1, float("-inf"), False)

    def api_fwdbwd():
        o = flashfuse.attention(q, k, v, scale=0.125, causal=True)
        torch.autograd.grad(o, (q, k, v), do)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import plain_attention

    compiled = torch.compile(lambda q, k, v: plain_attention(q, k, v, True, 0.0), backend="flashfuse", dynamic=False)

    def compiled_fwdbwd():
        torch.autograd.grad(compiled(q, k, v), (q, k, v), do)

    rows = [("op fwd (no grad)", op_fwd), ("op fwd+bwd", op_fwdbwd), ("attention() fwd+bwd", api_fwdbwd),
            ("compiled fwd+bwd", compiled_fwdbwd), ("launcher fwd", launch_fwd), ("launcher bwd", launch_bwd)]
    for name, fn in rows:
        print(f"{name:20s} {per_call_us(fn):8.1f} us/call")
    print("launch paths:", launch.stats)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        launch_bwd()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
