"""``tileflow.explain(fn, *args, **kwargs)``: what the backend does to ``fn`` on these inputs."""

from __future__ import annotations

import contextlib

import torch

from tileflow.integrations.torch import backend
from tileflow.report import Report


def explain(fn, *args, mode: str = "default", no_grad: bool = True, **kwargs) -> Report:
    """Compile ``fn`` with the tileflow backend, run it once on the inputs, and return
    the report: ``.matches`` (pattern -> count) and ``.fallbacks`` (pattern, where,
    reason). Resets dynamo's caches first, so ``fn`` is compiled afresh. ``no_grad=False``
    runs it under the caller's grad mode, as a training step would be compiled."""
    report = Report(title="tileflow.explain")
    torch._dynamo.reset()
    backend._COLLECTORS.append(report)
    try:
        compiled = torch.compile(fn, backend="tileflow", mode=mode)
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            compiled(*args, **kwargs)
    finally:
        backend._COLLECTORS.remove(report)
        torch._dynamo.reset()
    return report
