"""What tileflow reads off a transformers model config, and what differs between
transformers releases in how generate drafts: kept here, in the transformers integration,
so that the runtime (``tileflow.runtime``) stays framework-free."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Optional

from tileflow.runtime.ops import RopeConfig
from tileflow.suite.rope import ROPE_KINDS, ROPE_SCALARS


def rope_config_of(config) -> tuple[Optional[RopeConfig], str]:
    """The RopeConfig of a transformers config, or (None, why not)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        return None, "config has no rope_theta"
    src = {**scaling, **params}
    if src.get("partial_rotary_factor", 1.0) != 1.0:
        return None, "partial rotary embedding is not supported"
    if rope_type == "default":
        return RopeConfig(ROPE_KINDS["default"], (float(theta),)), ""
    if rope_type == "linear":
        return RopeConfig(ROPE_KINDS["linear"], (float(theta), float(src["factor"]))), ""
    if rope_type == "llama3":
        vals = (float(theta), float(src["factor"]), float(src["low_freq_factor"]), float(src["high_freq_factor"]),
                float(src["original_max_position_embeddings"]))
        assert len(vals) == len(ROPE_SCALARS[ROPE_KINDS["llama3"]])
        return RopeConfig(ROPE_KINDS["llama3"], vals), ""
    return None, f"rope_type {rope_type!r} is not supported (default, linear, llama3 are)"


def _assisted_source() -> Optional[str]:
    """The source of this transformers' ``GenerationMixin._assisted_decoding``, or None."""
    from transformers.generation.utils import GenerationMixin

    try:
        return inspect.getsource(GenerationMixin._assisted_decoding)
    except (OSError, TypeError):
        return None


@functools.cache
def assisted_takes_static() -> bool:
    """Whether this transformers' assisted generation and prompt lookup run on a static
    cache (5.17's raise "assisted generate is not supported with Static cache classes")."""
    source = _assisted_source()
    return source is not None and "Static cache" not in source  # no source to read: the default cache is safe


@functools.cache
def assisted_takes_static_subclass() -> bool:
    """Whether this transformers' assisted decoding, which refuses static caches, tells
    them only by ``cache_implementation`` and the exact type: 5.17 raises where
    ``cache_implementation in ["static", "hybrid", "sliding_window"]`` or
    ``type(model_kwargs.get("past_key_values")) is StaticCache``, so a ``StaticCache``
    subclass handed to generate with no ``cache_implementation`` passes (see
    :func:`draft_static_cache`). False where it could tell one apart otherwise (an
    ``isinstance`` of a static cache) or the source cannot be read."""
    source = _assisted_source()
    if source is None or assisted_takes_static():
        return False
    return (re.search(r"type\(.*\) is StaticCache\b", source) is not None
            and re.search(r"isinstance\([^)]*Static", source) is None)


def crop_static_layer(layer, tokens_to_remove) -> None:
    """``StaticLayer.crop`` as transformers 5.25 has it (5.17's StaticLayer has none): the
    count goes back by ``abs(tokens_to_remove)`` on the device (in place: the count's
    address is static), the rows stay and the next ``update`` overwrites them; a positive
    count (an absolute length, the legacy form) is refused."""
    if tokens_to_remove > 0:
        raise RuntimeError("Static layers can only be cropped by passing a negative int, to specify how many "
                           "tokens to remove")
    layer.cumulative_length.sub_(abs(tokens_to_remove))


@functools.cache
def _draft_static_cache_class():
    from transformers.cache_utils import StaticCache, StaticLayer

    # a subclass, not StaticCache itself: 5.17's assisted decoding refuses `type(cache) is StaticCache` (exact type)
    class DraftStaticCache(StaticCache):
        """A ``StaticCache`` (layers transformers' own ``StaticLayer``) that assisted decoding
        and prompt lookup take and crop on transformers 5.17 (see :func:`draft_static_cache`)."""

        def crop(self, tokens_to_remove) -> None:
            for layer in self.layers:
                own = getattr(layer, "crop", None)
                if own is not None:  # a release whose StaticLayer crops (5.25)
                    own(tokens_to_remove)
                elif isinstance(layer, StaticLayer):
                    crop_static_layer(layer, tokens_to_remove)
                else:
                    raise RuntimeError(f"cache layer {type(layer).__name__} cannot be cropped")

        @property
        def is_croppable(self) -> bool:
            return all(isinstance(layer, StaticLayer) or getattr(layer, "is_croppable", False)
                       for layer in self.layers)

    DraftStaticCache.__module__ = __name__
    return DraftStaticCache


def draft_static_cache(config, max_cache_len: int):
    """(a static cache for a drafting ``generate`` call, "") or (None, why not), on a
    transformers whose assisted decoding refuses ``StaticCache`` by its exact type and whose
    ``StaticLayer`` has no ``crop`` (5.17): a ``StaticCache`` subclass (so 5.17's
    ``type(...) is StaticCache`` refusal passes it) whose ``crop`` does to each layer what
    5.25's ``StaticLayer.crop`` does (:func:`crop_static_layer`), which is what assisted
    decoding calls to drop a rejected draft's rows from the target's cache and what the
    candidate generator calls on the assistant's. Its layers stay transformers' own
    ``StaticLayer`` (tileflow's programs take a cache by its layers' type). ``config``:
    the model's config; ``max_cache_len``: the rows, the drafts' room included."""
    from transformers.cache_utils import StaticLayer

    try:
        cache = _draft_static_cache_class()(config=config.get_text_config(decoder=True), max_cache_len=max_cache_len)
    except (TypeError, ValueError) as exc:  # a StaticCache that is built otherwise
        return None, f"StaticCache(config=, max_cache_len=) failed: {type(exc).__name__}: {exc}"[:300]
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if not cache.layers or kinds:
        return None, f"cache layers {', '.join(kinds) or 'none'} (a draft's static cache is of StaticLayers)"
    return cache, ""
