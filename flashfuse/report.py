"""The explain report: what each Dynamo graph looked like before and after, and why."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from flashfuse.spec import AttentionSpec

ONLINE_SOFTMAX = (
    "for each key block j:  s = scale*q@k_j^T + bias_j (masked)\n"
    "                       m_new = max(m, rowmax(s)); p = exp(s - m_new)\n"
    "                       l = l*exp(m - m_new) + rowsum(p); acc = acc*exp(m - m_new) + dropout(p)@v_j; m = m_new\n"
    "out = acc / l;  logsumexp = m + log(l)"
)


@dataclasses.dataclass
class FusedRegion:
    location: str              # the user's file:line of the softmax
    node: str                  # the op node in the rewritten graph
    spec: AttentionSpec
    kernel: str                # what the op is called with
    runs_as: str               # what that resolves to on the region's device
    sources: tuple = ()        # generated Triton source files

    def __str__(self) -> str:
        lines = [f"{self.location}: fused as {self.node} (kernel={self.kernel}, runs as {self.runs_as})", f"    {self.spec.summary()}"]
        lines += [f"    source: {s}" for s in self.sources]
        return "\n".join(lines)


@dataclasses.dataclass
class GraphReport:
    index: int
    before: str
    after: str
    fused: list = dataclasses.field(default_factory=list)
    refused: list = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    def __str__(self) -> str:
        out = [f"=== graph {self.index}: {len(self.fused)} fused, {len(self.refused)} refused ==="]
        out += [str(r) for r in self.fused]
        out += [str(r) for r in self.refused]
        if self.error:
            out.append(f"fusion pass failed, graph kept as it was: {self.error}")
        out += ["--- before ---", self.before.strip(), "--- after ---", self.after.strip()]
        return "\n".join(out)


@dataclasses.dataclass
class Report:
    graphs: list = dataclasses.field(default_factory=list)
    result: object = None

    @property
    def fused(self) -> list:
        return [r for g in self.graphs for r in g.fused]

    @property
    def refused(self) -> list:
        return [r for g in self.graphs for r in g.refused]

    def __str__(self) -> str:
        head = f"flashfuse: {len(self.graphs)} graph(s), {len(self.fused)} attention region(s) fused, {len(self.refused)} refused"
        body = [str(g) for g in self.graphs]
        if self.fused:
            body.append("--- fused regions run the online softmax ---\n" + ONLINE_SOFTMAX)
        return "\n".join([head, *body])


def normalize_code(code: str) -> str:
    """Graph code without the noise that changes between runs (for snapshot tests)."""
    code = re.sub(r"\s+$", "", code, flags=re.M).strip("\n")
    return re.sub(r" at 0x[0-9a-f]+", "", code)


_collectors: list = []


def push_collector(report: Report) -> None:
    _collectors.append(report)


def pop_collector() -> None:
    _collectors.pop()


def record(graph_report: GraphReport) -> None:
    global _last
    for c in _collectors:
        graph_report.index = len(c.graphs)
        c.graphs.append(graph_report)
    _last = graph_report


_last: Optional[GraphReport] = None


def last_graph_report() -> Optional[GraphReport]:
    return _last
