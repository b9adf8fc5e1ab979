"""The prompt pass of a patched Qwen2 / Llama model: the same arithmetic as the model's
forward, as a plain sequence of PyTorch calls.

At batch 1 a short prompt's forward is bound by the host, not the GPU: transformers'
layer forwards (kwargs plumbing, output capture, mask construction, the attention
interface lookup) cost ~0.7 ms a layer on the H200 host against ~0.1 ms of kernels, so
a 128-token prompt of the 1.5B model took 19-53 ms across calls (16.3 ms this way, 4.8 ms
replayed from a graph). This program issues the same
kernels the model's own forward issues (cuBLAS linears, the model's RMSNorm arithmetic,
its rotary embedding and ``apply_rotary_pos_emb``, causal SDPA) with nothing between
them, and writes K/V through ``cache.update`` so the cache is exactly what the model
would leave. It runs only for a prompt from an empty cache with no padding, positions
0..T-1 (``prefill_request`` says why not otherwise); decode steps are
``decode_step.py``'s.

Even so a short prompt stays launch-bound (~60 launches a layer), so on a GPU a prompt
length seen before on the same static cache is captured in a CUDA graph and replayed
(``GraphedPrefill``); the first prompt of each length runs the program directly.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

from tileflow import settings
from tileflow.integrations.shared.hf import cache_argument
from tileflow.integrations.transformers.decode_step import layer_weights, unsupported_request
from tileflow.integrations.transformers.graph_table import AddressMemo, GraphTable


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm / LlamaRMSNorm's arithmetic, cast for cast."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class PrefillProgram:
    """The forward of ``model`` over a whole prompt, from an empty cache."""

    def __init__(self, model):
        base = model.model
        attn0 = base.layers[0].self_attn
        # the model's own rotation (its module's function), so any rope variant it has is kept
        self.apply_rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        self.rotary_emb = base.rotary_emb
        self.embed = base.embed_tokens.weight
        self.dh = attn0.head_dim
        self.layers = [layer_weights(layer) for layer in base.layers]
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head_w = model.lm_head.weight

    def run(self, ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [1, T or logits_to_keep, V] of the prompt ``ids`` [1, T]; K/V of every
        layer go to ``cache`` rows 0..T-1 (``cache`` must be empty)."""
        t = ids.shape[1]
        dh = self.dh
        x = F.embedding(ids, self.embed)
        positions = torch.arange(t, device=ids.device).unsqueeze(0)
        cos, sin = self.rotary_emb(x, positions)
        for i, w in enumerate(self.layers):
            h = _rms_norm(x, w.ln1, w.eps1)
            q = F.linear(h, w.wq, w.bq).view(1, t, -1, dh).transpose(1, 2)
            k = F.linear(h, w.wk, w.bk).view(1, t, -1, dh).transpose(1, 2)
            v = F.linear(h, w.wv, w.bv).view(1, t, -1, dh).transpose(1, 2)
            q, k = self.apply_rope(q, k, cos, sin)
            # releases before 5.24 index the write by cache_position; later ones count
            cache.update(k, v, i, {"cache_position": positions[0]})
            # the cache was empty, so the keys so far are exactly this prompt's
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=w.scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
            x = x + F.linear(o.transpose(1, 2).reshape(1, t, -1), w.wo)
            h = _rms_norm(x, w.ln2, w.eps2)
            x = x + F.linear(F.silu(F.linear(h, w.wg)) * F.linear(h, w.wu), w.wd)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return F.linear(_rms_norm(x, self.norm_w, self.norm_eps), self.lm_head_w)


