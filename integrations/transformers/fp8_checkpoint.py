"""Fine-grained fp8 checkpoints (issue 35) built as transformers builds them on a GPU, on any
device, with no bf16 copy of a projection ever allocated.

The format: DeepSeek-V3 / R1's, transformers' ``FineGrainedFP8`` (``config.json`` has
``"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}``): every decoder projection an ``FP8Linear`` whose ``weight``
is float8_e4m3fn [N, K] and ``weight_scale_inv`` fp32 [ceil(N/128), ceil(K/128)] (one scale a
128 x 128 block, ``w ~= weight * weight_scale_inv`` of its block), ``activation_scale`` None
(dynamic), a bias in the model's dtype where the model has one; the embeddings, norms and
lm_head in the model's dtype (transformers' quantizer leaves lm_head out). ``tileflow.patch``
runs such a model through its "checkpoint" fp8 path: ``matvec_fp8`` and the fused fp8 kernels
on these tensors where they lie (``quantized.py``).

Why a builder of its own: transformers 5.25 keeps ``FP8Linear`` only on CUDA / XPU. On CPU,
``from_pretrained`` of such a folder refuses without ``accelerate`` ("Loading an FP8 quantized
model requires accelerate") and with it dequantizes every projection to a bf16 ``nn.Linear`` at
load (``FineGrainedFP8Config(dequantize=False)`` is overridden when no GPU is seen): checked with
accelerate 1.16, ``tests/integrations/test_patch_quantized.py::test_an_fp8_checkpoint_on_cpu``.
On CUDA it builds ``FP8Linear``, whose forward needs DeepGEMM or a kernel fetched from the Hub
(the ``kernels`` package), so eager transformers cannot run it on a machine without network.

- :func:`load` (``folder``, ``device``, ``dtype``): the checkpoint's config on the meta device,
  its projections swapped for ``FP8Linear`` (those the checkpoint stores as e4m3 with a
  ``weight_scale_inv``; any other stays an ``nn.Linear``), then each module materialized on
  ``device`` straight from the ``*.safetensors`` files (``safe_open``, one tensor at a time):
  no accelerate, no dequantization, on CPU too.
- :func:`build_random` (``config``, ``device``, ``dtype``): the same module tree with random
  weights, as the bench builds a published config (``tileflow bench --weights fp8-checkpoint``):
  each projection filled in slabs of rows (``SLAB_BYTES`` of fp32 normal values, std
  ``initializer_range``, quantized with ``tileflow.suite.quantize.quantize_fp8``: the codes and
  scales a real checkpoint quantized from such weights holds), the rest initialized by
  transformers' own ``_init_weights``.
- :func:`save` writes a model of this form as such a folder (``config.json`` with the
  quantization config, ``model.safetensors`` with the e4m3 weights and their scales).
- :func:`is_fp8_checkpoint_folder`: whether a folder's config names this format (the bench
  loads such a folder with :func:`load`; ``tileflow.bench.checks.estimate_fp8_checkpoint``
  counts the bytes it takes on the device).

What DeepSeek-R1-Distill-Llama-70B takes in this form (bf16 embeddings / norms / lm_head, the
static cache of prompt 128 + 256 new tokens, bf16), from its published config (hidden 8192,
intermediate 28672, 80 layers, 64 heads / 8 KV heads of 128, vocabulary 128256, untied):

- projections: 80 x (q 8192^2 + k, v 1024 x 8192 + o 8192^2 + gate, up, down 3 x 28672 x 8192)
  = 80 x 855.6 M = 68.45 G weights x 1 byte = 68.45 GB
- block scales: 80 x 52224 blocks x 4 bytes = 16.7 MB
- embeddings + lm_head: 2 x 128256 x 8192 x 2 bytes = 4.20 GB; norms (161 x 8192 x 2) 2.6 MB
- static cache: 80 layers x 2 (K, V) x 8 heads x 128 x 2 bytes = 327,680 bytes a position,
  x 384 positions = 126 MB
- total about 72.8 GB (the bf16 model: 70.55 G parameters x 2 = 141.1 GB). The build adds one
  slab's fp32 temporaries (about 5 x 64 MB); the patch reads the tensors in place (no copy).
  So one H200 (~150 GB) holds it with room, and an 80 GB H100 (~85 GB) too.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch

from tileflow.integrations.transformers.quantized import PROJECTIONS
from tileflow.suite import quantize as Q

# the quantization config this format has, and which tileflow's fp8 path takes
QUANTIZATION = {"quant_method": "fp8", "weight_block_size": [Q.GROUP, Q.GROUP], "activation_scheme": "dynamic"}
MODEL_TYPES = ("qwen2", "llama")  # the decoder layers the quantized decode program runs
SLAB_BYTES = 64 << 20  # fp32 bytes of normal values drawn at once when filling a projection


class CheckpointError(ValueError):
    """A folder or config this builder does not take; the message is one line."""


def quantization_config(config) -> Optional[dict]:
    """The fine-grained fp8 quantization config of ``config`` as a dict (``quant_method``
    "fp8"), or None when it has none (or another method)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = qc.get("quant_method")
    method = getattr(method, "value", method)
    return qc if method == "fp8" else None


