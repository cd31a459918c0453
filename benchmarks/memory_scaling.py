"""Memory scaling: peak memory of fwd+bwd vs sequence length, for every impl.

B=1, H=16, D=64 (and 128 in the full run), bf16, N up to 64K. Peak = torch.cuda.max_memory_allocated
after reset_peak_memory_stats, around one fwd+bwd call made after a warm-up (compile) call; it
includes q, k, v, dout and the gradients. OOM -> an error row and "OOM" in the table. Once an
impl runs out of memory at some N, larger N are recorded as OOM without being run.

    python benchmarks/memory_scaling.py --quick
    python benchmarks/memory_scaling.py            # D=64 and 128, N = 1K..64K
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from common import AttnConfig, Budget, CellOptions, Runner, base_row, cleanup, describe_error, error_kind, goal, goals_markdown, make_inputs, md_table  # noqa: E402

SUITE = "memory_scaling"
TARGET = 1.05


def add_args(p) -> None:
    p.add_argument("--head-dims", default=None, help="comma list (default 64 quick, 64,128 full)")
    p.add_argument("--seqlens", default=None, help="comma list (default up to 65536)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=tuple(common.DTYPES))
    p.add_argument("--causal", action="store_true", help="causal attention (default: not causal)")
    p.add_argument("--no-timing", action="store_true", help="only peak memory, no fwd+bwd timing")


def configs(args) -> list:
    if args.dry_run:
        dims, seqs, h = [32], [64, 256], 2
    elif args.quick:
        dims, seqs, h = [64], [4096, 16384, 65536], args.heads
    else:
        dims, seqs, h = [64, 128], [1024, 2048, 4096, 8192, 16384, 32768, 65536], args.heads
    if args.head_dims:
        dims = [int(x) for x in args.head_dims.split(",")]
    if args.seqlens:
        seqs = [int(x) for x in args.seqlens.split(",")]
    return [AttnConfig(args.dtype, 1, h, n, d, args.causal, 0.0) for d in dims for n in seqs]


def run(args, budget: Budget, sink) -> None:
    if args.dry_run:
        w, r = 1.0, 5.0
    else:
        w, r = (5.0, 20.0) if args.quick else (10.0, 50.0)
    opts = CellOptions(device=args.device, kernel=args.kernel, warmup=w, rep=r, measure_fwd=False,
                       measure_fwdbwd=True, check_output=False,
                       cell_timeout=args.cell_timeout_s or (60.0 if args.dry_run else 120.0))
    if args.no_timing:
        opts.warmup, opts.rep = 0.0, 1.0
    runner = Runner(SUITE, sink, budget, opts)
    for cfg in configs(args):
        torch._dynamo.reset()
        inputs = None
        try:
            if runner.skip_reason() is None:
                inputs = make_inputs(cfg, args.device)
        except Exception as e:  # noqa: BLE001
            for impl in args.impl_list:
                runner._emit(base_row(SUITE, impl, cfg, error=describe_error(e)), cfg)
            cleanup(args.device)
            continue
        for impl in args.impl_list:
            if inputs is None:
                runner._emit(base_row(SUITE, impl, cfg, error=runner.skip_reason() or "skipped"), cfg)
                continue
            runner.attention_cell(impl, cfg, inputs)
        inputs = None
        cleanup(args.device)


def compute_goals(rows) -> list:
    rows = [r for r in rows if r.get("suite") == SUITE]
    goals = []
    for d in sorted({r["D"] for r in rows if r.get("D")}):
        vals, n, worst, note = {}, 0, "", ""
        for ours in ("flashfuse", "flashfuse_op"):
            peer = {r["N"]: r for r in rows if r["impl"] == "sdpa_flash" and r["D"] == d}
            mine = {r["N"]: r for r in rows if r["impl"] == ours and r["D"] == d}
            ratios, lost = {}, []
            for N, pr in peer.items():
                mr = mine.get(N)
                if pr.get("peak_mb") is None or mr is None:
                    continue
                if mr.get("peak_mb") is not None:
                    ratios[N] = mr["peak_mb"] / pr["peak_mb"]
                elif error_kind(mr.get("error")) == "OOM":
                    ratios[N] = float("inf")
                    lost.append(N)
            vals[ours] = max(ratios.values()) if ratios else None
            if ours == "flashfuse":
                n = len(ratios)
                if ratios:
                    k = max(ratios, key=ratios.get)
                    worst = f"max at N={k}"
                if lost:
                    note = f"OOM where sdpa_flash ran: N={lost}"
        goals.append(goal(f"memory peak fwd+bwd vs sdpa_flash, D={d} (max ratio over N)", f"<= {TARGET}x", "<=", TARGET, vals, n, worst, note))
    return goals


def render_markdown(rows, goals, meta) -> str:
    rows = [r for r in rows if r.get("suite") == SUITE]
    impls = [i for i in common.RUN_ORDER if any(r["impl"] == i for r in rows)]
    out = [f"# Memory scaling ({meta.get('mode')})", "",
           f"GPU: {meta.get('gpu')} | torch {meta.get('torch')} | triton {meta.get('triton')} | commit {meta.get('git_commit')} | {meta.get('date')}", "",
           "Peak MB of one fwd+bwd (torch.cuda.max_memory_allocated after reset; includes q, k, v, dout and grads). "
           "Second table: fwd+bwd ms.", ""]
    keys = list(dict.fromkeys((r["dtype"], r["B"], r["H"], r["D"], bool(r["causal"]), r["N"]) for r in rows if r.get("N")))
    by = {(r["impl"], (r["dtype"], r["B"], r["H"], r["D"], bool(r["causal"]), r["N"])): r for r in rows if r.get("N")}
    for title, field, nd in (("Peak memory (MB)", "peak_mb", 0), ("fwd+bwd time (ms)", "fwdbwd_ms", 2)):
        table = []
        for k in keys:
            cells = []
            for i in impls:
                r = by.get((i, k))
                if r is None:
                    cells.append("")
                elif r.get(field) is not None:
                    cells.append(f"{r[field]:.{nd}f}")
                else:
                    cells.append(error_kind(r.get("error")) or "")
            dt, b, h, d, c, n = k
            table.append([dt, b, h, d, int(c), n, *cells])
        out += [f"## {title}", "", md_table(["dtype", "B", "H", "D", "causal", "N", *impls], table), ""]
    errs = [r for r in rows if r.get("error") and error_kind(r["error"]) not in ("OOM",)]
    if errs:
        out += ["## Errors (other than OOM)", "", md_table(["impl", "N", "D", "error"], [[r["impl"], r.get("N"), r.get("D"), r["error"]] for r in errs]), ""]
    out += ["## Goals (peak ratio = flashfuse peak / sdpa_flash peak)", "", goals_markdown(goals), ""]
    return "\n".join(out)


def plot(rows, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("suite") == SUITE and r.get("N")]
    dims = sorted({r["D"] for r in rows})
    if not dims:
        return
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.2), squeeze=False)
    colors = {i: plt.cm.tab10(j) for j, i in enumerate(common.IMPLS)}
    for ax, d in zip(axes.flat, dims):
        for i in [i for i in common.RUN_ORDER if any(r["impl"] == i for r in rows)]:
            pts = sorted((r["N"], r["peak_mb"] / 1024) for r in rows if r["impl"] == i and r["D"] == d and r.get("peak_mb") is not None)
            oom = sorted(r["N"] for r in rows if r["impl"] == i and r["D"] == d and error_kind(r.get("error")) == "OOM")
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=i, color=colors[i],
                        lw=2.2 if i.startswith("flashfuse") else 1.2, ls="-" if i.startswith("flashfuse") else "--")
            if oom and pts:
                ax.plot([oom[0]], [pts[-1][1]], marker="x", ms=9, color=colors[i])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (x marks the first OOM)")
        ax.set_ylabel("peak GiB (fwd+bwd)")
        ax.set_title(f"D={d}, B=1, H={rows[0]['H']}, {rows[0]['dtype']}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"flashfuse memory scaling — {meta.get('gpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
