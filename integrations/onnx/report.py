"""The report of an ONNX optimization: ``tileflow.report.Report`` plus where each
rewrite fired, so the per-layer picture can be printed and tested."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from tileflow.report import Report

# An op left in the optimized graph that belongs to a catalogue pattern: if the rule
# did not take it (no structural match, so no check ran), the report still says so.
ANCHORS = {"ReduceMean": "rms_norm", "Softmax": "gqa_attention", "Neg": "rope", "Sigmoid": "gate_up_silu"}


@dataclass
class OnnxReport(Report):
    """``applied``: (pattern, where) of every rewrite, in graph order. ``checked``:
    (pattern, where, node, reason) of every failed exactness check, turned into
    fallbacks by :meth:`settle` unless the node was rewritten after all."""

    applied: list = field(default_factory=list)
    checked: list = field(default_factory=list)
    rewritten: set = field(default_factory=set)

    def settle(self) -> None:
        for name, at, node, reason in self.checked:
            entry = (name, at, f"{reason} [{node}]")
            if node not in self.rewritten and entry not in self.fallbacks:
                self.fallbacks.append(entry)
        self.checked.clear()

    def by_layer(self) -> dict:
        """Layer index (``None`` for nodes outside the decoder layers) -> pattern -> count."""
        table: dict = defaultdict(lambda: defaultdict(int))
        for name, at in self.applied:
            m = re.search(r"layers\.(\d+)", at)
            table[int(m.group(1)) if m else None][name] += 1
        return {k: dict(v) for k, v in table.items()}

    def __str__(self) -> str:
        lines = [super().__str__(), "  per layer:"]
        for layer, counts in sorted(self.by_layer().items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            label = "outside layers" if layer is None else f"layer {layer}"
            lines.append(f"    {label:<15} " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))
        return "\n".join(lines)