def check_config(config, where: str) -> None:
    """A :class:`CheckpointError` (one line) unless ``config`` is a Qwen2 / Llama model in the
    format this module builds: 128 x 128 blocks, dynamic activations, fp32 scales."""
    if config.model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {config.model_type!r}: fp8 checkpoints are built for "
                              f"{' / '.join(MODEL_TYPES)} models (the quantized decode program's layers)")
    qc = quantization_config(config)
    if qc is None:
        return
    block = list(qc.get("weight_block_size") or [])
    scheme = qc.get("activation_scheme", "dynamic")
    fmt = qc.get("scale_fmt") or "float"
    if block != QUANTIZATION["weight_block_size"] or scheme != "dynamic" or fmt != "float" or qc.get("dequantize"):
        raise CheckpointError(f"{where}: fp8 quantization_config with weight_block_size {block or None}, "
                              f"activation_scheme {scheme!r}, scale_fmt {fmt!r}"
                              + (", dequantize" if qc.get("dequantize") else "")
                              + ": tileflow's fp8 path takes 128 x 128 blocks, dynamic activations, fp32 scales")


def meta_model(config, dtype: torch.dtype, fp8: Optional[set] = None):
    """The causal LM of ``config`` on the meta device (nothing allocated), every decoder
    projection (or those named in ``fp8``: ``model.layers.<i>.<part>.<name>``) an ``FP8Linear``
    as transformers' FP8 quantizer makes it; the rest in ``dtype``; ``config`` gets the
    quantization config. Biases in ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import FP8Linear

    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):  # built as a plain model, then swapped as transformers does
        del plain.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain, dtype=dtype)
        for i, layer in enumerate(model.model.layers):
            for part, name in PROJECTIONS:
                where = f"model.layers.{i}.{part}.{name}"
                lin = getattr(getattr(layer, part), name)
                if fp8 is not None and where not in fp8:
                    continue
                new = FP8Linear(lin.in_features, lin.out_features, block_size=tuple(QUANTIZATION["weight_block_size"]),
                                activation_scheme="dynamic", has_bias=lin.bias is not None)
                if new.bias is not None:
                    new.bias = torch.nn.Parameter(torch.empty(lin.out_features, dtype=dtype))
                model.set_submodule(where, new)
    qc = quantization_config(config) or dict(QUANTIZATION)
    model.config.quantization_config = qc
    return model


def _materialize(model, device: torch.device, fill) -> None:
    """Every parameter and buffer of ``model`` (on meta) allocated on ``device``, module by
    module, then ``fill(name, module, new)`` (``new``: the tensor names it allocated; shared
    parameters, a tied lm_head, allocated once and shared again)."""
    made: dict[int, tuple] = {}  # id(meta tensor) -> (the meta tensor, kept alive; its materialized one)
    for name, module in model.named_modules():
        new = []
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) in made:
                    store[key] = made[id(t)][1]
                    continue
                data = torch.empty(t.shape, dtype=t.dtype, device=device)
                real = torch.nn.Parameter(data, requires_grad=t.requires_grad) if store is module._parameters else data
                store[key] = real
                made[id(t)] = (t, real)
                new.append(key)
        if new:
            fill(name, module, new)


@torch.no_grad()
def _fill_random(module, std: float) -> None:
    """An FP8Linear's weight and scales: fp32 normal(0, std) in slabs of 128-row blocks,
    each quantized (``quantize_fp8``), written into the e4m3 codes and fp32 scales."""
    w, s = module.weight, module.weight_scale_inv
    n, k = w.shape
    rows = max(Q.GROUP, SLAB_BYTES // (4 * k) // Q.GROUP * Q.GROUP)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        slab = torch.empty(r1 - r0, k, dtype=torch.float32, device=w.device).normal_(0.0, std)
        q, si = Q.quantize_fp8(slab)
        w[r0:r1].copy_(q)
        s[r0 // Q.GROUP:-(-r1 // Q.GROUP)].copy_(si)
    if module.bias is not None:
        module.bias.zero_()


def build_random(config, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The fp8-checkpoint form of ``config`` with random weights on ``device``: projections as
    ``FP8Linear`` (e4m3 codes and fp32 block scales made on the device, a slab of rows at a
    time), embeddings / norms / lm_head in ``dtype`` initialized by transformers' own init (as
    ``from_config``); no bf16 projection is ever allocated. Eval mode."""
    device = torch.device(device)
    check_config(config, "config")
    model = meta_model(config, dtype)
    std = getattr(config, "initializer_range", None) or 0.02
    torch.manual_seed(seed)

    def fill(name, module, new):
        if type(module).__name__ == "FP8Linear":
            _fill_random(module, std)
        else:
            model._init_weights(module)

    with torch.no_grad():
        _materialize(model, device, fill)
    return model.eval()


