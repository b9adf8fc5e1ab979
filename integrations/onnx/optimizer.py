"""Apply the tileflow rewrite rules to an exported decode (or prefill) graph."""

from __future__ import annotations

import os
from typing import Optional

from tileflow.integrations.onnx.files import Staged, check_destination, check_source, data_name
from tileflow.integrations.onnx.report import ANCHORS, OnnxReport

TARGETS = ("ort", "opset23")


def _max_positions(model, given: Optional[int]) -> int:
    if given is not None:
        return int(given)
    meta = model.metadata_props.get("tileflow.max_position_embeddings")
    if meta is None:
        raise ValueError("the graph has no tileflow.max_position_embeddings metadata (not written by "
                         "tileflow.onnx.export): pass max_positions=")
    return int(meta)


def _leftovers(model, report: OnnxReport) -> None:
    """Ops of a pattern still in the graph that no rule's check saw: the structure
    differs from what the rule matches (another export form, prefill, a cast...)."""
    from tileflow.integrations.onnx.rules import where

    checked = {(p, w) for p, w, _ in report.fallbacks}
    has_cache = any(v.name.startswith("past_") for v in model.graph.inputs)
    for node in model.graph:
        name = ANCHORS.get(node.op_type)
        if name is None or node.domain not in ("", "ai.onnx"):
            continue
        at = where(node)
        # The SiLU's Sigmoid sits in ``mlp.act_fn`` while the rule reports at ``mlp``.
        if any(p == name and (at == w or at.startswith(w + ".")) for p, w in checked | set(report.applied)):
            continue
        why = "structure not matched by the rule"
        if name == "gqa_attention" and not has_cache:
            why = "no cache inputs (prefill graph): masked attention over many queries stays"
        report.fallback(name, at, f"{node.op_type} {node.name}: {why}")
        checked.add((name, at))


def optimize(src: str, dst: Optional[str], *, target: str = "ort", max_positions: Optional[int] = None
             ) -> OnnxReport:
    """Rewrite the decode patterns of the ONNX graph ``src`` into ``target`` ops and
    save to ``dst`` (weights in ``<dst>.data``); returns the report.

    ``target="ort"``: ONNX Runtime contrib ops (SkipSimplifiedLayerNormalization,
    RotaryEmbedding, GroupQueryAttention; SimplifiedLayerNormalization).
    ``target="opset23"``: standard RMSNormalization, RotaryEmbedding and Attention
    (the graph is converted to opset 23 first). ``max_positions`` bounds the RoPE
    tables (default: the model's ``max_position_embeddings`` from export metadata).
    ``dst=None`` only reports (see :func:`explain`). ``dst`` may be ``src``: the result
    is written under a temp name beside it and renamed over it at the end.
    """
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    from tileflow.integrations.onnx.rules import rule_passes

    if target not in TARGETS:
        raise ValueError(f"target {target!r}: one of {TARGETS}")
    src = check_source(src, "optimize src")
    if dst is not None:
        dst = check_destination(dst, "optimize dst")
    model = ir.load(src)
    if target == "opset23" and model.opset_imports.get("", 0) < 23:
        from onnxscript import version_converter

        version_converter.convert_version(model, 23)
    report = OnnxReport(title=f"tileflow.onnx.optimize target={target}: {os.path.basename(src)}")
    for rules in rule_passes(report, target, _max_positions(model, max_positions)):
        pattern.RewriteRuleSet(rules).apply_to_model(model)
    report.settle()
    _leftovers(model, report)
    if dst is not None:
        with Staged() as staged:  # src's weights are read while saving: never overwrite them in place
            ir.save(model, staged.path(dst), external_data=data_name(dst))
            staged.commit()
    return report


def explain(path: str, target: str = "ort", **kwargs) -> OnnxReport:
    """Run the rewrite rules of ``target`` on the ONNX file ``path`` without writing
    anything and return what matched, per layer, and what stayed, with reasons."""
    return optimize(check_source(path, "explain path"), None, target=target, **kwargs)
