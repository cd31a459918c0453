"""Merge result JSON files of the same suite (e.g. a full kernel sweep run in parts) and redo the
markdown table, PNG plot and goal ratios. Runs anywhere (no GPU needed).

    python benchmarks/report.py benchmarks/results/kernel_sweep_*.json --out /tmp/merged
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

KEY_FIELDS = ("suite", "impl", "variant", "model", "dtype", "B", "H", "N", "D", "causal", "dropout")


def merge(docs: list) -> tuple[list, dict]:
    """Rows keyed by config; a later measured row replaces an earlier one, an error row never
    replaces a measured one."""
    by: dict = {}
    for doc in docs:
        for r in doc.get("rows", []):
            k = tuple(r.get(f) for f in KEY_FIELDS)
            old = by.get(k)
            if old is None or r.get("error") is None or old.get("error") is not None:
                by[k] = r
    meta = dict(docs[-1].get("meta", {})) if docs else {}
    meta["merged_from"] = [d.get("_path") for d in docs]
    commits = sorted({d.get("meta", {}).get("git_commit") for d in docs})
    if len(commits) > 1:
        meta["git_commit"] = ",".join(str(c) for c in commits)
    return list(by.values()), meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    groups: dict = {}
    for path in args.files:
        with open(path) as f:
            doc = json.load(f)
        doc["_path"] = path
        if "suite" not in doc or "rows" not in doc:
            print(f"skipping {path}: not a suite result file")
            continue
        groups.setdefault(doc["suite"], []).append(doc)
    stamp = common.stamp_now()
    all_goals = []
    for suite, docs in groups.items():
        module = __import__(suite)
        rows, meta = merge(sorted(docs, key=lambda d: d.get("meta", {}).get("date", "")))
        meta["mode"] = f"merged from {len(docs)} file(s)"
        sink = common.ResultSink(f"{suite}_merged", meta, [args.out], stamp, verbose=False)
        sink.rows = rows
        for f in sink.finish(module):
            print(f"wrote {f}")
        all_goals += [dict(g, suite=suite) for g in sink.goals]
    print("\n" + common.goals_markdown(all_goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
