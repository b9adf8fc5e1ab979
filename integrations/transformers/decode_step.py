"""One whole decode step of a Qwen2 / Llama model as suite kernels, and its CUDA graph.

Launching ~250 kernels a token from Python costs far more than the kernels (measured
on an H100: ~115 us a launch through the patched layers, 41 tok/s for the 1.5B
model). So for the common case, one new token on a transformers ``StaticCache``,
``patch`` runs this program instead of the model's forward: the embedding row, per
layer ``rms_norm -> q/kv matvecs -> rope (K and V written straight into the cache)
-> attention over the filled part -> o_proj+residual -> rms_norm -> gate_up_silu ->
down+residual``, the final norm and the lm_head. On a GPU it is captured once per
cache into a CUDA graph and replayed every token; inputs are copied into the graph's
buffers, the cache tensors never move.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from tileflow.runtime import ops


class DecodeProgram:
    """The decode step of ``model`` reading its weights where they lie."""

    def __init__(self, model, rope_cfg: ops.RopeConfig, fused: Optional[bool] = None):
        cfg = model.config
        # TILEFLOW_FUSED=0 runs the unfused kernels (to measure what fusion buys)
        self.fused = os.environ.get("TILEFLOW_FUSED", "1") != "0" if fused is None else fused
        self.rope_cfg = rope_cfg
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        base = model.model
        self.dh = base.layers[0].self_attn.head_dim
        self.embed = base.embed_tokens.weight
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.v_proj.weight, a.k_proj.bias, a.v_proj.bias,
                a.o_proj.weight, a.scaling,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
            ))
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head_w = model.lm_head.weight

    def run(self, tok: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """Logits [1, V] of the token ``tok`` [1, 1] at ``pos`` [1, 1]; updates ``cache``."""
        p = pos.reshape(1)
        lengths = p + 1
        x = ops.embedding(tok.reshape(1), self.embed)
        nh, nkv, dh = self.nh, self.nkv, self.dh
        if self.fused:
            return self._run_fused(x, p, lengths, cache)
        for i, (ln1, eps1, wq, bq, wk, wv, bk, bv, wo, scale, ln2, eps2, wg, wu, wd) in enumerate(self.layers):
            layer = cache.layers[i]
            xn = ops.rms_norm(x, ln1, eps1)
            q = ops.rope(ops.linear(xn, wq, bq).view(1, nh, dh), p, self.rope_cfg)
            k, v = ops.kv_proj(xn, wk, wv, bk, bv)
            ops.rope_k_into_cache(k.view(1, nkv, dh), v.view(1, nkv, dh), p, layer.keys, layer.values,
                                  self.rope_cfg)
            o = ops.attention_decode(q, layer.keys, layer.values, lengths, scale)
            x = ops.o_proj_residual(o.view(1, nh * dh), wo, x)
            g = ops.gate_up_silu(ops.rms_norm(x, ln2, eps2), wg, wu)
            x = ops.down_proj_residual(g, wd, x)
        _advance(cache, 1)
        return ops.linear(ops.rms_norm(x, self.norm_w, self.norm_eps), self.lm_head_w)


    def _run_fused(self, x, p, lengths, cache) -> torch.Tensor:
        """The same step with the suite's fused kernels: six launches a layer
        (qkv_rope_cache, attention's two stages, o_proj+residual, rms_norm_gate_up_silu,
        down+residual) instead of eleven; the norms run inside the matvecs."""
        nh, dh = self.nh, self.dh
        for i, (ln1, eps1, wq, bq, wk, wv, bk, bv, wo, scale, ln2, eps2, wg, wu, wd) in enumerate(self.layers):
            layer = cache.layers[i]
            q = ops.qkv_rope_cache(x, ln1, eps1, wq, wk, wv, bq, bk, bv, p, layer.keys, layer.values, self.rope_cfg)
            o = ops.attention_decode(q, layer.keys, layer.values, lengths, scale)
            x = ops.o_proj_residual(o.view(1, nh * dh), wo, x)
            x = ops.down_proj_residual(ops.rms_norm_gate_up_silu(x, ln2, eps2, wg, wu), wd, x)
        _advance(cache, 1)
        return ops.rms_norm_linear(x, self.norm_w, self.norm_eps, self.lm_head_w)


def _advance(cache, n: int) -> None:
    """What ``StaticLayer.update`` does besides writing: count the tokens (transformers
    keeps the count as a device tensor, so this is capturable)."""
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.add_(n)


def static_cache_problem(cache) -> str:
    """Why ``cache`` cannot take the decode program, or ""."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return f"cache {type(cache).__name__} has no layers"
    for layer in layers:
        if type(layer).__name__ != "StaticLayer":
            return f"cache layer {type(layer).__name__} (the program writes StaticLayer tensors)"
        if not getattr(layer, "is_initialized", False):
            return "cache not initialised yet"
        if layer.keys.shape[0] != 1:
            return f"cache batch {layer.keys.shape[0]}"
    return ""


