"""Export a transformers Qwen2 / Llama decode step (and its prefill) to ONNX with the KV
cache as explicit graph inputs and outputs.

transformers' own exportable static-cache wrapper did not export here, so the model
is wrapped in a module that takes the cache as plain tensors, rebuilds a
``DynamicCache`` from them inside ``forward`` and returns the grown tensors. The
decode graph has ``input_ids`` [1, 1] fixed (so attention needs no mask and the
rewrite rules can check decode shapes statically) and the past length dynamic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from tileflow.integrations.onnx.files import Staged, check_destination, data_name
from tileflow.integrations.shared.hf import cache_field, cache_keyword

# Read back by ``optimize`` (the rotary cache size) and ``Generator`` (cache shapes).
META_PREFIX = "tileflow."


def cache_names(num_layers: int) -> tuple[list, list]:
    """Input and output names of the cache tensors, in graph order."""
    past = [f"past_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


class _CacheIO(torch.nn.Module):
    """``(input_ids, *past) -> (logits, *present)`` around a causal LM."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past
        # read once here, not in forward: the exporter traces forward
        self.cache_keyword, self.cache_field = cache_keyword(model), cache_field()

    def forward(self, input_ids, *past):
        from transformers import DynamicCache

        n = self.model.config.num_hidden_layers
        if self.with_past:
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(n)], config=self.model.config)
            start = past[0].shape[2]
        else:
            cache = DynamicCache(config=self.model.config)
            start = 0
        seq = input_ids.shape[1]
        position_ids = torch.arange(start, start + seq, device=input_ids.device).unsqueeze(0)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, return_dict=True,
                         **{self.cache_keyword: cache})
        present = []
        for layer in getattr(out, self.cache_field).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@dataclass
class ExportResult:
    """Paths written by :func:`export` and the shapes the :class:`Generator` needs."""

    step: str
    prefill: Optional[str]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _save(program, path: str, metadata: dict) -> None:
    import onnx

    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, str(value)
    # A 1.5B-shaped model is over protobuf's 2 GiB: weights always go to a side file.
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name(path), size_threshold=1024)



@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter's notes that say nothing about this export: every cache input shares
    past_len on purpose, torchvision's ops are not used, and torch's own pytree use warns."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export(model, path: str, *, prefill_path: Optional[str] = None, opset: int = 18) -> ExportResult:
    """Export ``model``'s decode step to ``path``: inputs ``input_ids`` [1, 1] and
    ``past_{key,value}.<layer>`` [1, kv_heads, past, head_dim]; outputs ``logits``
    [1, 1, vocab] and ``present_{key,value}.<layer>`` (past + 1 positions). With
    ``prefill_path`` the prompt graph is written too (``input_ids`` [1, seq], no past).

    The model must be a transformers Qwen2 / Llama causal LM in eval mode, batch 1.
    Paths are checked before the export runs; each file (and its ``<name>.data``
    weights) is written under a temp name beside it and renamed at the end.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ("qwen2", "llama"):
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r}: tileflow exports "
                         "transformers qwen2 and llama decoders")
    path = check_destination(path, "export path")
    if prefill_path is not None:
        prefill_path = check_destination(prefill_path, "export prefill_path")
        if os.path.abspath(prefill_path) == os.path.abspath(path):
            raise ValueError(f"export prefill_path {prefill_path!r} is the decode-step path: give another file")
    n, nkv, dh = config.num_hidden_layers, config.num_key_value_heads, _head_dim(config)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    past_names, present_names = cache_names(n)
    metadata = {"model_type": config.model_type, "num_layers": n, "num_kv_heads": nkv, "head_dim": dh,
                "max_position_embeddings": config.max_position_embeddings, "vocab_size": config.vocab_size}
    dim = torch.export.Dim
    past_len = dim("past_len", min=1, max=config.max_position_embeddings - 1)

    with torch.no_grad(), Staged() as staged, _quiet_exporter():
        step_tmp = staged.path(path)  # here, before the export: an unwritable folder fails now
        prefill_tmp = staged.path(prefill_path) if prefill_path is not None else None
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        past = [torch.zeros(1, nkv, 3, dh, dtype=dtype, device=device) for _ in range(2 * n)]
        program = torch.onnx.export(
            _CacheIO(model, with_past=True).eval(), (ids, *past), dynamo=True, opset_version=opset,
            input_names=["input_ids", *past_names], output_names=["logits", *present_names],
            dynamic_shapes=({}, tuple({2: past_len} for _ in past)), verbose=False, optimize=True,
            report=False)
        _save(program, step_tmp, {**metadata, "graph": "decode"})

        if prefill_path is not None:
            seq = dim("seq_len", min=2, max=config.max_position_embeddings - 1)
            ids = torch.zeros(1, 4, dtype=torch.long, device=device)
            program = torch.onnx.export(
                _CacheIO(model, with_past=False).eval(), (ids,), dynamo=True, opset_version=opset,
                input_names=["input_ids"], output_names=["logits", *present_names],
                dynamic_shapes=({1: seq},), verbose=False, optimize=True, report=False)
            _save(program, prefill_tmp, {**metadata, "graph": "prefill"})
        staged.commit()
    return ExportResult(path, prefill_path, n, nkv, dh, dtype)
