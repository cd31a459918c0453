"""Paired timing of a few block-sparse cells: impls measured in alternating rounds (a diagnostic).

The block-sparse suite times each impl once per cell, one after the other. In host-bound cells
(small N: ~0.2 ms of GPU work under ~0.5-1 ms of host time per eager fwd+bwd) a single run's
wall clock moves with the host's load from second to second, so one impl can be measured in a
slow moment and the next in a fast one. Here every round times each impl once, in turn, so
both see the same stretch of the host's state; the spread across rounds shows the noise.

    python benchmarks/paired_cells.py [--d 128] [--rounds 7] [--cells 4096,document,512 4096,sliding,256]

Per round and impl: do_bench median fwd+bwd ms (`wall`), and host us per call (`host`, least
of 3 loops of 20 calls issued without waiting). Impls: op (flashfuse.attention with the mask,
FLASHFUSE_BWD_OVERLAP as the environment has it: unset, the side stream follows the work),
op_overlap (FLASHFUSE_BWD_OVERLAP=1: dQ beside dK/dV on a second stream), op_serial
(FLASHFUSE_BWD_OVERLAP=0: dQ after dK/dV on one stream) and flex (compiled flex_attention with
create_block_mask). Before commit 2b1dc33 `op` always ran dQ beside dK/dV, as op_overlap does
now. op_nogc and flex_nogc time with Python's garbage collector off (does a collection's pause
land in one impl's loops more than the other's?). The last lines: per cell and impl the median
over rounds, and the median of the per-round ratios flex / impl.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import block_sparse as suite  # noqa: E402
import common  # noqa: E402

IMPLS = ("op", "op_overlap", "op_serial", "flex", "op_nogc", "flex_nogc")
_OVERLAP = {"op_overlap": "1", "op_serial": "0"}  # FLASHFUSE_BWD_OVERLAP per impl (else as the environment has it)


@contextlib.contextmanager
def _impl_env(impl: str):
    """op_overlap / op_serial: FLASHFUSE_BWD_OVERLAP=1 / 0; *_nogc: Python's garbage collector off while timing."""
    was = gc.isenabled()
    if impl.endswith("_nogc"):
        gc.disable()
    try:
        with suite._env("FLASHFUSE_BWD_OVERLAP", _OVERLAP.get(impl)):
            yield
    finally:
        if was:
            gc.enable()


def _impl_fn(impl: str, case, n: int, device: str):
    name = "flex" if impl.startswith("flex") else "flashfuse_op"
    fn, _, _ = suite.build_fn(name, case, n, device, "auto")
    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rep-ms", type=float, default=60.0)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--cells", nargs="*", default=["4096,document,512", "4096,sliding,256", "8192,sliding,256", "16384,document,2048"])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = [i for i in args.impls.split(",") if i]
    summary = []
    for spec in args.cells:
        n, pattern, param = spec.split(",")
        n = int(n)
        param = None if pattern == "causal" else int(param)
        cfg = common.AttnConfig(dtype="bf16", B=1, H=args.heads, N=n, D=args.d, causal=False, dropout=0.0)
        q, k, v, do = common.make_inputs(cfg, device)
        case = suite.MaskCase(pattern, param, n, 1, args.heads, device)
        fns = {}
        for impl in impls:
            fn = _impl_fn(impl, case, n, device)

            def fwdbwd(fn=fn):
                return torch.autograd.grad(fn(q, k, v), (q, k, v), do)
            fns[impl] = fwdbwd
        for impl, f in fns.items():  # compile, autotune, warm caches
            with _impl_env(impl):
                for _ in range(3):
                    f()
        common.sync(device)
        walls = {i: [] for i in impls}
        hosts = {i: [] for i in impls}
        print(f"== N={n} {pattern} {param} D={args.d}", flush=True)
        for r in range(args.rounds):
            line = []
            for impl in impls:
                with _impl_env(impl):
                    wall = common.bench_ms(fns[impl], device, 10.0, args.rep_ms)
                    host = common.host_us(fns[impl], device, n=20, repeats=3)
                walls[impl].append(wall)
                hosts[impl].append(host)
                line.append(f"{impl} {wall:7.3f} ms {host:7.1f} us")
            print(f"  round {r}: " + " | ".join(line), flush=True)
        for impl in impls:
            ratios = [f / o for f, o in zip(walls.get("flex", walls[impl]), walls[impl])]
            summary.append(f"N={n:6d} {pattern:9s} {str(param):5s} {impl:10s} wall med {statistics.median(walls[impl]):7.3f} ms "
                           f"(min {min(walls[impl]):.3f} max {max(walls[impl]):.3f})  host med {statistics.median(hosts[impl]):7.1f} us  "
                           f"flex/this per-round ratio med {statistics.median(ratios):.3f}")
        case.free()
        del fns
        common.cleanup(device)
    print("== summary")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