def prefill_request(args, kwargs) -> tuple[Optional[torch.Tensor], object, int, str]:
    """(ids, cache, logits_to_keep, "") when a CausalLM forward call is a plain prompt
    pass (batch 1, several tokens, no padding, positions from 0) into an empty cache,
    else (None, None, 0, why not). Reads the cache length back (one host sync, before
    any prompt kernel is queued)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    cache = cache_argument(kwargs)
    no = (None, None, 0)
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        return (*no, "not a batch-1 prompt")
    why = unsupported_request(kwargs)
    if why:
        return (*no, why)
    if cache is None or not kwargs.get("use_cache", True):
        return (*no, "no cache")
    layers = getattr(cache, "layers", None)
    if layers is None or (not layers and type(cache).__name__ != "DynamicCache") or any(type(layer).__name__ not in ("StaticLayer", "DynamicLayer") for layer in layers):
        return (*no, f"cache {type(cache).__name__} (the prompt pass writes static or dynamic layers)")
    capacity = getattr(layers[0], "max_cache_len", None) if layers else None
    if capacity is not None and ids.shape[1] > capacity:
        return (*no, f"prompt of {ids.shape[1]} tokens for a cache of {capacity}")
    keep = kwargs.get("logits_to_keep", 0)
    if not isinstance(keep, int):
        return (*no, "logits_to_keep given as indices")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):  # transformers 5.24 generate: None = causal, as sdpa builds it
        if set(mask) - {"full_attention"} or mask.get("full_attention") is not None:
            return (*no, "a precomputed attention mask")
        mask = None
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        return (*no, "attention mask not of the prompt's [1, T] shape")
    for name in ("position_ids", "cache_position"):
        given = kwargs.get(name)
        if given is not None and not torch.equal(given.reshape(-1).cpu(),
                                                 torch.arange(ids.shape[1])):
            return (*no, f"{name} not 0..T-1")
    if int(cache.get_seq_length()) != 0:
        return (*no, "the cache already holds tokens (chunked prompt)")
    if mask is not None and not bool(mask.all()):
        return (*no, "attention mask hides positions (padding)")
    return ids, cache, keep, ""


class GraphedPrefill:
    """Runs a :class:`PrefillProgram`; on a GPU, the second prompt of a length (up to
    ``max_tokens``) into the same static cache captures a CUDA graph that later
    prompts of that length replay. Longer prompts are bound by the GPU, not the
    launches, and a graph would keep their activations (and logits) allocated.
    ``options``: a :class:`tileflow.settings.Options` or a mapping of its fields (over the
    environment's); ``prefill_graphs=False`` runs every prompt directly."""

    def __init__(self, program: PrefillProgram, max_graphs: int = 4, max_tokens: int = 512, options=None):
        self.program = program
        self.max_tokens = max_tokens
        self.graphs = GraphTable(max_graphs)
        self.addresses = AddressMemo()
        self.seen: set = set()
        # prefill_graphs=False (TILEFLOW_PREFILL_GRAPHS=0) runs every prompt directly (to
        # measure what graphs buy)
        self.enabled = settings.resolve(options).prefill_graphs

    def __call__(self, ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
        layers = cache.layers
        static = all(type(layer).__name__ == "StaticLayer" and getattr(layer, "is_initialized", False)
                     for layer in layers)
        if not (self.enabled and static and ids.device.type == "cuda" and ids.shape[1] <= self.max_tokens):
            return self.program.run(ids, cache, logits_to_keep)
        key = (self.addresses(cache), ids.shape[1], logits_to_keep)
        entry = self.graphs.get(key, cache)
        if entry is None:
            if key not in self.seen:  # a length seen once may be a one-off: no capture yet
                self.seen.add(key)
                return self.program.run(ids, cache, logits_to_keep)
            entry = self.graphs.put(key, cache, lambda: self._capture(ids, cache, logits_to_keep))
        _, graph, ids_buf, logits = entry
        ids_buf.copy_(ids)
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's buffer

    def _capture(self, ids, cache, logits_to_keep):
        # the direct run of the first sighting compiled nothing and left no state:
        # capture records without executing, so the (empty) cache is written at replay
        ids_buf = ids.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.program.run(ids_buf, cache, logits_to_keep)
        return graph, ids_buf, logits
