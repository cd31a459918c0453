"""Compile a sweep's kernels in parallel worker processes before it times anything.

A kernel-sweep cell spends most of its wall time compiling, not timing: FlexAttention and
Inductor compile every static shape anew (~4 s and ~2.5 s per config on the H100 host), and
flashfuse's op compiles its autotune candidates once per (dtype, D, causal, dropout) family
(~5-10 s). All of that is single-process CPU work, and all of it lands in on-disk caches
(Inductor's FX graph and AOTAutograd caches, Triton's kernel cache) that a later process reads
back in a fraction of the time. So a full sweep first runs `n` workers, each compiling its share
of the (config, impl) cells by calling it once (fwd + bwd), and the timing process that follows
finds the compiled code on disk. The workers time nothing; their GPU use (first calls, the op's
autotuning) is over before the timing starts. A cell a worker could not warm (out of memory
under its share of the GPU, or any error) is compiled by the timing process as before.

NB (H100 host, 2026-11-22, before this module): the eight parts of the full sweep spent
637 s of their 1140 s in first calls (flashfuse_op 280 s, Flex 199 s, Inductor 60 s on a
quarter of the grid, cuDNN 55 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

import common
from common import build_impl, cleanup, describe_error, make_inputs

# what a worker warms, and the rough cost of one cell (s) for balancing the shares
WARM_COST = {"flashfuse_op": 1.5, "flex": 4.0, "inductor": 2.5, "flashfuse": 0.5}
FAMILY_COMPILE = 8.0  # flashfuse_op: the first cell of a family compiles its candidates
# Inductor's cells materialize the N x N scores (fwd + bwd peak ~4-5x one score tensor, 10 GB
# at N=2048 here): a third of the workers take all of them and most of the GPU's memory; the
# rest (flashfuse, Flex: O(N) memory) share what is left.
HEAVY_SHARE, LIGHT_SHARE = 0.6, 0.3  # of the GPU's memory: all heavy workers, all light ones (Flex's eager
# create_block_mask makes N^2 int64 temporaries: 2 GB at N=16K)
# NB: 2026-11-22 (H100, bf16 p=0 grid, 8 workers of 0.9/8 of the memory each): 88 of 96 cells
# warmed in 69 s; the 8 failures were Inductor's N >= 4096 cells, out of memory.


def default_workers() -> int:
    return max(1, min(12, (os.cpu_count() or 2) - 4))


def _heavy(impl: str) -> bool:
    return impl == "inductor"


def units(cfgs: list, impls: list) -> list:
    """Work units [(cost, big, [(cfg, impl), ...])]: one per cell, except that the op's cells of
    one family stay together (they share compiled binaries, so one process should compile them)."""
    out, fams = [], {}
    for cfg in cfgs:
        for impl in impls:
            if impl not in WARM_COST or (impl == "flex" and cfg.dropout > 0):
                continue
            if impl == "flashfuse_op":
                fams.setdefault(cfg.family(), []).append((cfg, impl))
            else:
                out.append((WARM_COST[impl], _heavy(impl), [(cfg, impl)]))
    for cells in fams.values():
        out.append((FAMILY_COMPILE + WARM_COST["flashfuse_op"] * len(cells), False, cells))
    return out


def n_heavy(n: int, units_: list) -> int:
    """How many workers (the first ones) take the memory-heavy cells: a third, when there are
    both kinds of cells and at least three workers; all or none when only one kind is left."""
    heavy = any(u[1] for u in units_)
    light = any(not u[1] for u in units_)
    if not heavy:
        return 0
    if not light:
        return n
    return n // 3 if n >= 3 else 0


def memory_share(i: int, n: int, k: int) -> float:
    """Worker i's fraction of the GPU's memory, with k heavy workers."""
    if k == 0 or k == n:
        return min(1.0, 0.9 / n)
    return HEAVY_SHARE / k if i < k else LIGHT_SHARE / (n - k)


def shares(cfgs: list, impls: list, n: int) -> tuple:
    """(each worker's cells, how many of the workers are heavy): longest unit first to the
    least-loaded worker of its kind (deterministic, so every worker computes the same split)."""
    todo = units(cfgs, impls)
    k = n_heavy(n, todo)
    load, parts = [0.0] * n, [[] for _ in range(n)]
    for cost, heavy, cells in sorted(todo, key=lambda u: -u[0]):
        pool = range(n) if k in (0, n) else range(k) if heavy else range(k, n)
        i = min(pool, key=lambda j: (load[j], j))
        load[i] += cost
        parts[i].extend(cells)
    return parts, k


def run_workers(script: str, argv: list, n: int, seconds: float) -> dict:
    """Start `n` copies of `script argv --warm-shard i/n`, wait up to `seconds`, kill the rest.

    Each worker writes to its own file (not a pipe: a chatty worker would block on a full pipe
    until the parent reads it)."""
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # parallelism comes from the workers
    env.setdefault("FLASHFUSE_COMPILE_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="flashfuse_prewarm_") as tmp:
        logs = [os.path.join(tmp, f"worker{i}.log") for i in range(n)]
        procs = []
        for i in range(n):
            with open(logs[i], "w") as out:
                procs.append(subprocess.Popen([sys.executable, script, *argv, "--warm-shard", f"{i}/{n}"], env=env,
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        rcs, killed = [], 0
        for p in procs:
            try:
                rcs.append(p.wait(timeout=max(1.0, seconds - (time.time() - t0))))
            except subprocess.TimeoutExpired:
                killed += 1
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # the worker and its compile subprocesses
                rcs.append(p.wait())
        lines = []
        for path in logs:
            with open(path, errors="replace") as f:
                lines += [ln.rstrip("\n") for ln in f if ln.startswith("[warm]")]
    warmed = sum(1 for ln in lines if " ok " in ln)
    return {"workers": n, "seconds": round(time.time() - t0, 1), "returncodes": rcs, "killed": killed,
            "cells": len(lines), "warmed": warmed, "log": lines}


def worker(args, cfgs: list, shard: str) -> int:
    """One worker: call each of its cells once (fwd + bwd), which compiles and caches it."""
    i, n = (int(x) for x in shard.split("/"))
    parts, k = shares(cfgs, args.impl_list, n)
    mine = parts[i]
    dev = args.device
    if dev == "cuda":
        torch.cuda.set_per_process_memory_fraction(memory_share(i, n, k))
    for cfg, impl in mine:
        if impl != "flashfuse_op":
            torch._dynamo.reset()  # as the timing process does per config
        t0 = time.perf_counter()
        status, fn = "ok", None
        try:
            q, k, v, dout = make_inputs(cfg, dev)
            fn = build_impl(impl, cfg, dev, args.kernel)
            torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
            common.sync(dev)
        except (Exception, common.CellTimeout) as e:  # noqa: BLE001  (the timing process compiles it then)
            status = f"failed {describe_error(e)[:100]}"
        q = k = v = dout = fn = None  # noqa: F841
        cleanup(dev)
        print(f"[warm] {i}/{n} {impl} {cfg.label()} {status} {time.perf_counter() - t0:.1f}s", flush=True)
    return 0
