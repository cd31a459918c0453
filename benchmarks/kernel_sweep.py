"""Kernel sweep: flashfuse (compiled and op) vs SDPA flash/cuDNN/mem-efficient, FlexAttention, eager, Inductor.

16K tokens per batch and model width 2048: B = 16384 // N, H = 2048 // D.
FLOPs = 4*B*H*N^2*D (halved for causal); fwd+bwd = 3.5x fwd. Times are medians of
triton.testing.do_bench after a warm-up call (which also compiles). The forward is timed with
inputs that require grad (a training forward). Also tests which impls give a gradient for an
additive bias (dBias) and writes those as suite "dbias" rows.

    python benchmarks/kernel_sweep.py --quick          # ~3 min on an H100
    python benchmarks/kernel_sweep.py                  # the full grid, 768 cells: 545 s on an H100
    python benchmarks/kernel_sweep.py --dtypes bf16     # a part of it

A full CUDA run first compiles every cell in worker processes (benchmarks/prewarm.py,
--prewarm N) and times each autotune candidate for 25 ms (--autotune-rep-ms).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
import prewarm  # noqa: E402
from common import (AttnConfig, Budget, CellOptions, Runner, base_row, build_impl, cleanup, describe_error,  # noqa: E402
                    error_kind, fmt, geomean, goal, goals_markdown, make_inputs, md_table, time_limit)

SUITE = "kernel_sweep"
PEERS = ("sdpa_flash", "flex", "sdpa_cudnn")
OURS = ("flashfuse", "flashfuse_op")
GOAL_IMPLS = ("sdpa_flash", "sdpa_cudnn", "flashfuse_op", "flashfuse", "flex")


def add_args(p) -> None:
    p.add_argument("--dtypes", default=None, help="comma list, e.g. bf16,fp16")
    p.add_argument("--head-dims", default=None, help="comma list, e.g. 64,128")
    p.add_argument("--seqlens", default=None, help="comma list, e.g. 512,1024,...,16384")
    p.add_argument("--causal", default=None, choices=("0", "1", "both"))
    p.add_argument("--dropout", default=None, help="comma list of dropout probabilities, e.g. 0,0.1")
    p.add_argument("--no-dbias", action="store_true", help="skip the dBias capability test")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--prewarm", type=int, default=None,
                   help="compile the cells in this many worker processes before timing (benchmarks/prewarm.py); "
                        f"default {prewarm.default_workers()} for a full CUDA run, 0 otherwise")
    p.add_argument("--warm-shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--autotune-rep-ms", type=float, default=None,
                   help="FLASHFUSE_AUTOTUNE_REP_MS for this run (default: 25 for a full run, else the environment's or the library's 100)")


def _csv(s, cast):
    return [cast(x) for x in s.split(",")] if s else None


def configs(args) -> list:
    """The sweep's configs, dropout-0 ones first (the main goals), then the dropout ones."""
    if args.dry_run:
        dtypes, dims, seqs, causals, drops = ["bf16"], [32], [64], [False, True], [0.0]
        tokens, width = 256, 64
        extra = [("bf16", 32, 64, False, 0.1), ("fp16", 32, 128, True, 0.0)]
    elif args.quick:
        dtypes, dims, seqs, causals, drops = ["bf16"], [64, 128], [1024, 4096, 16384], [False, True], [0.0]
        tokens, width = common.TOKENS_PER_BATCH, common.MODEL_WIDTH
        extra = [("bf16", 64, 4096, False, 0.1), ("bf16", 128, 4096, True, 0.1)]
    else:
        dtypes, dims, seqs, causals, drops = ["bf16", "fp16"], [64, 128], [512, 1024, 2048, 4096, 8192, 16384], [False, True], [0.0, 0.1]
        tokens, width = common.TOKENS_PER_BATCH, common.MODEL_WIDTH
        extra = []
    user = any(x is not None for x in (args.dtypes, args.head_dims, args.seqlens, args.causal, args.dropout))
    if user:
        extra = []
    dtypes = _csv(args.dtypes, str) or dtypes
    dims = _csv(args.head_dims, int) or dims
    seqs = _csv(args.seqlens, int) or seqs
    if args.causal is not None:
        causals = {"0": [False], "1": [True], "both": [False, True]}[args.causal]
    drops = _csv(args.dropout, float) or drops
    out = []
    for p in sorted(drops):
        for dt in dtypes:
            for d in dims:
                for c in causals:
                    for n in seqs:
                        out.append((dt, d, n, c, p))
    for e in extra:
        if e not in out:
            out.append(e)
    cfgs = []
    for dt, d, n, c, p in out:
        cfgs.append(AttnConfig(dtype=dt, B=max(1, tokens // n), H=max(1, width // d), N=n, D=d, causal=c, dropout=p))
    return cfgs


def _bench_opts(args):
    if args.dry_run:
        w, r = 2.0, 10.0
    elif args.quick:
        w, r = 10.0, 40.0
    else:
        # NB: 25 / 100 ms (do_bench's defaults) until 2026-11-22; at 10 / 50 the ~1500 timings of
        # a full sweep fit one device call with the compiles (medians of >= 10 repetitions).
        w, r = 10.0, 50.0
    return (args.warmup_ms if args.warmup_ms is not None else w), (args.rep_ms if args.rep_ms is not None else r)


def run(args, budget: Budget, sink) -> None:
    warmup, rep = _bench_opts(args)
    opts = CellOptions(device=args.device, kernel=args.kernel, warmup=warmup, rep=rep,
                       cell_timeout=args.cell_timeout_s or (60.0 if args.dry_run else 150.0))
    runner = Runner(SUITE, sink, budget, opts)
    cfgs = configs(args)
    rep = args.autotune_rep_ms
    if rep is None and not (args.quick or args.dry_run) and "FLASHFUSE_AUTOTUNE_REP_MS" not in os.environ:
        # NB: the autotuner times each candidate for 100 ms by default; a full sweep autotunes
        # 96 keys x 3 kernels x ~10 candidates. At 25 ms that takes a quarter of the time; the
        # choices are compared with 100 ms ones in benchmarks/results/NOTES.md (2026-11-22).
        rep = 25.0
    if rep is not None:
        os.environ["FLASHFUSE_AUTOTUNE_REP_MS"] = f"{rep:g}"  # read per autotune; inherited by the prewarm workers
    from flashfuse.kernels import configs as ff_configs

    sink.meta["autotune_rep_ms"] = ff_configs.autotune_rep_ms()  # what the library makes of the variable
    workers = args.prewarm if args.prewarm is not None else (prewarm.default_workers() if args.device == "cuda" and not args.quick and not args.dry_run else 0)
    if workers > 0:
        warm = prewarm.run_workers(os.path.abspath(__file__), _worker_argv(args), workers, seconds=min(180.0, 0.35 * (budget.left() or 600.0)))
        warm["planned"] = sum(len(part) for part in prewarm.shares(cfgs, args.impl_list, workers)[0])
        sink.meta["prewarm"] = {k: v for k, v in warm.items() if k != "log"}
        print(f"prewarm: {warm['warmed']} of {warm['planned']} cells compiled by {workers} workers in {warm['seconds']} s "
              f"({warm['killed']} killed at the deadline; return codes {warm['returncodes']})", flush=True)
        for line in warm["log"]:
            if " ok " not in line:
                print("  " + line, flush=True)
    if not args.no_dbias:
        dbias_test(args, runner)
    # Pass 1: the impls the goals need, over every config; pass 2: the rest. A budget that runs
    # out then costs context (eager, Inductor, mem-efficient), not the goal ratios.
    first = [i for i in args.impl_list if i in GOAL_IMPLS]
    second = [i for i in args.impl_list if i not in GOAL_IMPLS]
    for impls in (first, second):
        if not impls:
            continue
        for cfg in cfgs:
            run_config(args, runner, cfg, impls)
    launch = sys.modules.get("flashfuse.kernels.launch")
    for name, key, config in getattr(launch, "choices", ()):
        # what the autotuner picked, per kernel and autotune key: the data behind configs.CONFIGS' order
        print(f"autotune {name} {key} -> {config}", flush=True)


def _worker_argv(args) -> list:
    """This run's selection, for the prewarm workers (they recompute the same configs)."""
    argv = ["--device", args.device, "--kernel", args.kernel, "--impls", ",".join(args.impl_list)]
    argv += [f for f, on in (("--quick", args.quick), ("--dry-run", args.dry_run)) if on]
    for flag, value in (("--dtypes", args.dtypes), ("--head-dims", args.head_dims), ("--seqlens", args.seqlens),
                        ("--causal", args.causal), ("--dropout", args.dropout)):
        if value is not None:
            argv += [flag, value]
    return argv


def run_config(args, runner: Runner, cfg: AttnConfig, impls: list) -> None:
    torch._dynamo.reset()  # one compile per shape anyway; keeps the caches small
    common.settle(args.device)
    inputs = None
    try:
        if runner.skip_reason() is None:
            inputs = make_inputs(cfg, args.device)
    except Exception as e:  # noqa: BLE001  (inputs alone may not fit)
        for impl in impls:
            runner._emit(base_row(SUITE, impl, cfg, error=describe_error(e)), cfg)
        cleanup(args.device)
        return
    ref: dict = {}
    for impl in impls:
        if inputs is None:
            runner._emit(base_row(SUITE, impl, cfg, error=runner.skip_reason() or "skipped"), cfg)
            continue
        runner.attention_cell(impl, cfg, inputs, ref)
    inputs = ref = None
    cleanup(args.device)


# --------------------------------------------------------------------------------------------
# dBias: which impls give a gradient for an additive bias

def dbias_test(args, runner: Runner) -> None:
    """For each impl: out = attn(q, k, v, bias) with bias [B, H, N, N] requiring grad; compare
    dBias with an fp32 eager reference and time fwd+bwd (incl. dBias) at this one shape."""
    dev = args.device
    if args.dry_run:
        cfg = AttnConfig("bf16", 1, 2, 64, 32, False, 0.0)
    else:
        cfg = AttnConfig("bf16", 2, 16, 1024, 64, False, 0.0)
    suite = "dbias"
    try:
        q, k, v, dout = make_inputs(cfg, dev, seed=1)
        g = torch.Generator(device=dev).manual_seed(2)
        bias = torch.randn(cfg.B, cfg.H, cfg.N, cfg.N, generator=g, device=dev, dtype=common.DTYPES[cfg.dtype]).requires_grad_(True)
        leaves32 = [t.detach().float().requires_grad_(True) for t in (q, k, v, bias)]
        ref_out = common.plain_attention(*leaves32[:3], False, 0.0, leaves32[3])
        ref_grads = torch.autograd.grad(ref_out, leaves32, dout.float())
        ref_db = ref_grads[3]
    except Exception as e:  # noqa: BLE001
        runner._emit(base_row(suite, "-", cfg, error=f"dbias setup failed: {describe_error(e)}"))
        return
    for impl in args.impl_list:
        row = base_row(suite, impl, cfg, dbias=None)
        skip = runner.skip_reason()
        if skip:
            row["error"] = skip
            runner._emit(row)
            continue
        fn = None
        try:
            with time_limit(runner.cell_limit()):
                fused0 = common.flashfuse_fused_count()
                fn = build_impl(impl, cfg, dev, args.kernel, with_bias=True)
                out = fn(q, k, v, bias)
                if impl == "flashfuse":
                    row["fused"] = common.flashfuse_fused_count() - fused0
                grads = torch.autograd.grad(out, (q, k, v, bias), dout, allow_unused=True)
                out = None
                db = grads[3]
                if db is None:
                    row["dbias"] = False
                    row["error"] = "unsupported: no gradient for the bias (None)"
                else:
                    rel = ((db.float() - ref_db).abs().max() / ref_db.abs().max().clamp_min(1e-12)).item()
                    row["dbias_rel_err"] = rel
                    row["dbias"] = bool(rel < 0.05)
                    if not row["dbias"]:
                        row["note"] = f"dBias wrong: max rel err {rel:.3g}"
                    grads = db = None

                    def fwdbwd():
                        return torch.autograd.grad(fn(q, k, v, bias), (q, k, v, bias), dout)

                    row["fwdbwd_ms"] = common.bench_ms(fwdbwd, dev, runner.opts.warmup, runner.opts.rep)
                    row["fwdbwd_tflops"] = common.tflops(common.attn_flops(cfg.B, cfg.H, cfg.N, cfg.D, False) * common.FWD_BWD_FACTOR, row["fwdbwd_ms"])
                    row["peak_mb"], row["peak_delta_mb"] = common.peak_memory_mb(fwdbwd, dev)
        except (Exception, common.CellTimeout) as e:  # noqa: BLE001
            row["dbias"] = False
            row["error"] = describe_error(e)
        finally:
            fn = None
            cleanup(dev)
        runner._emit(row)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# goals, tables, plot

def _key(r):
    return (r["dtype"], r["B"], r["H"], r["N"], r["D"], bool(r["causal"]), float(r["dropout"] or 0))


def _label(k):
    dt, b, h, n, d, c, p = k
    return f"{dt} N={n} D={d}{' causal' if c else ''}{f' p={p:g}' if p else ''}"


def _speedups(rows, ours, peer, field, dropout: bool):
    by = {}
    for r in rows:
        if r.get("suite") != SUITE or r.get(field) is None:
            continue
        if bool(r.get("dropout")) != dropout:
            continue
        if r["impl"] == "flashfuse" and r.get("fused") == 0:
            continue  # not fused: those are Inductor's numbers
        by[(r["impl"], _key(r))] = r[field]
    ratios = {}
    for (impl, k), ms in by.items():
        if impl == ours and (peer, k) in by:
            ratios[k] = by[(peer, k)] / ms
    return ratios


def compute_goals(rows) -> list:
    goals = []
    unfused = sum(1 for r in rows if r.get("suite") == SUITE and r["impl"] == "flashfuse" and r.get("fused") == 0)
    note = f"{unfused} unfused flashfuse cells left out" if unfused else ""
    specs = [(f"{f} vs {peer}", peer, field, False, 1.0)
             for peer in PEERS for f, field in (("fwd", "fwd_ms"), ("fwd+bwd", "fwdbwd_ms"))]
    specs += [(f"dropout {f} vs sdpa_flash", "sdpa_flash", field, True, 1.3) for f, field in (("fwd", "fwd_ms"), ("fwd+bwd", "fwdbwd_ms"))]
    for name, peer, field, drop, thr in specs:
        vals, n, worst = {}, 0, ""
        for ours in OURS:
            ratios = _speedups(rows, ours, peer, field, drop)
            vals[ours] = geomean(ratios.values())
            if ours == "flashfuse":
                n = len(ratios)
                if ratios:
                    k = min(ratios, key=ratios.get)
                    worst = f"min {ratios[k]:.2f}x at {_label(k)}"
        goals.append(goal(f"kernel {name} (speedup, geomean)", f">= {thr}x", ">=", thr, vals, n, worst, note))
    return goals


def _cell(r, field_ms, field_tf):
    if r is None:
        return ""
    if r.get(field_ms) is not None:
        return f"{r[field_tf]:.0f}" if r.get(field_tf) is not None and r[field_tf] >= 1 else f"{r[field_ms]:.3g}ms"
    return error_kind(r.get("error")) or "?"


def render_markdown(rows, goals, meta) -> str:
    main = [r for r in rows if r.get("suite") == SUITE]
    impls = [i for i in common.RUN_ORDER if any(r["impl"] == i for r in main)]
    keys = list(dict.fromkeys(_key(r) for r in main if r.get("N")))
    by = {(r["impl"], _key(r)): r for r in main if r.get("N")}
    out = [f"# Kernel sweep ({meta.get('mode')})", "",
           f"GPU: {meta.get('gpu')} | torch {meta.get('torch')} | triton {meta.get('triton')} | commit {meta.get('git_commit')} | {meta.get('date')}", "",
           "Cells: TFLOP/s (FLOPs = 4*B*H*N^2*D, halved for causal; fwd+bwd = 3.5x). "
           "16K tokens per batch, width 2048 (B = 16384/N, H = 2048/D). Median of triton.testing.do_bench.", ""]
    cols = ["dtype", "D", "causal", "p", "N", "B", "H"]
    for title, fms, ftf in (("Forward", "fwd_ms", "fwd_tflops"), ("Forward + backward", "fwdbwd_ms", "fwdbwd_tflops")):
        table = []
        for k in keys:
            dt, b, h, n, d, c, p = k
            table.append([dt, d, int(c), f"{p:g}", n, b, h, *[_cell(by.get((i, k)), fms, ftf) for i in impls]])
        out += [f"## {title} (TFLOP/s)", "", md_table(cols + impls, table), ""]
    table = []
    for k in keys:
        dt, b, h, n, d, c, p = k
        cells = []
        for i in impls:
            r = by.get((i, k))
            cells.append("" if r is None else (f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else (error_kind(r.get("error")) or "")))
        table.append([dt, d, int(c), f"{p:g}", n, b, h, *cells])
    out += ["## Peak memory of fwd+bwd (MB, torch.cuda.max_memory_allocated)", "", md_table(cols + impls, table), ""]
    db = [r for r in rows if r.get("suite") == "dbias"]
    if db:
        r0 = db[0]
        out += [f"## Gradient for an additive bias (dBias), B={r0['B']} H={r0['H']} N={r0['N']} D={r0['D']} {r0['dtype']}", "",
                md_table(["impl", "dBias", "rel err", "fwd+bwd ms", "peak MB", "error / note"],
                         [[r["impl"], fmt(r.get("dbias")), fmt(r.get("dbias_rel_err"), 4) if r.get("dbias_rel_err") is not None else "",
                           fmt(r.get("fwdbwd_ms"), 3), fmt(r.get("peak_mb"), 0), (r.get("error") or r.get("note") or "")[:160]] for r in db]), ""]
    errs = [r for r in main if r.get("error")]
    notes = [r for r in main if r.get("note")]
    if errs or notes:
        out += ["## Errors and notes", "", md_table(["impl", "config", "error / note"],
                [[r["impl"], _label(_key(r)) if r.get("N") else "", (r.get("error") or "") + (" " + r["note"] if r.get("note") else "")] for r in errs + notes]), ""]
    out += ["## Goals (flashfuse speedup = peer ms / flashfuse ms)", "", goals_markdown(goals), ""]
    return "\n".join(out)


def plot(rows, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r.get("suite") == SUITE and r.get("N")]
    fams = list(dict.fromkeys((r["dtype"], r["D"], bool(r["causal"]), float(r["dropout"] or 0)) for r in main))
    panels = [(f, pas) for f in fams for pas in ("fwd", "fwdbwd")]
    if not panels:
        return
    ncol = 4 if len(panels) >= 4 else len(panels)
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    impls = [i for i in common.RUN_ORDER if any(r["impl"] == i for r in main)]
    colors = {i: plt.cm.tab10(j) for j, i in enumerate(common.IMPLS)}
    for ax, ((dt, d, c, p), pas) in zip(axes.flat, panels):
        for i in impls:
            pts = sorted((r["N"], r[f"{pas}_tflops"]) for r in main if r["impl"] == i and r.get(f"{pas}_tflops") is not None
                         and (r["dtype"], r["D"], bool(r["causal"]), float(r["dropout"] or 0)) == (dt, d, c, p))
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=i, color=colors[i],
                        lw=2.2 if i.startswith("flashfuse") else 1.2, ls="-" if i.startswith("flashfuse") else "--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{'fwd' if pas == 'fwd' else 'fwd+bwd'} {dt} D={d}{' causal' if c else ''}{f' p={p:g}' if p else ''}", fontsize=9)
        ax.set_xlabel("N")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    height = fig.get_figheight()
    top = 1 - 0.75 / height  # 0.75 in for the title and the legend, whatever the figure's height
    fig.suptitle(f"flashfuse kernel sweep — {meta.get('gpu')} — torch {meta.get('torch')} — TFLOP/s vs N", y=1 - 0.08 / height, fontsize=10)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / height), ncol=min(8, len(labels)) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def warm_main(argv) -> int:
    p = argparse.ArgumentParser()
    common.add_common_args(p)
    add_args(p)
    args = p.parse_args(argv)
    common.resolve_common(args)
    return prewarm.worker(args, configs(args), args.warm_shard)


if __name__ == "__main__":
    if "--warm-shard" in sys.argv:
        sys.exit(warm_main(sys.argv[1:]))
    sys.exit(common.main_for(sys.modules[__name__]))
