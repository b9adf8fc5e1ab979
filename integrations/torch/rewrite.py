"""Rewriting inductor's post-grad ATen graph: decode subgraphs -> suite kernels.

Implements the catalogue's ``matvec``, ``gate_up_silu`` and ``matvec_residual``
patterns (``tileflow/patterns``) on the graph inductor is about to lower, as an FX
pass over ``aten.mm`` / ``aten.addmm`` nodes and their users. A node is replaced only
when every condition of its pattern holds; otherwise it stays and the reason is
reported. The replacements are ``torch.ops.tileflow.*`` custom ops, which inductor
schedules as opaque calls and CUDA graphs capture.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from tileflow.patterns import matvec as matvec_pattern
from tileflow.report import Report
from tileflow.runtime import torch_library  # noqa: F401  (registers torch.ops.tileflow)

aten = torch.ops.aten
_TRANSPOSES = (aten.permute.default, aten.t.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def where(node: fx.Node) -> str:
    """The module path a node came from, when the graph kept it."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L['fn'].", "")
    return node.name


def _transposed_weight(node) -> tuple:
    """(W, "") if ``node`` is ``W`` [N, K] transposed, else (None, reason)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES):
        return None, "the weight is not a transposed [N, K] tensor (not the nn.Linear layout)"
    if node.target == aten.permute.default and list(node.args[1]) != [1, 0]:
        return None, f"the weight is permuted {list(node.args[1])}"
    w = node.args[0]
    v = _val(w)
    if v is None or v.dim() != 2:
        return None, "the weight is not 2-D"
    return w, ""


def _decode_rows(n, step_rows: tuple) -> bool:
    """One row, or the batch x new tokens of a step whose attention the dynamo pass matched."""
    if statically_known_true(n == 1):
        return True
    return bool(step_rows) and statically_known_true(n == step_rows[0] * step_rows[1])


def match_linear(node: fx.Node, step_rows: tuple = ()) -> tuple:
    """(x, w, b, "") for an mm/addmm that is the ``matvec`` pattern, else (.., reason)."""
    if node.target == aten.addmm.default:
        b, x, wt = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None, None, None, "addmm with alpha/beta scaling"
    else:
        (x, wt), b = node.args[:2], None
    xv, out = _val(x), _val(node)
    if xv is None or out is None:
        return None, None, None, "no shape information"
    if xv.dim() != 2 or not _decode_rows(xv.shape[0], step_rows):
        return None, None, None, f"{xv.shape[0]} rows: prefill stays with the library GEMM"
    w, why = _transposed_weight(wt)
    if why:
        return None, None, None, why
    dtypes = {str(xv.dtype), str(_val(w).dtype)} | ({str(_val(b).dtype)} if b is not None else set())
    if len(dtypes) != 1 or next(iter(dtypes)) not in matvec_pattern.DTYPES:
        return None, None, None, f"dtypes {sorted(dtypes)}"
    if b is not None and (_val(b) is None or _val(b).dim() != 1):
        return None, None, None, "the bias is not 1-D"
    return x, w, b, ""


def _replace(graph: fx.Graph, node: fx.Node, target, args) -> fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(target, tuple(args))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _view(graph: fx.Graph, before: fx.Node, src: fx.Node, shape: list) -> fx.Node:
    symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    if len(symbolic) == 1:  # a step's symbolic token count: -1, not a raw SymInt argument
        shape = [-1 if i == symbolic[0] else d for i, d in enumerate(shape)]
    with graph.inserting_before(before):
        v = graph.call_function(aten.view.default, (src, shape))
    v.meta["val"] = _val(src).view(shape)
    return v


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _strip_views(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def _silu_input(node):
    """``a`` when ``node`` computes silu(a): ``silu(a)``, ``a * sigmoid(a)`` or
    ``a / (1 + exp(-a))`` (inductor's decomposition), else None."""
    if _is(node, aten.silu.default):
        return node.args[0]
    if _is(node, aten.mul.Tensor):
        a, s = node.args
        for x, y in ((a, s), (s, a)):
            if _is(y, aten.sigmoid.default) and y.args[0] is x:
                return x
    if _is(node, aten.div.Tensor):
        a, den = node.args
        if _is(den, aten.add.Tensor):
            for e, one in (den.args, den.args[::-1]):
                if one == 1 and _is(e, aten.exp.default) and _is(e.args[0], aten.neg.default) \
                        and e.args[0].args[0] is a:
                    return a
    return None


def rewrite_graph(graph: fx.Graph, report: Report, step_rows: tuple = ()) -> None:
    """Apply the catalogue's patterns to ``graph`` in place; record what happened.
    ``step_rows``: the (batch, new tokens) of the step's matched attention, whose rows
    the linears may then have (``decode_graph.rewrite_decode_graph``)."""
    linear_op, residual_op, gate_op = (torch.ops.tileflow.matvec.default,
                                       torch.ops.tileflow.matvec_residual.default,
                                       torch.ops.tileflow.gate_up_silu.default)
    # 1. matvec: every decode-time nn.Linear
    for node in list(graph.nodes):
        if not (_is(node, aten.mm.default) or _is(node, aten.addmm.default)):
            continue
        x, w, b, why = match_linear(node, step_rows)
        if why:
            report.fallback("matvec", where(node), why)
            continue
        _replace(graph, node, linear_op, (x, w, b))
    # 2. gate_up_silu: mul(silu(x @ Wg.T), x @ Wu.T), through the views between them
    for node in list(graph.nodes):
        if not _is(node, aten.mul.Tensor):
            continue
        for gate_act, up_view in (node.args, node.args[::-1]):
            a = _silu_input(gate_act)
            g, up = _strip_views(a), _strip_views(up_view)
            if (a is not None and _is(g, linear_op) and _is(up, linear_op) and g.args[2] is None
                    and up.args[2] is None and _strip_views(g.args[0]) is _strip_views(up.args[0])
                    and _val(g.args[0]).shape == _val(up.args[0]).shape and len(gate_act.users) == 1
                    and _val(g).shape == _val(up).shape and _val(node).numel() == _val(g).numel()):
                with graph.inserting_before(node):
                    fused = graph.call_function(gate_op, (g.args[0], g.args[1], up.args[1]))
                fused.meta["val"] = _val(g)
                out = _view(graph, node, fused, list(_val(node).shape))
                node.replace_all_uses_with(out)
                graph.erase_node(node)
                report.match("gate_up_silu")
                break
    # 3. matvec_residual: add(view(x @ W.T), r) with r of the sum's shape and dtype
    for node in list(graph.nodes):
        if not _is(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        for prod, r in (node.args, node.args[::-1]):
            lin = _strip_views(prod)
            if not (_is(lin, linear_op) and lin.args[2] is None and isinstance(r, fx.Node)):
                continue
            rv, sv = _val(r), _val(node)
            if rv is None or sv is None or rv.shape != sv.shape or rv.dtype != sv.dtype:
                continue
            n = _val(lin).shape[1]
            r2 = _view(graph, node, r, [-1, n])
            with graph.inserting_before(node):
                fused = graph.call_function(residual_op, (lin.args[0], lin.args[1], r2))
            fused.meta["val"] = _val(lin)
            out = _view(graph, node, fused, list(sv.shape))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            report.match("matvec_residual")
            break
    graph.eliminate_dead_code()
    report.match("matvec", sum(1 for n in graph.nodes if _is(n, linear_op)))
