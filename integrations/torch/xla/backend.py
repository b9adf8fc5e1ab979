"""The ``tileflow`` dynamo backend on XLA devices (``torch.compile(backend="tileflow")``
with the graph's tensors on ``torch_xla.device()``; ``tileflow_backend`` hands over
here).

It is torch-xla's own ``openxla`` backend (aot_autograd, then torch-xla's compiler)
with one more step on the ATen forward graph: the decode patterns rewritten into suite
kernels (``rewrite.py``), run by the generated Pallas kernels on TPU and by XLA ops
elsewhere. ``mode`` and ``options`` of ``torch.compile`` are inductor's and do not
apply.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from tileflow.integrations.torch.xla import device
from tileflow.integrations.torch.xla.report import XlaReport, path_lines
from tileflow.report import Report


def xla_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], reports: list,
                collectors: Sequence[Report]) -> Callable:
    """Compile ``gm`` for torch-xla; append its :class:`XlaReport` to ``reports`` and
    add what it found to each of ``collectors`` (``tileflow.explain``'s reports)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.torchxla import openxla_eval_boxed

    from tileflow.integrations.torch.xla.rewrite import rewrite_for_xla

    path = device.path()
    report = XlaReport(title=f"tileflow backend (torch-xla): graph {len(reports) + 1}", client=device.client())

    def forward_compiler(fw: torch.fx.GraphModule, inputs):
        rewrite_for_xla(fw.graph, report, path)
        fw.recompile()
        return openxla_eval_boxed(fw, inputs)

    reports.append(report)
    compiled = aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)
    for collector in collectors:
        merge_into(collector, report)
    return compiled


def merge_into(collector: Report, report: XlaReport) -> None:
    """Add ``report``'s matches, fallbacks and paths to ``collector``."""
    collector.matches.update(report.matches)
    collector.fallbacks.extend(report.fallbacks)
    if isinstance(collector, XlaReport):
        collector.paths.update(report.paths)
        collector.client = report.client
        return
    # tileflow.explain collects into a plain Report, whose text is title, matches and
    # fallbacks; the paths go under its title so that what it prints says them too
    paths = getattr(collector, "paths", None)
    if paths is None:
        paths = collector.paths = type(report.paths)()
    paths.update(report.paths)
    collector.title = "\n".join(["tileflow.explain"] + path_lines(paths, report.client))