def _files(folder: str) -> list[str]:
    names = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not names:
        raise CheckpointError(f"{folder}: no *.safetensors files (an fp8 checkpoint is read from safetensors)")
    return [os.path.join(folder, f) for f in names]


def load(folder: str, device="cpu", dtype: torch.dtype = torch.bfloat16, config=None):
    """A local fine-grained fp8 checkpoint ``folder`` (``config.json`` with the fp8
    ``quantization_config``, ``*.safetensors``) as a model whose projections are ``FP8Linear``
    on ``device``: built on the meta device, then each module's tensors read from the files
    straight to ``device`` (fp8 weights as stored, scales fp32, everything else in ``dtype``).
    Then ``tileflow.patch(model)`` runs it through the fp8 path (on CPU with
    ``options={"cpu": True}``). A :class:`CheckpointError` (one line) for a folder it cannot
    take: another model type or quantization, a missing or unexpected tensor. ``config``: the
    folder's own by default; one cut to fewer layers reads only those layers' tensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    device = torch.device(device)
    if config is None:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if quantization_config(config) is None:
        raise CheckpointError(f"{folder}: config.json has no fp8 quantization_config (quant_method 'fp8')")
    check_config(config, folder)
    files = _files(folder)
    where: dict[str, str] = {}  # tensor name -> file
    e4m3 = set()  # the names stored as float8_e4m3fn
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                where[key] = path
                if f.get_slice(key).get_dtype() == "F8_E4M3":
                    e4m3.add(key)
    fp8 = set()
    for i in range(config.num_hidden_layers):
        for part, name in PROJECTIONS:
            stem = f"model.layers.{i}.{part}.{name}"
            if f"{stem}.weight_scale_inv" in where:
                fp8.add(stem)
            elif f"{stem}.weight" in e4m3:
                raise CheckpointError(f"{folder}: {stem}.weight is stored in e4m3 without a weight_scale_inv")
    if not fp8:
        raise CheckpointError(f"{folder}: no projection has a weight_scale_inv: not a fine-grained fp8 checkpoint")
    model = meta_model(config, dtype, fp8)
    handles = {path: safe_open(path, framework="pt", device=str(device)) for path in files}
    first: dict[int, str] = {}  # a tensor's first name (a tied lm_head is the embedding's second)
    for k, t in model.state_dict(keep_vars=True).items():
        first.setdefault(id(t), k)
    wanted = set(first.values())
    aliases = {k for k in model.state_dict(keep_vars=True)} - wanted
    missing = sorted(wanted - set(where))
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensors missing from the safetensors files "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    def beyond(key: str) -> bool:  # a layer past config.num_hidden_layers (a config cut to its first layers)
        parts = key.split(".")
        return key.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= config.num_hidden_layers

    unexpected = sorted(k for k in set(where) - wanted - aliases
                        if not k.endswith("rotary_emb.inv_freq") and not beyond(k))
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} tensors the model has no place for "
                              f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")

    def fill(name, module, new):
        prefix = f"{name}." if name else ""
        if any(prefix + key not in where for key in new):  # non-persistent buffers (rotary inv_freq)
            model._init_weights(module)  # transformers' own init; the stored tensors then overwrite
        for key in new:
            full = prefix + key
            if full not in where:
                continue
            t = handles[where[full]].get_tensor(full)
            target = getattr(module, key)
            if target.dtype == torch.float8_e4m3fn and t.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"{folder}: {full} is {t.dtype}, not float8_e4m3fn")
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(f"{folder}: {full} has shape {tuple(t.shape)}, the model {tuple(target.shape)}")
            target.copy_(t)  # the model's dtype for the rest, fp32 for the scales

    with torch.no_grad():
        _materialize(model, device, fill)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:  # no generation_config.json: the one from_config made
        pass
    return model.eval()


def save(model, folder: str) -> None:
    """``model`` (projections ``FP8Linear``, as :func:`build_random` / :func:`load` give) as a
    fine-grained fp8 checkpoint folder: ``config.json`` with its quantization config,
    ``generation_config.json`` and ``model.safetensors`` (e4m3 weights, fp32
    ``weight_scale_inv``; a tied lm_head stored once, as transformers does)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {}
    seen = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in seen and name == "lm_head.weight":
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if quantization_config(model.config) is None:
        model.config.quantization_config = dict(QUANTIZATION)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def is_fp8_checkpoint_folder(folder: str) -> bool:
    """Whether ``folder``'s ``config.json`` names the fine-grained fp8 quantization."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            fields = json.load(f)
    except (OSError, ValueError):
        return False
    qc = fields.get("quantization_config") if isinstance(fields, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"
