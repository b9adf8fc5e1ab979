"""Models to benchmark: a built-in DeepSeek config (random weights: decode speed does
not depend on weight values, and no hub is reachable) or a local checkpoint folder."""

from __future__ import annotations

import json
import os
from typing import Optional
from importlib import resources

import torch

from tileflow.bench.checks import BenchError

# A DeepSeek-R1-Distill-Qwen-shaped model small enough for a 2-core CPU.
TINY = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 8192,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}
# DeepSeek-V2 / V3-shaped models (MLA + MoE, one dense first layer) small enough for a CPU.
_TINY_MLA = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1,
             "num_experts_per_tok": 2, "first_k_dense_replace": 1, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
             "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 2048, "max_position_embeddings": 8192,
             "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}
TINY_V2 = {"model_type": "deepseek_v2", **_TINY_MLA, "q_lora_rank": None, "topk_method": "greedy",
           "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0}
TINY_V3 = {"model_type": "deepseek_v3", **_TINY_MLA, "q_lora_rank": 96, "n_group": 4, "topk_group": 2,
           "norm_topk_prob": True, "routed_scaling_factor": 2.5}
_CONFIG_KEYS_IGNORED = ("_about", "architectures", "torch_dtype")


def builtin_configs() -> dict:
    """DeepSeek architecture fields as published (``tileflow/data/deepseek_configs.json``)
    plus ``tiny``, a small model of the same family for CPUs."""
    text = resources.files("tileflow").joinpath("data/deepseek_configs.json").read_text()
    table = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    table.update(tiny=TINY, **{"tiny-deepseek-v2": TINY_V2, "tiny-deepseek-v3": TINY_V3})
    return table


# the architectures the bench builds: the R1-Distill family, and DeepSeek's own (MLA + MoE),
# whose tileflow paths say in the record what they ran
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "deepseek_v2", "deepseek_v3")


def runnable_names() -> list[str]:
    """The built-in names the bench can run (those of a supported model_type)."""
    return sorted(k for k, v in builtin_configs().items() if v.get("model_type") in SUPPORTED_MODEL_TYPES)


def _unsupported(where: str, model_type: str) -> str:
    return (f"{where}: model_type {model_type!r} is not supported: the bench runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models (DeepSeek's own and the R1-Distill family)")


def with_layers(config, layers: Optional[int]):
    """``config`` cut to its first ``layers`` decoder layers (a model too big for one card
    measured at its real widths); None: unchanged."""
    if layers is None:
        return config
    if not 1 <= layers <= config.num_hidden_layers:
        raise BenchError(f"--layers {layers}: the model has {config.num_hidden_layers} layers (give 1 to that)")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


def builtin_config(name: str):
    """The transformers config of a built-in DeepSeek-shaped model (``builtin_configs``)."""
    from transformers import AutoConfig

    table = builtin_configs()
    if name not in table:
        raise BenchError(f"unknown model {name!r}: give a local checkpoint folder or one of "
                         f"{', '.join(runnable_names())}")
    fields = {k: v for k, v in table[name].items() if k not in _CONFIG_KEYS_IGNORED}
    model_type = fields.pop("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BenchError(_unsupported(name, model_type))
    return AutoConfig.for_model(model_type, **fields)


def folder_config(folder: str):
    """The transformers config of a checkpoint folder, after checking it is one the bench
    runs: a readable ``config.json`` of a supported model_type, and weight files."""
    from transformers import AutoConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise BenchError(f"{folder} has no config.json: not a checkpoint folder")
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    except json.JSONDecodeError as e:
        raise BenchError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"{path} cannot be read: {e}") from None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if not model_type:
        raise BenchError(f"{path} names no model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BenchError(_unsupported(folder, model_type))
    if not any(f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
               for f in os.listdir(folder)):
        raise BenchError(f"{folder} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' reasons vary; the first line names it
        raise BenchError(f"{path}: transformers cannot read it: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def model_config(name_or_dir: str, layers: Optional[int] = None):
    """The config of a built-in name or a checkpoint folder, checked (BenchError);
    ``layers``: only the first N decoder layers."""
    return with_layers(_model_config(name_or_dir), layers)


def _model_config(name_or_dir: str):
    if os.path.isdir(name_or_dir):
        return folder_config(name_or_dir)
    if os.path.exists(name_or_dir):
        raise BenchError(f"{name_or_dir} is not a folder: give a checkpoint folder (config.json and weights) "
                         "or a model name")
    if os.sep in name_or_dir or name_or_dir.startswith("."):
        raise BenchError(f"{name_or_dir}: no such folder (nothing is downloaded: give a local checkpoint folder "
                         f"or one of {', '.join(runnable_names())})")
    return builtin_config(name_or_dir)


def fp8_checkpoint_folder(name_or_dir: str) -> bool:
    """Whether ``name_or_dir`` is a local fine-grained fp8 checkpoint folder (its config's
    ``quantization_config`` names ``fp8``): the bench builds it in the fp8 checkpoint form."""
    from tileflow.integrations.transformers.fp8_checkpoint import is_fp8_checkpoint_folder

    return os.path.isdir(name_or_dir) and is_fp8_checkpoint_folder(name_or_dir)


def build_model(name_or_dir: str, device: torch.device, dtype: torch.dtype, layers: Optional[int] = None,
                fp8_checkpoint: bool = False):
    """A causal LM on ``device``: a local checkpoint folder, or a built-in config with
    random weights (initialised on the device); ``layers``: only the first N decoder layers.
    ``fp8_checkpoint`` (and always for an fp8 checkpoint folder): the fp8 checkpoint form,
    its projections transformers' ``FP8Linear`` made on the device with no copy in ``dtype``
    (``tileflow.integrations.transformers.fp8_checkpoint``: a folder read from its
    safetensors, a built-in config with random e4m3 codes and fp32 block scales)."""
    from transformers import AutoModelForCausalLM

    config = model_config(name_or_dir, layers)
    if fp8_checkpoint or fp8_checkpoint_folder(name_or_dir):
        from tileflow.integrations.transformers import fp8_checkpoint as fp8

        try:
            if os.path.isdir(name_or_dir):
                return fp8.load(name_or_dir, device, dtype, config)
            return fp8.build_random(config, device, dtype)
        except fp8.CheckpointError as e:
            raise BenchError(str(e)) from None
    if os.path.isdir(name_or_dir):
        return AutoModelForCausalLM.from_pretrained(name_or_dir, config=config, dtype=dtype).to(device).eval()
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
