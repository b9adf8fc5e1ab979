"""What tileflow reads off a transformers model config: kept here, in the transformers
integration, so that the runtime (``tileflow.runtime``) stays framework-free."""

from __future__ import annotations

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
