"""Host-side cost of one flashfuse call: tiny shapes, so the GPU finishes first and wall time is CPU time.

    python benchmarks/launch_overhead.py
Prints microseconds per call for the op's forward (no grad), forward+backward, flashfuse.attention
and a compiled plain attention function (forward+backward), the raw launchers, how many launches
took each path of flashfuse.kernels.launch, SDPA's eager and compiled calls for scale, and cProfiles of
the backward launcher and of the compiled call.
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

    sdpa_compiled = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), dynamic=False)

    def sdpa_fwdbwd():
        torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)

    def sdpa_compiled_fwdbwd():
        torch.autograd.grad(sdpa_compiled(q, k, v), (q, k, v), do)

    rows = [("sdpa fwd+bwd (eager)", sdpa_fwdbwd), ("sdpa+Inductor fwd+bwd", sdpa_compiled_fwdbwd), ("op fwd (no grad)", op_fwd), ("op fwd+bwd", op_fwdbwd), ("attention() fwd+bwd", api_fwdbwd),
            ("compiled fwd+bwd", compiled_fwdbwd), ("launcher fwd", launch_fwd), ("launcher bwd", launch_bwd)]
    for name, fn in rows:
        print(f"{name:22s} {per_call_us(fn):8.1f} us/call")
    print("launch paths:", launch.stats)
    breakdown(api_fwdbwd, launch_bwd)
    for name, fn in (("backward launcher", launch_bwd), ("compiled fwd+bwd", compiled_fwdbwd)):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- cProfile: 100 x {name} ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def breakdown(api_fwdbwd, launch_bwd) -> None:
    """Where an eager fwd+bwd's host time goes: the launchers timed inside the call (the
    backward runs on autograd's device thread, which cProfile does not see), the backward
    launcher on a plain worker thread, the call with the garbage collector off, and the
    profiler's CPU self times of every thread."""
    import gc
    import threading

    spent = {"attention_forward": 0.0, "attention_backward": 0.0}
    originals = {name: getattr(ta, name) for name in spent}

    def timed(name):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return originals[name](*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    n = 300
    for name in spent:
        setattr(ta, name, timed(name))
    try:
        total = per_call_us(api_fwdbwd, n)
    finally:
        for name, fn in originals.items():
            setattr(ta, name, fn)
    calls = n + 10
    print(f"attention() fwd+bwd {total:.1f} us/call, of which launchers: "
          + ", ".join(f"{k} {v / calls * 1e6:.1f} us" for k, v in spent.items()))
    result = {}

    def worker():
        result["us"] = per_call_us(launch_bwd, n)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    print(f"backward launcher on a worker thread {result['us']:.1f} us/call")
    gc.disable()
    try:
        print(f"attention() fwd+bwd, gc off {per_call_us(api_fwdbwd, n):.1f} us/call")
    finally:
        gc.enable()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            api_fwdbwd()
        torch.cuda.synchronize()
    print("--- torch.profiler: 50 x attention() fwd+bwd, CPU self time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
