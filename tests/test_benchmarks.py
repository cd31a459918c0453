"""The benchmark harness's own logic on the CPU: the prewarm split and a dry run of the kernel
sweep with prewarm workers (tiny sizes; the timings mean nothing here)."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import common  # noqa: E402
import kernel_sweep  # noqa: E402
import prewarm  # noqa: E402


def _args(*argv):
    p = kernel_sweep.argparse.ArgumentParser()
    common.add_common_args(p)
    kernel_sweep.add_args(p)
    a = p.parse_args(list(argv))
    a.dry_run = a.dry_run or False
    return a


@pytest.mark.parametrize("impls", [list(common.RUN_ORDER), ["flex", "sdpa_flash"], ["inductor"], ["flashfuse_op", "inductor"]])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 12])
def test_prewarm_shares_cover_every_cell_once(impls, n):
    cfgs = kernel_sweep.configs(_args())  # the full grid
    parts, k = prewarm.shares(cfgs, impls, n)
    assert parts == prewarm.shares(cfgs, impls, n)[0]  # every worker computes the same split
    got = sorted((c.label(), i) for part in parts for c, i in part)
    want = sorted((c.label(), i) for c in cfgs for i in impls
                  if i in prewarm.WARM_COST and not (i == "flex" and c.dropout > 0))
    assert got == want
    fams = {}
    for w, part in enumerate(parts):
        for c, i in part:
            if i == "flashfuse_op":
                fams.setdefault(c.family(), set()).add(w)
            if 0 < k < n:
                assert (w < k) == (i == "inductor"), (w, i)
    assert all(len(ws) == 1 for ws in fams.values())  # one process compiles a family's binaries
    assert sum(prewarm.memory_share(i, n, k) for i in range(n)) <= 0.9 + 1e-9
    if "inductor" in impls and len(impls) > 1 and n >= 3:
        assert k == n // 3


def test_kernel_sweep_dry_run_with_prewarm(tmp_path):
    # Two prewarm workers and the timing process, end to end: every cell is a row (errors
    # included), the prewarm summary is in the JSON's meta.
    env = {k: v for k, v in os.environ.items() if k != "FLASHFUSE_AUTOTUNE_REP_MS"}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "kernel_sweep.py"), "--dry-run", "--no-dbias", "--prewarm", "2",
                           "--impls", "flashfuse_op,flashfuse,sdpa_flash,inductor", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    doc = json.loads(path.read_text())
    warm = doc["meta"]["prewarm"]
    assert warm["workers"] == 2 and warm["returncodes"] == [0, 0] and warm["killed"] == 0
    assert warm["warmed"] == warm["planned"] > 0, warm
    rows = [r for r in doc["rows"] if r["suite"] == "kernel_sweep"]
    assert len(rows) == 4 * len(kernel_sweep.configs(_args("--dry-run")))
    assert all(r.get("fwd_ms") is not None for r in rows if r["impl"] != "sdpa_flash" or not r["dropout"]), rows
    assert all(r.get("cell_s") is not None for r in rows)


def test_block_sparse_scaling_goals_fit_wall_clock_and_kernel_time():
    # Synthetic rows: kernel time proportional to the non-empty blocks, wall clock the same plus a
    # fixed host share. The kernel-time fit must find b = 1 (met), the wall-clock fit b < 0.85
    # over all N, and the fit at the largest N alone (little host share there) close to 1.
    import block_sparse

    rows = []
    for n in (4096, 16384, 65536):
        for blocks in (64, 256, 1024, 4096):
            blocks = blocks * n // 4096
            for impl in ("flashfuse_op", "flex"):
                gpu = 1e-3 * blocks
                rows.append({"suite": "block_sparse", "impl": impl, "D": 64, "N": n, "pattern": "sliding", "nonempty_blocks": blocks,
                             "gpu_fwdbwd_ms": gpu, "fwdbwd_ms": gpu + 0.5, "fwd_ms": gpu / 3 + 0.2})
    goals = {g["goal"].split(":")[0]: g for g in block_sparse.compute_goals(rows) if g["goal"].startswith("scaling")}
    kernel = goals["scaling fwd+bwd D=64, GPU kernel time (torch.profiler)"]
    assert kernel["met"] is True and abs(kernel["values"]["flashfuse_op"] - 1.0) < 1e-9
    wall = goals["scaling fwd+bwd D=64"]
    assert wall["met"] is False and wall["values"]["flashfuse_op"] < 0.85
    assert "at N=65536 only: b=0.9" in wall["note"]


def test_kernel_time_counts_overlapping_events_once():
    # flashfuse's dQ runs beside dK/dV on a second stream: kernel time is the GPU's busy time
    assert common.busy_us([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    assert common.busy_us([(0.0, 1.0), (2.0, 3.0)]) == 2.0  # no overlap: the summed durations
    assert common.busy_us([(0.0, 5.0), (1.0, 2.0)]) == 5.0  # one event inside another
    assert common.busy_us([]) == 0.0


def test_block_sparse_paired_rounds_alternate_and_take_medians(monkeypatch):
    # paired_rounds times the kept cells of op and Flex in rounds whose order flips, makes the
    # median of the rounds the row's time, keeps the single-pass time beside it, and the flex
    # goal's note gives the single-pass geomean too.
    import contextlib

    import block_sparse

    order = []
    samples = {"flashfuse_op": [5.0, 1.0, 2.0, 9.0, 3.0], "flex": [4.0, 4.0, 1.0, 6.0, 5.0]}

    def fake_bench(fn, device, warmup, rep):
        impl, field = fn()
        order.append((impl, field))
        if field == "fwd":
            return 0.5
        return samples[impl][sum(1 for i, f in order if i == impl and f == "fwdbwd") - 1]

    monkeypatch.setattr(block_sparse, "bench_ms", fake_bench)
    monkeypatch.setattr(block_sparse, "time_limit", lambda s: contextlib.nullcontext())
    runner = type("R", (), {"opts": type("O", (), {"rep": 50.0, "warmup": 10.0, "device": "cpu"})(), "cell_limit": lambda self: 60.0})()
    keep = {}
    for impl, single in (("flashfuse_op", 4.0), ("flex", 2.0)):
        row = {"suite": "block_sparse", "impl": impl, "N": 4096, "D": 64, "pattern": "sliding", "window_or_doclen": 256,
               "variant": f"{impl}:sliding:256", "fwd_ms": 0.7, "fwdbwd_ms": single}
        keep[impl] = (row, (lambda impl=impl: (impl, "fwd")), (lambda impl=impl: (impl, "fwdbwd")), 1e9, (False, True))
    block_sparse.paired_rounds(runner, keep)
    firsts = [order[i][0] for i in range(0, len(order), 4)]  # each round: fwd, fwdbwd of one impl, then the other's
    assert firsts == ["flashfuse_op", "flex", "flashfuse_op", "flex", "flashfuse_op"]
    op, flex = keep["flashfuse_op"][0], keep["flex"][0]
    assert op["fwdbwd_ms"] == 3.0 and op["fwdbwd_ms_single"] == 4.0 and op["paired_rounds"] == 5
    assert flex["fwdbwd_ms"] == 4.0 and flex["fwdbwd_ms_single"] == 2.0
    assert op["fwd_ms"] == 0.5 and op["fwd_ms_single"] == 0.7
    goal = [g for g in block_sparse.compute_goals([op, flex]) if g["goal"].startswith("block-sparse fwd+bwd vs flex")][0]
    assert abs(goal["values"]["flashfuse_op"] - 4.0 / 3.0) < 1e-9
    assert "single-pass geomean 0.500x" in goal["note"]
