"""ONNX integration (``tileflow.onnx``): export a transformers Qwen2 / Llama decode step
with its KV cache as graph inputs / outputs, rewrite the decode patterns of the
catalogue into ONNX Runtime contrib ops or opset-23 ops with onnxscript rewrite
rules, and decode greedily on ONNX Runtime::

    tileflow.onnx.export(model, "step.onnx")
    tileflow.onnx.optimize("step.onnx", "step.opt.onnx", target="ort")  # or "opset23"
    tokens = tileflow.onnx.Generator("step.opt.onnx").generate(prompt_ids, 32)

onnx, onnxscript and onnxruntime are imported by the functions, not by this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from tileflow.integrations.onnx.report import OnnxReport
    from tileflow.integrations.onnx.exporter import ExportResult

__all__ = ["export", "optimize", "explain", "Generator"]


def export(model, path: str, *, prefill_path: Optional[str] = None, opset: int = 18) -> "ExportResult":
    """Export ``model``'s decode step (``input_ids`` [1, 1] and ``past_{key,value}.<i>`` in,
    ``logits`` and ``present_{key,value}.<i>`` out) to ``path``, and with
    ``prefill_path`` the prompt graph; see :func:`tileflow.integrations.onnx.exporter.export`."""
    from tileflow.integrations.onnx.exporter import export as _export

    return _export(model, path, prefill_path=prefill_path, opset=opset)


def optimize(src: str, dst: Optional[str], *, target: str = "ort", max_positions: Optional[int] = None
             ) -> "OnnxReport":
    """Rewrite the decode patterns of ``src`` for ``target`` (``"ort"`` or ``"opset23"``)
    into ``dst`` (may be ``src``); returns the report of what matched and what stayed, with reasons."""
    from tileflow.integrations.onnx.optimizer import optimize as _optimize

    return _optimize(src, dst, target=target, max_positions=max_positions)


def explain(path: str, target: str = "ort", **kwargs) -> "OnnxReport":
    """The report :func:`optimize` would give for ``path``, writing nothing."""
    from tileflow.integrations.onnx.optimizer import explain as _explain

    return _explain(path, target, **kwargs)


def __getattr__(name: str):
    # ``Generator`` is a class: resolved on first use so onnxruntime loads only then.
    if name == "Generator":
        from tileflow.integrations.onnx.generator import Generator

        return Generator
    raise AttributeError(f"module 'tileflow.onnx' has no attribute {name!r}")
