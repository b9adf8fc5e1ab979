"""A plain-JAX DeepSeek-R1-Distill decoder (Qwen2 and Llama architectures): static KV
cache, greedy decode, weights from a transformers model in memory or a local
safetensors checkpoint folder.

Written the way a JAX user would write it, with no tileflow calls: ``decode_step``
is what ``tileflow.jax.optimize`` rewrites. ``decode_step_tileflow`` is the same step
with the primitives called by hand, the "direct" path of the benchmark.

Layouts follow the checkpoint: every projection weight is ``[out, in]`` (``x @ w.T``),
the caches are ``[B, NKV, S, DH]`` per layer.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Params = dict
Cache = list  # per layer: {"k": [B, NKV, S, DH], "v": [B, NKV, S, DH]}


@dataclass(frozen=True)
class DecodeConfig:
    """The architecture fields the decoder needs (hashable: a static argument)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    eps: float
    theta: float
    qkv_bias: bool
    tie_embeddings: bool = False
    rope_scaling: tuple = ()  # sorted items of a transformers rope_scaling dict

    @property
    def scaling(self) -> Optional[dict]:
        return dict(self.rope_scaling) or None


def config_from_transformers(cfg) -> DecodeConfig:
    """A DecodeConfig from a transformers Qwen2Config / LlamaConfig."""
    if cfg.model_type not in ("qwen2", "llama"):
        raise ValueError(f"model_type {cfg.model_type!r}: the DeepSeek-R1-Distill models are qwen2 and llama")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        src = {**scaling, **params}
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": rope_type, **{k: float(src[k]) for k in keep if k in src}}
    else:
        scaling = {}
    bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    return DecodeConfig(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                        head_dim=head_dim, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                        vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps), theta=float(theta), qkv_bias=bias,
                        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                        rope_scaling=tuple(sorted(scaling.items())))


def inv_freq(cfg: DecodeConfig) -> np.ndarray:
    """RoPE inverse frequencies as transformers computes them (fp32), rope scaling
    (linear, llama3) applied."""
    i = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32)
    inv = (1.0 / (cfg.theta ** (i / cfg.head_dim))).astype(np.float32)
    s = cfg.scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(s["factor"])
    elif kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen < old / high, inv, np.where(wavelen > old / low, inv / factor, smoothed))
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported")
    return inv.astype(np.float32)


# ---------------------------------------------------------------------------- weights

_LAYER_KEYS = {"ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
               "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
               "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
               "wo": "self_attn.o_proj.weight", "wg": "mlp.gate_proj.weight", "wu": "mlp.up_proj.weight",
               "wd": "mlp.down_proj.weight"}


def params_from_state(cfg: DecodeConfig, get: Callable[[str], Any], dtype) -> Params:
    """The parameter tree from ``get(hf_name) -> array`` (cast to ``dtype``)."""
    def arr(name):
        return jnp.asarray(get(name)).astype(dtype)

    layers = []
    for i in range(cfg.layers):
        layer = {}
        for key, suffix in _LAYER_KEYS.items():
            if key.startswith("b") and not cfg.qkv_bias:
                continue
            layer[key] = arr(f"model.layers.{i}.{suffix}")
        layers.append(layer)
    embed = arr("model.embed_tokens.weight")
    head = embed if cfg.tie_embeddings else arr("lm_head.weight")
    return {"embed": embed, "layers": layers, "norm": arr("model.norm.weight"), "lm_head": head}


def _torch_to_numpy(t):
    import torch

    return t.detach().to(torch.float32).cpu().numpy()


def from_transformers(model, dtype=None) -> tuple[DecodeConfig, Params]:
    """(config, params) of a transformers Qwen2/Llama causal LM in memory. ``dtype``
    defaults to the model's (bf16 / fp16 / fp32)."""
    cfg = config_from_transformers(model.config)
    state = model.state_dict()
    if dtype is None:
        dtype = {"torch.bfloat16": jnp.bfloat16, "torch.float16": jnp.float16}.get(str(model.dtype), jnp.float32)
    return cfg, params_from_state(cfg, lambda n: _torch_to_numpy(state[n]), dtype)


def from_checkpoint(folder: str, dtype=jnp.bfloat16) -> tuple[DecodeConfig, Params]:
    """(config, params) of a local checkpoint folder (``config.json`` and
    ``*.safetensors``, sharded or not); nothing is downloaded."""
    from safetensors.flax import load_file
    from transformers import AutoConfig

    cfg = config_from_transformers(AutoConfig.from_pretrained(folder, local_files_only=True))
    tensors = {}
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    for f in files:
        tensors.update(load_file(os.path.join(folder, f)))
    return cfg, params_from_state(cfg, tensors.__getitem__, dtype)


def init_cache(cfg: DecodeConfig, batch: int, max_len: int, dtype) -> Cache:
    """Zeroed static caches for ``max_len`` positions."""
    shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.layers)]


# ----------------------------------------------------------------------- plain JAX


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_cos_sin(cfg: DecodeConfig, pos, dtype):
    """cos and sin [B, 1, DH] at integer positions ``pos`` [B]."""
    freqs = pos.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq(cfg))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype)[:, None, :], jnp.sin(emb).astype(dtype)[:, None, :]


