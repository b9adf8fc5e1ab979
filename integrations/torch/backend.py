"""The ``tileflow`` dynamo backend, registered under the ``torch_dynamo_backends`` entry
point, so ``torch.compile(model, backend="tileflow")`` finds it.

It is inductor with two passes: on the dynamo graph, the decode layer's norm + q/k/v +
RoPE + cache write, its attention, the norm-fused MLP input and the final norm + lm_head
become fused suite kernels (``decode_graph.py``; a DeepSeek-V2 / V3 layer's MLA attention,
router and grouped experts: ``deepseek_graph.py``); after inductor's decompositions, the
remaining decode-time linears and residual adds (``rewrite.py``). It takes the ``mode`` and ``options``
that ``torch.compile`` and transformers' ``CompileConfig`` pass; the default mode is
``reduce-overhead`` (CUDA graphs for decode, where launches cost most). A graph that
may need gradients goes to inductor unchanged (the suite ops have no autograd formula).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from tileflow import settings
from tileflow.report import Report

DEFAULT_MODE = "reduce-overhead"
_COLLECTORS: list[Report] = []  # reports being filled (tileflow.explain), innermost last
LAST_REPORTS: list[Report] = []  # one per compiled graph of the latest compilations


def _graph_pass(report: Report, step_rows: tuple = ()):
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    from tileflow.integrations.torch import rewrite

    class TileflowPass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite.rewrite_graph(graph, report, step_rows)

        def uuid(self) -> Optional[Any]:  # inductor's FX cache key: the rewrite's source and the step's rows
            return get_hash_for_files((rewrite.__file__,)) + str(step_rows).encode()

    return TileflowPass()


def register_inductor_fallbacks() -> None:
    """Give every ``torch.ops.tileflow`` op inductor's plain fallback lowering up front.

    Left to inductor, an op without a lowering takes the "implicit fallback" branch,
    which in torch 2.11 formats the op's IR arguments for a log line whether or not the
    log is on; the fused ops take the residual stream, whose IR string nests every
    earlier layer (twice per layer), so a 28-layer graph spent minutes there (seen on an
    H200: the first compiled step did not finish in 150 s)."""
    from torch._inductor import lowering

    for name in dir(torch.ops.tileflow):
        packet = getattr(torch.ops.tileflow, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if op not in lowering.lowerings:
                lowering.make_fallback(op, warn=False, override_decomp=True)


CPU_REASON = ("on CPU the suite runs its verified reference, slower than inductor's code: inductor's code kept "
              "(options={'cpu': True} runs the suite, to verify)")
GRAD_REASON = "gradients enabled: the suite kernels have no autograd formula; inductor's code kept"


def needs_grad(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Whether AOT autograd may trace a backward for ``gm`` (an input or parameter that
    requires grad, with grad mode on now or switched on inside the graph)."""
    wants = any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs) or any(
        p.requires_grad for p in gm.parameters())
    switches = any(n.op == "call_function" and n.target is torch._C._set_grad_enabled for n in gm.graph.nodes)
    return wants and (torch.is_grad_enabled() or switches)


def tileflow_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None,
                     options: Optional[dict] = None) -> Callable:
    """Compile ``gm``: decode patterns -> suite kernels, everything else -> inductor
    (on XLA devices: torch-xla's openxla, see ``tileflow.integrations.torch.xla``)."""
    if any(getattr(getattr(x, "device", None), "type", None) == "xla" for x in example_inputs):
        from tileflow.integrations.torch.xla.backend import xla_backend

        return xla_backend(gm, example_inputs, LAST_REPORTS, _COLLECTORS)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from tileflow.runtime import torch_library  # noqa: F401  (registers torch.ops.tileflow)

    register_inductor_fallbacks()

    mode = mode or DEFAULT_MODE
    patches = dict(list_mode_options(mode)) if mode != "default" else {}
    ours = settings.names()
    opts = settings.resolve({k: v for k, v in (options or {}).items() if k in ours})
    patches.update({k: v for k, v in (options or {}).items() if k not in ours})  # inductor's own options
    report = Report(title=f"tileflow backend: graph {len(LAST_REPORTS) + 1}")
    on_gpu = any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)
    if needs_grad(gm, example_inputs):
        report.fallback("all patterns", "the whole graph", GRAD_REASON)
    elif not on_gpu and not opts.cpu:
        report.fallback("all patterns", "the whole graph", CPU_REASON)
    else:
        step_rows: tuple = ()
        if opts.compile_fused:  # off (compile_fused=False) measures what the fused pass buys
            from tileflow.integrations.torch import deepseek_graph
            from tileflow.integrations.torch.decode_graph import rewrite_decode_graph

            step_rows = rewrite_decode_graph(gm, report, architectures=(deepseek_graph,))
        patches["post_grad_custom_post_pass"] = _graph_pass(report, step_rows)
    # a cache hit would skip the pass, and with it the report of what was rewritten
    patches["fx_graph_cache"] = False
    LAST_REPORTS.append(report)
    for collector in _COLLECTORS:
        collector.title = "tileflow.explain"
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    for collector in _COLLECTORS:
        collector.matches.update(report.matches)
        collector.fallbacks.extend(report.fallbacks)
    return compiled
