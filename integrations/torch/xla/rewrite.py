"""The XLA rewrite: tileflow's ATen rewrite (``tileflow.integrations.torch.rewrite``,
the same matchers as on GPU), then each inserted ``torch.ops.tileflow`` call pointed at
the path this XLA client runs it by."""

from __future__ import annotations

import torch.fx as fx

from tileflow.integrations.torch import rewrite as aten_rewrite
from tileflow.integrations.torch.xla import pallas_bridge, reference_ops
from tileflow.integrations.torch.xla.kernels import call_of
from tileflow.integrations.torch.xla.report import XlaReport

IMPLEMENTATIONS = {"pallas": pallas_bridge.TPU_OPS, "pallas-interpret": pallas_bridge.INTERPRET_OPS,
                   "reference": reference_ops.OPS}


def rewrite_for_xla(graph: fx.Graph, report: XlaReport, path: str) -> None:
    """Rewrite ``graph`` (an ATen graph of XLA tensors) in place for ``path``
    ("pallas", "pallas-interpret" or "reference"); record matches, paths, fallbacks."""
    aten_rewrite.rewrite_graph(graph, report)
    for node in graph.nodes:
        call = call_of(node.target) if node.op == "call_function" else None
        if call is None:
            if getattr(node.target, "namespace", None) == "tileflow":
                # its CPU/GPU implementation would launch Triton on XLA tensors
                raise NotImplementedError(f"{node.target} has no torch-xla path (tileflow.integrations.torch.xla)")
            continue
        chosen = path
        if path == "pallas":
            vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args]
            why = pallas_bridge.kernel_for(call.op, *vals).tpu_problem()
            if why:
                chosen = "reference"
                report.fallback(call.pattern, aten_rewrite.where(node),
                                f"Pallas kernel {call.kernel} not usable through make_kernel_from_pallas "
                                f"({why}): its reference ran as XLA ops")
        node.target = IMPLEMENTATIONS[chosen][call.op]
        report.took(call.pattern, chosen)