def attention(cfg: DecodeConfig, q, k_cache, v_cache, length):
    """Decode attention of ``q`` [B, NH, DH] over the first ``length`` positions of the
    caches [B, NKV, S, DH]; softmax in fp32."""
    b, s = q.shape[0], k_cache.shape[2]
    qg = q.reshape(b, cfg.kv_heads, cfg.heads // cfg.kv_heads, cfg.head_dim)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache) * (cfg.head_dim ** -0.5)
    scores = jnp.where(jnp.arange(s) < length, scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v_cache).reshape(b, cfg.heads * cfg.head_dim)


def decode_step(cfg: DecodeConfig, params: Params, token, cache: Cache, pos):
    """One greedy decode step: ``token`` [B] at position ``pos`` (int scalar) ->
    (logits [B, V] fp32, updated cache)."""
    b = token.shape[0]
    dtype = params["embed"].dtype
    h = params["embed"][token]
    positions = jnp.full((b,), pos, jnp.int32)
    cos, sin = rope_cos_sin(cfg, positions, dtype)
    new_cache = []
    for layer, kv in zip(params["layers"], cache):
        x = rms_norm(h, layer["ln1"], cfg.eps)
        q, k, v = x @ layer["wq"].T, x @ layer["wk"].T, x @ layer["wv"].T
        if cfg.qkv_bias:
            q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
        q = q.reshape(b, cfg.heads, cfg.head_dim)
        k = k.reshape(b, cfg.kv_heads, cfg.head_dim)
        v = v.reshape(b, cfg.kv_heads, cfg.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache = jax.lax.dynamic_update_slice(kv["k"], k[:, :, None, :], (0, 0, pos, 0))
        v_cache = jax.lax.dynamic_update_slice(kv["v"], v[:, :, None, :], (0, 0, pos, 0))
        new_cache.append({"k": k_cache, "v": v_cache})
        h = h + attention(cfg, q, k_cache, v_cache, pos + 1) @ layer["wo"].T
        x = rms_norm(h, layer["ln2"], cfg.eps)
        h = h + (jax.nn.silu(x @ layer["wg"].T) * (x @ layer["wu"].T)) @ layer["wd"].T
    h = rms_norm(h, params["norm"], cfg.eps)
    return (h @ params["lm_head"].T).astype(jnp.float32), new_cache


def decode_step_tileflow(cfg: DecodeConfig, params: Params, token, cache: Cache, pos):
    """``decode_step`` with the suite's primitives called directly: per layer the torch
    patch path's launches (norm + q/k/v + RoPE + cache write, attention's two stages,
    o + residual, norm + gate/up + SiLU and down + residual)."""
    from tileflow.integrations.jax import ops

    b = token.shape[0]
    h = ops.embedding_lookup(token, params["embed"])
    positions = jnp.full((b,), pos, jnp.int32)
    lengths = positions + 1
    new_cache = []
    for layer, kv in zip(params["layers"], cache):
        q, k_cache, v_cache = ops.qkv_rope_cache(h, layer["ln1"], cfg.eps, layer["wq"], layer["wk"], layer["wv"],
                                                 layer.get("bq"), layer.get("bk"), layer.get("bv"), positions,
                                                 kv["k"], kv["v"], cfg.theta, cfg.scaling)
        new_cache.append({"k": k_cache, "v": v_cache})
        attn = ops.gqa_attention(q, k_cache, v_cache, lengths, cfg.head_dim ** -0.5)
        h = ops.matvec_residual(attn.reshape(b, cfg.heads * cfg.head_dim), layer["wo"], h)
        x = ops.rms_norm_gate_up_silu(h, layer["ln2"], cfg.eps, layer["wg"], layer["wu"])
        h = ops.matvec_residual(x, layer["wd"], h)
    h = ops.rms_norm(h, params["norm"], cfg.eps)
    return ops.matvec(h, params["lm_head"]).astype(jnp.float32), new_cache


def prefill(step: Callable, params: Params, ids, cache: Cache):
    """Feed the prompt ``ids`` [B, T] through ``step`` one position at a time (a
    ``lax.scan``: the prompt goes through exactly the decode step's arithmetic);
    returns (logits of the last position, cache)."""
    def body(carry, t):
        cache, _ = carry
        logits, cache = step(params, jax.lax.dynamic_index_in_dim(ids, t, axis=1, keepdims=False), cache, t)
        return (cache, logits), None

    zeros = jnp.zeros((ids.shape[0], params["lm_head"].shape[0]), jnp.float32)
    (cache, logits), _ = jax.lax.scan(body, (cache, zeros), jnp.arange(ids.shape[1], dtype=jnp.int32))
    return logits, cache


def generate(step: Callable, params: Params, ids, new_tokens: int, cache: Cache,
             on_logits: Optional[Callable] = None) -> list[int]:
    """Greedy decode with a jitted ``step(params, token, cache, pos)``: prefill then
    ``new_tokens - 1`` steps; returns the new tokens of sequence 0."""
    n = ids.shape[1]
    logits, cache = jax.jit(functools.partial(prefill, step))(params, ids, cache)
    tok = jnp.argmax(logits, axis=-1)
    out = [tok]
    for i in range(new_tokens - 1):
        logits, cache = step(params, tok, cache, jnp.int32(n + i))
        if on_logits is not None:
            on_logits(logits)
        tok = jnp.argmax(logits, axis=-1)
        out.append(tok)
    return [int(t[0]) for t in out]
