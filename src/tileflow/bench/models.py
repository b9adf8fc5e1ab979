"""Models to benchmark: a built-in DeepSeek config (random weights: decode speed does
not depend on weight values, and no hub is reachable) or a local checkpoint folder."""

from __future__ import annotations

import json
import os
from importlib import resources

import torch

# A DeepSeek-R1-Distill-Qwen-shaped model small enough for a 2-core CPU.
TINY = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 8192,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}
_CONFIG_KEYS_IGNORED = ("_about", "architectures", "torch_dtype")


def builtin_configs() -> dict:
    """DeepSeek architecture fields as published (``tileflow/data/deepseek_configs.json``)
    plus ``tiny``, a small model of the same family for CPUs."""
    text = resources.files("tileflow").joinpath("data/deepseek_configs.json").read_text()
    table = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    table["tiny"] = TINY
    return table


def builtin_config(name: str):
    """The transformers config of a built-in DeepSeek-shaped model (``builtin_configs``)."""
    from transformers import AutoConfig

    table = builtin_configs()
    if name not in table:
        raise SystemExit(f"unknown model {name!r}: give a local checkpoint folder or one of "
                         f"{', '.join(sorted(table))}")
    fields = {k: v for k, v in table[name].items() if k not in _CONFIG_KEYS_IGNORED}
    model_type = fields.pop("model_type")
    if model_type not in ("qwen2", "llama"):
        raise SystemExit(f"{name}: model_type {model_type!r} has no decode path in tileflow yet "
                         "(the DeepSeek-R1-Distill models are qwen2 and llama)")
    return AutoConfig.for_model(model_type, **fields)


def build_model(name_or_dir: str, device: torch.device, dtype: torch.dtype):
    """A causal LM on ``device``: a local checkpoint folder, or a built-in config with
    random weights (initialised on the device)."""
    from transformers import AutoModelForCausalLM

    if os.path.isdir(name_or_dir):
        return AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype).to(device).eval()
    config = builtin_config(name_or_dir)
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
