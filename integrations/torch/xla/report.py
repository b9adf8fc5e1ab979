"""The torch-xla backend's report: tileflow's :class:`~tileflow.report.Report` plus
which path each match took on this XLA client."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tileflow.report import Report

# what each path runs, for the report's lines
PATHS = {
    "pallas": "generated Pallas kernel, compiled for TPU (torch_xla make_kernel_from_pallas)",
    "pallas-interpret": "generated Pallas kernel under the Pallas interpreter, inlined into the XLA graph",
    "reference": "the suite kernel's reference as XLA ops (no kernel of this client)",
}


@dataclass
class XlaReport(Report):
    """``paths``: (pattern, path) -> count, a path being a key of :data:`PATHS`."""

    client: str = ""
    paths: Counter = field(default_factory=Counter)

    def took(self, pattern: str, path: str, n: int = 1) -> None:
        self.paths[(pattern, path)] += n

    def __str__(self) -> str:
        return "\n".join([super().__str__()] + path_lines(self.paths, self.client))


def path_lines(paths: Counter, client: str) -> list[str]:
    """The report lines saying which path each matched pattern took."""
    if not paths:
        return []
    lines = [f"  paths (torch-xla, {client or '?'} client):"]
    lines += [f"    {p:<18} x{n} {path}: {PATHS[path]}" for (p, path), n in sorted(paths.items())]
    return lines
