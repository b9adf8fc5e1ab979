"""``tileflow.explain(fn, *args, **kwargs)``: what the backend does to ``fn`` on these inputs."""

from __future__ import annotations

import contextlib
import inspect
import types

import torch

from tileflow.integrations.torch import backend
from tileflow.report import Report


def _fresh_call(fn):
    """A function calling ``fn`` under a code object of its own: dynamo keeps compiled
    entries on code objects, so this one's go with it, and no one else's are touched."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    return types.FunctionType(call.__code__.replace(), call.__globals__, "tileflow_explain", None, call.__closure__)


def explain(fn, *args, mode: str = "default", no_grad: bool = True, **kwargs) -> Report:
    """Compile ``fn`` with the tileflow backend, run it once on the inputs, and return
    the report: ``.matches`` (pattern -> count) and ``.fallbacks`` (pattern, where,
    reason). ``fn`` is compiled afresh, by a backend object of its own (no cached entry
    of another compile matches it) in an isolated recompile region; the user's other
    compiled functions keep their caches. ``no_grad=False`` runs it under the caller's
    grad mode, as a training step would be compiled."""
    report = Report(title="tileflow.explain")
    extra = {} if mode == "default" else {"mode": mode}

    def compiler(gm, example_inputs):
        return backend.tileflow_backend(gm, example_inputs, **extra)

    backend._COLLECTORS.append(report)
    try:
        isolate = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
        compiled = torch.compile(_fresh_call(fn), backend=compiler, **isolate)
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            compiled(*args, **kwargs)
    finally:
        backend._COLLECTORS.remove(report)
    return report