class GraphedDecode:
    """Runs a :class:`DecodeProgram`: captured in a CUDA graph per cache on a GPU,
    directly on CPU."""

    def __init__(self, program: DecodeProgram, max_graphs: int = 2):
        self.program = program
        self.graphs: dict[tuple, tuple] = {}
        self.max_graphs = max_graphs

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        if tok.device.type != "cuda":
            return self.program.run(tok, pos, cache)
        key = (id(cache), cache.layers[0].keys.data_ptr())
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(tok, pos, cache)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = entry
        graph, tok_buf, pos_buf, logits = entry
        tok_buf.copy_(tok.reshape(1, 1))
        pos_buf.copy_(pos.reshape(1, 1))
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's buffer

    def _capture(self, tok, pos, cache) -> tuple:
        tok_buf, pos_buf = tok.reshape(1, 1).clone(), pos.reshape(1, 1).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles every kernel; writes row pos (rewritten identically below)
            self.program.run(tok_buf, pos_buf, cache)
            _advance(cache, -1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.program.run(tok_buf, pos_buf, cache)
        return graph, tok_buf, pos_buf, logits


def cache_argument(kwargs: dict, default=None):
    """The cache a forward call was given: ``cache=`` (transformers 5.24 and later) or
    ``past_key_values=`` (earlier releases, still accepted by later ones)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values", default)


def decode_request(args, kwargs) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], object, str]:
    """(tok, pos, cache, "") when a CausalLM forward call is a plain one-token decode
    step on a static cache of batch 1 without padding, else (..., why not)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = cache_argument(kwargs)
    if input_ids is None or input_ids.dim() != 2 or tuple(input_ids.shape) != (1, 1):
        return None, None, None, "not a one-token step"
    for flag in ("output_attentions", "output_hidden_states", "inputs_embeds", "labels"):
        if kwargs.get(flag):
            return None, None, None, f"{flag} requested"
    if kwargs.get("return_dict") is False:
        return None, None, None, "return_dict=False"
    if cache is None:
        return None, None, None, "no cache"
    why = static_cache_problem(cache)
    if why:
        return None, None, None, why
    filled = cache.layers[0].cumulative_length if hasattr(cache.layers[0], "cumulative_length") \
        else cache.get_seq_length()
    pos = kwargs.get("position_ids")
    mask = kwargs.get("attention_mask")
    # one host sync a token (generate syncs each step anyway): the new token must sit
    # at the cache's filled length, and no position may be masked, or the mask decides
    if pos is not None and int(pos.reshape(-1)[0]) != int(filled):
        return None, None, None, "padded sequence: the position differs from the cache length"
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        return None, None, None, "attention mask hides positions (padding)"
    if pos is None:
        pos = torch.as_tensor(filled, device=input_ids.device).reshape(1, 1).to(torch.int64)
    return input_ids, pos, cache, ""
