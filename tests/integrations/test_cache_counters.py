"""The compile path's cache-counter batching: every layer's ``arange(1) + counter`` and
``counter.add_(1)`` become one ``tileflow::cache_rows_advance`` at the top of the step,
with the same values read and the same counts left behind; a counter read after its
increment keeps the traced form and says why."""

import operator

import torch
import torch.fx as fx

from tileflow.integrations.torch.decode_graph import _batch_cache_counters, _drop_dead
from tileflow.report import Report


def _layered_graph(late_read: bool = False) -> fx.GraphModule:
    g = fx.Graph()
    counters = [g.placeholder(f"counter{i}") for i in range(3)]
    for c in counters:
        c.meta["example_value"] = torch.tensor(0)
    outs = []
    for i, c in enumerate(counters):
        ar = g.call_function(torch.arange, (1,))
        row = g.call_function(operator.add, (ar, c))
        row.meta["example_value"] = torch.arange(1)
        outs.append(g.call_function(operator.mul, (row, 2)))
        if i == 0:  # another read before the increment (as the mask's query position)
            outs.append(g.call_function(operator.add, (c, 10)))
        g.call_method("add_", (c, 1))
    if late_read:
        outs.append(g.call_function(operator.mul, (counters[1], 3)))
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)


def _run(gm):
    counters = [torch.tensor(5), torch.tensor(7), torch.tensor(9)]
    outs = gm(*counters)
    return [o.tolist() for o in outs], [c.item() for c in counters]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_counters_batched_into_one_op_with_the_same_results():
    expected = _run(_layered_graph())
    gm, report = _layered_graph(), Report()
    _batch_cache_counters(gm.graph, report)
    _drop_dead(gm.graph)
    gm.recompile()
    targets = _targets(gm)
    assert targets.count(torch.ops.tileflow.cache_rows_advance.default) == 1
    assert "add_" not in targets and torch.arange not in targets
    assert report.matches["cache_counters"] == 3 and not report.fallbacks
    assert _run(gm) == expected  # rows [5], [7], [9] (times 2), 15, and counters 6, 8, 10
    assert expected[1] == [6, 8, 10]


def test_a_read_after_the_increment_keeps_the_traced_graph():
    expected = _run(_layered_graph(late_read=True))
    gm, report = _layered_graph(late_read=True), Report()
    before = _targets(gm)
    _batch_cache_counters(gm.graph, report)
    assert _targets(gm) == before
    assert report.fallbacks and "after the increment" in report.fallbacks[0][2]
    gm.recompile()
    assert _run(gm) == expected
