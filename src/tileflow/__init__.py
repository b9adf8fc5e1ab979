"""tileflow: decode DeepSeek models near the memory-bandwidth limit.

Top-level names: ``patch`` / ``unpatch`` (transformers models, eager), the suite in
``tileflow.suite``, the ``tileflow`` command (``tileflow.cli``), and the dynamo
backend ``torch.compile(model, backend="tileflow")``.
"""

__version__ = "0.1.0"


def patch(model, options=None):
    """Route a transformers Qwen2/Llama model's decode steps through the suite; returns
    a report of what was patched (see ``tileflow.integrations.transformers.patch``).
    ``options``: ``tileflow.Options`` or a mapping of its fields (``tileflow.settings``)."""
    from tileflow.integrations.transformers.patch import patch as _patch

    return _patch(model, options)


def unpatch(model) -> bool:
    """Undo :func:`patch`."""
    from tileflow.integrations.transformers.patch import unpatch as _unpatch

    return _unpatch(model)


def explain(fn, *args, **kwargs):
    """Compile ``fn`` with ``backend="tileflow"`` on these inputs and report which decode
    patterns matched and where the original ran instead, with reasons."""
    from tileflow.integrations.torch.explain import explain as _explain

    return _explain(fn, *args, **kwargs)


from tileflow.settings import Options  # noqa: E402

_SUBPACKAGES = {"jax": "tileflow.integrations.jax", "onnx": "tileflow.integrations.onnx",
                "torch_xla": "tileflow.integrations.torch.xla"}


def __getattr__(name: str):
    # ``tileflow.onnx`` / ``from tileflow import jax as tfj``: the integrations import
    # their framework only when asked for, so ``import tileflow`` stays light.
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(_SUBPACKAGES[name])
    raise AttributeError(f"module 'tileflow' has no attribute {name!r}")
