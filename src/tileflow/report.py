"""The one report type of every integration: which patterns matched (name -> count)
and where the original ran instead, with the reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Report:
    """``matches``: pattern name -> count. ``fallbacks``: (pattern, where, reason)."""

    title: str = "tileflow"
    matches: Counter = field(default_factory=Counter)
    fallbacks: list = field(default_factory=list)

    def match(self, pattern: str, n: int = 1) -> None:
        self.matches[pattern] += n

    def fallback(self, pattern: str, where: str, reason: str) -> None:
        self.fallbacks.append((pattern, where, reason))

    def __str__(self) -> str:
        lines = [self.title]
        if self.matches:
            lines.append("  matched:")
            lines += [f"    {name:<18} x{n}" for name, n in sorted(self.matches.items())]
        if self.fallbacks:
            lines.append("  original kept:")
            lines += [f"    {p:<18} {w:<40} {r}" for p, w, r in self.fallbacks]
        if not self.matches and not self.fallbacks:
            lines.append("  nothing to report")
        return "\n".join(lines)
