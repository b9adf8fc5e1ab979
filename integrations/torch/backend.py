"""The ``tileflow`` dynamo backend, registered under the ``torch_dynamo_backends``
entry point so ``torch.compile(model, backend="tileflow")`` finds it.

Pattern rewriting of the captured graph into suite kernels is built on the pattern
catalogue (``tileflow.patterns``); until a pattern matches, a graph is compiled by
inductor exactly as ``torch.compile``'s default would, so results never change.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def tileflow_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs) -> Callable:
    """Compile ``gm``: decode patterns -> suite kernels, the rest -> inductor."""
    from torch._inductor.compile_fx import compile_fx

    options = kwargs.get("options") or {}
    return compile_fx(gm, example_inputs, config_patches=options or None)
