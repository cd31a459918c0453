"""Which attention regions of real models flashfuse finds, fuses and refuses (CPU, no GPU needed).

Builds the tiny models of tests/models.py (transformers and timm from configs with random
weights, and a hand-written nanoGPT block), compiles each with the flashfuse backend in eval
mode and in train mode with attention dropout 0.1, and writes a markdown table

    model | attention layers | found | fused | refused (reason) | causal | GQA group | notes

to benchmarks/results/model_table.md. Models whose package is missing are listed as skipped.

    python benchmarks/model_table.py [--out benchmarks/results/model_table.md]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402

import flashfuse  # noqa: E402
import models  # noqa: E402  (tests/models.py)

OPTIONS = {"kernel": "reference", "compiler": "aot_eager"}


def _explain(case, dropout: float, train: bool):
    model = case.build(dropout).train(train)
    return flashfuse.explain(model, **case.inputs(), options=OPTIONS)


def _refused(report) -> str:
    reasons = collections.Counter(r.reason for r in report.refused)
    return ", ".join(f"{n} x {reason}" if n > 1 else reason for reason, n in sorted(reasons.items())) or "-"


def _row(case) -> list:
    if case.package and models.try_import(case.package) is None:
        return [case.name, str(case.attention_layers), "-", "-", f"skipped: {case.package} not installed", "-", "-", "-", case.note]
    ev = _explain(case, 0.0, train=False)
    tr = _explain(case, 0.1, train=True)
    found = len(ev.fused) + len(ev.refused)
    causal = sorted({str(r.spec.causal) for r in ev.fused}) or ["-"]
    groups = sorted({r.spec.gqa_group for r in ev.fused}) or ["-"]
    dropout = sorted({f"{r.spec.dropout_p:g}" for r in tr.fused}) or ["-"]
    return [
        case.name, str(case.attention_layers), str(found), str(len(ev.fused)), _refused(ev),
        "/".join(causal), "/".join(map(str, groups)),
        f"{len(tr.fused)} (p={'/'.join(dropout)})", case.note or "-",
    ]


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for pkg in ("transformers", "timm"):
        mod = models.try_import(pkg)
        parts.append(f"{pkg} {getattr(mod, '__version__', 'missing')}")
    return ", ".join(parts)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "model_table.md"))
    parser.add_argument("--models", default="", help="comma-separated names from tests/models.py (default: all)")
    parser.add_argument("--explain", action="store_true", help="print each model's full explain report (train mode, dropout 0.1) too")
    args = parser.parse_args(argv)
    wanted = [m for m in args.models.split(",") if m]
    cases = [c for c in models.CASES if not wanted or c.name in wanted]
    warnings.filterwarnings("ignore")
    print(_versions(), flush=True)
    if args.explain:
        for case in cases:
            torch._dynamo.reset()
            print(f"=== {case.name}\n{_explain(case, 0.1, train=True)}", flush=True)
    rows = []
    for case in cases:
        torch._dynamo.reset()
        rows.append(_row(case))
        print(" | ".join(rows[-1]), flush=True)
    header = ["model", "attention layers", "found", "fused (eval)", "refused (reason)", "causal", "GQA group",
              "fused (train, dropout 0.1)", "notes"]
    lines = [
        "# Attention regions flashfuse finds in real models",
        "",
        f"Regenerate with `python benchmarks/model_table.py` ({_versions()}). Tiny configs with random",
        "weights (tests/models.py): 2 layers, hidden 32-64, sequence 8, eager attention, padding masks",
        "where the model takes them. `found` counts softmax regions the pass examined (fused + refused)",
        "in eval mode; the train column compiles again with attention dropout 0.1.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
