"""Compile time of one attention function: flashfuse's autotuning settings against Inductor.

    python benchmarks/compile_time.py --quick
    python benchmarks/compile_time.py --settings threads-default,serial-all,inductor

Each cell is a fresh Python process with empty Triton, Inductor and flashfuse kernel caches,
so nothing compiled by an earlier cell is reused (as on a new machine). The process builds the
inputs, then times the first forward+backward of `torch.compile(plain attention)` (Dynamo,
AOTAutograd, the pass, Inductor, and for flashfuse the kernel rendering, compilation and
autotuning), then the steady-state forward+backward with do_bench. Settings:

    threads-default  FLASHFUSE_AUTOTUNE=1 (configs not marked "extra"), configs precompiled in threads
    serial-default   the same list, compiled one after another (FLASHFUSE_COMPILE_THREADS=0)
    threads-all      every config (FLASHFUSE_AUTOTUNE=all), precompiled in threads
    serial-all       every config, one after another (the behaviour before the tiers)
    first            FLASHFUSE_AUTOTUNE=0: one config, nothing benchmarked
    threads-rep25    threads-default with each candidate timed for 25 ms (FLASHFUSE_AUTOTUNE_REP_MS=25), not 100
    inductor         the same function through the Inductor backend

`compile_s` is the first call's wall time; `fwdbwd_ms` the steady state (the price of a shorter
list, if any). The goal of #5: compile time at most 1.2x Inductor's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from common import AttnConfig, Budget, base_row, describe_error, fmt, goal, goals_markdown, md_table  # noqa: E402

SUITE = "compile_time"
TARGET = 1.2

SETTINGS = {
    "threads-default": {"FLASHFUSE_AUTOTUNE": "1"},
    "serial-default": {"FLASHFUSE_AUTOTUNE": "1", "FLASHFUSE_COMPILE_THREADS": "0"},
    "threads-all": {"FLASHFUSE_AUTOTUNE": "all"},
    "serial-all": {"FLASHFUSE_AUTOTUNE": "all", "FLASHFUSE_COMPILE_THREADS": "0"},
    "first": {"FLASHFUSE_AUTOTUNE": "0"},
    "threads-rep25": {"FLASHFUSE_AUTOTUNE": "1", "FLASHFUSE_AUTOTUNE_REP_MS": "25"},
    "inductor": {},
}
# GPT-2 small's and BERT-base's attention (bf16, dropout 0.1)
CASES = {
    "gpt2": AttnConfig("bf16", 8, 12, 1024, 64, True, 0.1),
    "bert": AttnConfig("bf16", 16, 12, 512, 64, False, 0.1),
    "d128": AttnConfig("bf16", 4, 16, 4096, 128, True, 0.0),
}


def add_args(p) -> None:
    p.add_argument("--settings", default=None, help="comma list of: " + ",".join(SETTINGS))
    p.add_argument("--cases", default=None, help="comma list of: " + ",".join(CASES))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def _selected(args):
    if args.dry_run:
        settings, cases = ["serial-default", "inductor"], ["gpt2"]
    elif args.quick:
        settings, cases = ["threads-default", "serial-default", "serial-all", "inductor"], ["gpt2"]
    else:
        settings, cases = list(SETTINGS), list(CASES)
    if args.settings:
        settings = args.settings.split(",")
    if args.cases:
        cases = args.cases.split(",")
    bad = [s for s in settings if s not in SETTINGS] + [c for c in cases if c not in CASES]
    if bad:
        raise SystemExit(f"unknown settings or cases: {bad}")
    return settings, cases


def _cfg(case: str, dry_run: bool) -> AttnConfig:
    cfg = CASES[case]
    if dry_run:
        return AttnConfig(cfg.dtype, 1, 2, 64, 32, cfg.causal, cfg.dropout)
    return cfg


def child(args) -> None:
    """One cell, in this (fresh) process: print one JSON row."""
    setting, case = args.child.split(":")
    cfg = _cfg(case, args.dry_run)
    dev = args.device
    impl = "inductor" if setting == "inductor" else "flashfuse"
    row = base_row(SUITE, impl, cfg, setting=setting, case=case)
    try:
        q, k, v, dout = common.make_inputs(cfg, dev, seed=3)
        fn = common.build_impl(impl, cfg, dev, args.kernel)
        common.sync(dev)
        t0 = time.perf_counter()
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        common.sync(dev)
        row["compile_s"] = time.perf_counter() - t0

        def fwdbwd():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

        w, r = (1.0, 5.0) if args.dry_run else (10.0, 50.0)
        row["fwdbwd_ms"] = common.bench_ms(fwdbwd, dev, w, r)
        row["fwdbwd_tflops"] = common.tflops(common.attn_flops(cfg.B, cfg.H, cfg.N, cfg.D, cfg.causal) * common.FWD_BWD_FACTOR,
                                             row["fwdbwd_ms"])
        if impl == "flashfuse":
            launch = sys.modules.get("flashfuse.kernels.launch")
            row["launch_paths"] = dict(getattr(launch, "stats", {}))
            row["fused"] = common.flashfuse_fused_count()
    except Exception as e:  # noqa: BLE001
        row["error"] = describe_error(e)
    print("ROW " + json.dumps(row, default=str), flush=True)


def run(args, budget: Budget, sink) -> None:
    settings, cases = _selected(args)
    for case in cases:
        for setting in settings:
            cfg = _cfg(case, args.dry_run)
            impl = "inductor" if setting == "inductor" else "flashfuse"
            if budget.expired(30.0):
                sink.add(base_row(SUITE, impl, cfg, setting=setting, case=case, error="skipped: time budget"))
                continue
            sink.add(_spawn(args, setting, case, cfg, impl, max(30.0, min(args.cell_timeout_s or 300.0, budget.left()))))


def _spawn(args, setting: str, case: str, cfg: AttnConfig, impl: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="ff_compile_") as tmp:
        env = dict(os.environ)
        for name in ("FLASHFUSE_AUTOTUNE", "FLASHFUSE_COMPILE_THREADS"):
            env.pop(name, None)
        env.update(SETTINGS[setting])
        env.update(TRITON_CACHE_DIR=os.path.join(tmp, "triton"), TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                   FLASHFUSE_CACHE_DIR=os.path.join(tmp, "flashfuse"), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{setting}:{case}", "--device", args.device,
               "--kernel", args.kernel, "--results-dir", tmp]
        if args.dry_run:
            cmd.append("--dry-run")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return base_row(SUITE, impl, cfg, setting=setting, case=case, error=f"timeout after {timeout:.0f}s")
        wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            row = json.loads(line[4:])
            row["process_s"] = wall
            return row
    tail = (proc.stderr or proc.stdout)[-800:]
    return base_row(SUITE, impl, cfg, setting=setting, case=case, error=f"child exited {proc.returncode}: {tail}")


def compute_goals(rows) -> list:
    goals = []
    ok = [r for r in rows if not r.get("error") and r.get("compile_s")]
    for case in dict.fromkeys(r.get("case") for r in ok):
        base = next((r["compile_s"] for r in ok if r.get("case") == case and r.get("setting") == "inductor"), None)
        if not base:
            continue
        for r in ok:
            if r.get("case") == case and r.get("setting") != "inductor":
                ratio = r["compile_s"] / base
                goals.append(goal(f"compile time {case} {r['setting']}", f"<= {TARGET}x Inductor", "<=", TARGET, {"ratio": ratio}))
    return goals


def render_markdown(rows, goals, meta) -> str:
    head = (f"# Compile time\n\nGPU: {meta.get('gpu')} | torch {meta.get('torch')} | triton {meta.get('triton')} | "
            f"commit {meta.get('git_commit')} | {meta.get('date')}\n\n"
            "First forward+backward of torch.compile(plain attention) in a fresh process with empty caches "
            "(Dynamo + AOTAutograd + pass + Inductor + kernel compile/autotune), and the steady-state fwd+bwd.\n\n")
    ind = {r.get("case"): r.get("compile_s") for r in rows if r.get("setting") == "inductor" and r.get("compile_s")}
    table = []
    for r in rows:
        base = ind.get(r.get("case"))
        ratio = (r["compile_s"] / base) if base and r.get("compile_s") else None
        table.append([r.get("case"), r.get("setting"), f"{r.get('dtype')} B={r.get('B')} H={r.get('H')} N={r.get('N')} D={r.get('D')} "
                      f"causal={int(bool(r.get('causal')))} p={r.get('dropout')}", fmt(r.get("compile_s"), 1), fmt(ratio, 2),
                      fmt(r.get("fwdbwd_ms"), 3), fmt(r.get("fwdbwd_tflops"), 0), (r.get("launch_paths") or {}).get("precompiled", ""),
                      r.get("error") or ""])
    return head + md_table(["case", "setting", "shape", "compile s", "x Inductor", "fwd+bwd ms", "TFLOP/s", "precompiled", "error"],
                           table) + "\n\n" + goals_markdown(goals) + "\n"


def plot(rows, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("compile_s")]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['case']}\n{r['setting']}" for r in ok]
    ax.bar(range(len(ok)), [r["compile_s"] for r in ok], color=["tab:gray" if r["setting"] == "inductor" else "tab:blue" for r in ok])
    ax.set_xticks(range(len(ok)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("first fwd+bwd, s")
    ax.set_title(f"compile time ({meta.get('gpu')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--child" in argv:
        p = argparse.ArgumentParser()
        common.add_common_args(p)
        add_args(p)
        args = p.parse_args(argv)
        common.resolve_common(args)
        child(args)
        return 0
    return common.main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
