"""flashfuse.explain: compile once with the flashfuse backend, run once, return the report."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from flashfuse import report as report_mod
from flashfuse.report import Report


def explain(model_or_fn, *args, options: Optional[Mapping[str, Any]] = None, **kwargs) -> Report:
    """Compile `model_or_fn` with backend="flashfuse", call it once on the arguments, report.

    Each Dynamo graph's code before and after the rewrite, each fused region (user's
    file:line, spec, kernel) and each refused candidate with its reason. The call's result
    is kept in `report.result`.
    """
    report = Report()
    compiled = torch.compile(model_or_fn, backend="flashfuse", options=dict(options or {}))
    report_mod.push_collector(report)
    try:
        # A fresh compile: cached code from an earlier torch.compile would skip the backend.
        with torch._dynamo.config.patch(recompile_limit=64):
            torch._dynamo.reset()
            report.result = compiled(*args, **kwargs)
    finally:
        report_mod.pop_collector()
    return report
