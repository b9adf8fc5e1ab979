"""transformers-version compatibility: where a CausalLM takes and returns its cache.
Read by the transformers and ONNX integrations and by the bench."""

from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """The keyword a CausalLM's forward takes its cache by: ``cache`` where the class's
    own forward names it (transformers 5.24 and later, which warn on ``past_key_values``
    and drop it in 5.40), else ``past_key_values``. Read from the class, so a patched or
    compiled instance forward does not hide it."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_field() -> str:
    """The model output's cache field: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(kwargs: dict, default=None):
    """The cache a forward call was given: ``cache=`` (transformers 5.24 and later) or
    ``past_key_values=`` (earlier releases, still accepted by later ones)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values", default)
