"""Run the quick versions of all benchmark suites in one process, within a time budget.

    python benchmarks/run_all.py --out $OUT                 # quick, ~8 min on an H100 (budget 480 s)
    python benchmarks/run_all.py --dry-run --out /tmp/x     # tiny sizes on the CPU (< 2 min)
    python benchmarks/run_all.py --full --suites kernel_sweep --budget-s 540 --out $OUT

Each suite writes <suite>_<stamp>.json/.md/.png into benchmarks/results/ and --out (a dry run
only into --out). The budget is shared: each suite gets its share of what is left, so time a
suite does not use goes to the next; cells past a suite's share become "skipped: time budget"
rows. The combined goal table (all ratios, shortfalls included) is printed last and written to
summary_<stamp>.md and summary_<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SUITES = ("kernel_sweep", "memory_scaling", "end_to_end", "block_sparse")
SHARES = {"kernel_sweep": 0.32, "memory_scaling": 0.10, "end_to_end": 0.36, "block_sparse": 0.22}
DEFAULT_BUDGET_S = 480.0  # four quick suites, under the device's 10-minute command limit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--full", action="store_true", help="full versions instead of quick (far longer than 10 minutes)")
    p.add_argument("--suites", default=",".join(SUITES), help="comma list of " + ",".join(SUITES))
    p.add_argument("--isolate", action="store_true", help="run each suite in its own process (a broken CUDA context then costs one suite)")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S
    if not args.full:
        args.quick = True
    suites = [s for s in args.suites.split(",") if s]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise SystemExit(f"unknown suites {bad}; valid: {', '.join(SUITES)}")
    common.resolve_common(args)
    total = common.Budget(args.budget_s)
    meta = common.env_info(args.device)
    print(f"run_all: suites={suites} mode={'dry-run' if args.dry_run else ('full' if args.full else 'quick')} "
          f"budget={args.budget_s:.0f}s gpu={meta['gpu']} torch={meta['torch']} triton={meta['triton']} commit={meta['git_commit']}", flush=True)
    all_goals, summary = [], []
    for i, name in enumerate(suites):
        share = SHARES[name] / sum(SHARES[s] for s in suites[i:])
        budget = total.child(share, floor=10.0)
        t0 = time.time()
        if args.isolate:
            goals = _run_isolated(name, args, budget)
        else:
            module = __import__(name)
            args_s = argparse.Namespace(**vars(args))
            # suite-specific options at their defaults
            sp = argparse.ArgumentParser()
            module.add_args(sp)
            for k, v in vars(sp.parse_args([])).items():
                setattr(args_s, k, v)
            sink = common.run_suite(module, args_s, budget, meta)
            goals = sink.goals
            import torch

            torch._dynamo.reset()
            common.cleanup(args.device)
        summary.append({"suite": name, "seconds": round(time.time() - t0, 1), "budget_s": round(budget.seconds or 0, 1)})
        all_goals += [dict(g, suite=name) for g in goals]
    md = ["# flashfuse benchmarks: goals", "",
          f"GPU: {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['git_commit']} | {meta['date']}", "",
          common.md_table(["suite", "seconds", "budget s"], [[s["suite"], s["seconds"], s["budget_s"]] for s in summary]), "",
          common.goals_markdown(all_goals), ""]
    text = "\n".join(md)
    for d in args.dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"summary_{args.stamp}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(d, f"summary_{args.stamp}.json"), "w") as f:
            json.dump(common._clean({"meta": meta, "suites": summary, "goals": all_goals}), f, indent=1)
    print(f"\nrun_all finished in {total.elapsed():.0f}s; results in {', '.join(args.dirs)}\n", flush=True)
    print(text, flush=True)
    return 0


def _run_isolated(name: str, args, budget: common.Budget) -> list:
    cmd = [sys.executable, os.path.join(common.HERE, f"{name}.py"), "--budget-s", str(max(10.0, budget.left())),
           "--stamp", args.stamp, "--device", args.device, "--kernel", args.kernel]
    if args.quick and not args.full:
        cmd.append("--quick")
    if args.dry_run:
        cmd.append("--dry-run")
    if args.out:
        cmd += ["--out", args.out]
    if args.results_dir:
        cmd += ["--results-dir", args.results_dir]
    if args.impls:
        cmd += ["--impls", args.impls]
    if args.cell_timeout_s:
        cmd += ["--cell-timeout-s", str(args.cell_timeout_s)]
    print("$ " + " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, timeout=max(30.0, budget.left() + 120.0))
    except subprocess.TimeoutExpired:
        print(f"{name}: killed after its budget", flush=True)
    path = os.path.join(args.dirs[0], f"{name}_{args.stamp}.json")
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc.get("goals") or __import__(name).compute_goals(doc.get("rows", []))
    except Exception as e:  # noqa: BLE001
        return [{"goal": f"{name}: no results", "error": common.describe_error(e)}]


if __name__ == "__main__":
    sys.exit(main())
