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
import warnings
from typing import Optional

import torch

from tileflow.integrations.transformers.graph_table import AddressMemo, GraphTable
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
        self.layers = [layer_weights(layer) for layer in base.layers]
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head_w = model.lm_head.weight
        # TILEFLOW_AHEAD=1 (=keep: evict-last lines): each layer's down projection brings
        # the next layer's attention weights and norms into L2. Off by default: on an H200
        # (1.5B, NOTES.md, 2026-12-03) q/k/v and o ran 5-8 us a token faster, the step
        # no faster (856-868 vs 867 tok/s): those matvecs wait on launch and ramp, not memory
        # the step's order vouches for EARLY_INPUTS: the positions, lengths and residual that
        # qkv, attention and o read were written two or more kernels before them
        # (TILEFLOW_EARLY_INPUTS=0: off)
        self.early = os.environ.get("TILEFLOW_EARLY_INPUTS", "1") != "0"
        mode = os.environ.get("TILEFLOW_AHEAD", "0")
        self.ahead = [next_layer_ahead(nxt) for nxt in self.layers[1:]] + [(self.norm_w,)]
        self.ahead_keep = mode == "keep"
        if mode == "0":
            self.ahead = [()] * len(self.layers)
        # TILEFLOW_MLP_AHEAD="qkv=4,attention=8,o=8[,keep]": those kernels of each layer bring
        # that many MB of the start of its gate-up weights into L2 (mlp_ahead). Off by
        # default: on an H200 (1.5B, NOTES.md 2026-12-04) the issuing kernels slowed by
        # about the prefetch's bytes at copy speed (o=8: 885 -> 856 tok/s), gate-up barely moved
        # TILEFLOW_ATTENTION_O=1: attention and o_proj+residual as one fused suite kernel
        # (two launches instead of three: o_proj's programs combine attention's splits).
        # Off by default: on an H200 (1.5B, NOTES.md 2026-12-04) 676 against 882 tok/s, the
        # o_proj programs' re-reads of the partials cost more than the launch saved
        self.attention_o = os.environ.get("TILEFLOW_ATTENTION_O", "0") != "0"
        # TILEFLOW_READY=1: each layer's down projection waits on per-chunk ready counters
        # that gate-up bumps (suite.ready) instead of for the whole gate-up launch
        self.ready = os.environ.get("TILEFLOW_READY", "0") != "0"
        self.ready_table: Optional[torch.Tensor] = None
        self._links: list = []
        # TILEFLOW_MLP_FUSED=1: each layer's MLP block (norm, gate-up, SiLU, down, residual) as
        # one launch of rms_norm_mlp_residual, its programs summing partial rows with atomics;
        # the down weights are re-laid-out column-major in place for it
        self.mlp_fused = self.fused and os.environ.get("TILEFLOW_MLP_FUSED", "0") != "0"
        if self.mlp_fused:
            for w in self.layers:
                ops.column_major_(w[14])
        shares, self.mlp_keep = parse_mlp_ahead(os.environ.get("TILEFLOW_MLP_AHEAD", ""))
        self.mlp_ahead = [mlp_ahead(shares, w[12], w[13]) for w in self.layers]

    @property
    def takes_any_position(self) -> bool:
        """The fused program rotates at the given position, writes at the cache's own
        count and hides what a key mask hides, as the model does: a padded sequence
        needs no host-side check. The unfused one writes at the position itself."""
        return self.fused

    def run(self, tok: torch.Tensor, pos: torch.Tensor, cache, key_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
        """Logits [1, V] of the token ``tok`` [1, 1] at position ``pos`` [1, 1]; K/V go to
        the cache's next row; ``key_mask`` [1, S] (int32, 0 = hidden) as the model's
        padding mask. Updates ``cache``."""
        p = pos.reshape(1)
        row = cache_row(cache)
        if row is None or not self.fused:
            row = p  # decode_request checked that the position is the cache's count
        lengths = row + 1
        x = ops.embedding(tok.reshape(1), self.embed)
        nh, nkv, dh = self.nh, self.nkv, self.dh
        if self.fused:
            return self._run_fused(x, p, row, lengths, cache, key_mask)
        for i, (ln1, eps1, wq, bq, wk, wv, bk, bv, wo, scale, ln2, eps2, wg, wu, wd) in enumerate(self.layers):
            layer = cache.layers[i]
            xn = ops.rms_norm(x, ln1, eps1)
            q = ops.rope(ops.linear(xn, wq, bq).view(1, nh, dh), p, self.rope_cfg)
            k, v = ops.kv_proj(xn, wk, wv, bk, bv)
            ops.rope_k_into_cache(k.view(1, nkv, dh), v.view(1, nkv, dh), p, layer.keys, layer.values,
                                  self.rope_cfg)
            o = ops.attention_decode(q, layer.keys, layer.values, lengths, scale, key_mask=key_mask)
            x = ops.o_proj_residual(o.view(1, nh * dh), wo, x)
            g = ops.gate_up_silu(ops.rms_norm(x, ln2, eps2), wg, wu)
            x = ops.down_proj_residual(g, wd, x)
        logits = ops.linear(ops.rms_norm(x, self.norm_w, self.norm_eps), self.lm_head_w)
        _advance(cache, 1)
        return logits

    def _run_fused(self, x, p, row, lengths, cache, key_mask) -> torch.Tensor:
        """The same step with the suite's fused kernels: six launches a layer
        (qkv_rope_cache, attention's two stages, o_proj+residual, rms_norm_gate_up_silu,
        down+residual) instead of eleven, five with ``TILEFLOW_MLP_FUSED=1`` (the MLP as one
        rms_norm_mlp_residual); the norms run inside the matvecs."""
        nh, dh, early = self.nh, self.dh, self.early
        links = self.ready_links(x)
        for i, (ln1, eps1, wq, bq, wk, wv, bk, bv, wo, scale, ln2, eps2, wg, wu, wd) in enumerate(self.layers):
            # the reference path (CPU) has no L2 to fill; the interpreter runs the same launch
            prefetching = x.is_cuda or ops.cpu_target() == "triton"
            layer, ahead = cache.layers[i], self.ahead[i] if prefetching else ()
            mlp = self.mlp_ahead[i] if prefetching else {}
            keep = self.mlp_keep
            # early=: the positions / lengths / residual come from before the kernel just
            # ahead (the step's counters and inputs, the previous layer's down projection)
            q = ops.qkv_rope_cache(x, ln1, eps1, wq, wk, wv, bq, bk, bv, p, layer.keys, layer.values, self.rope_cfg,
                                   cache_pos=None if row is p else row, early=early, ahead=mlp.get("qkv", ()),
                                   keep=keep)
            if self.attention_o:
                x = ops.attention_o_proj_residual(q, layer.keys, layer.values, lengths, wo, x, scale,
                                                  key_mask=key_mask, early=early,
                                                  ahead=mlp.get("attention", ()) + mlp.get("o", ()), keep=keep)
            else:
                o = ops.attention_decode(q, layer.keys, layer.values, lengths, scale, key_mask=key_mask,
                                         early=early, ahead=mlp.get("attention", ()), keep=keep)
                x = ops.o_proj_residual(o.view(1, nh * dh), wo, x, early=early, ahead=mlp.get("o", ()), keep=keep)
            if self.mlp_fused:
                x = ops.rms_norm_mlp_residual(x, ln2, eps2, wg, wu, wd)
                continue
            # not early=: down's residual loaded before the wait measured 10.4 -> 13.7 us a
            # layer on an H200 (NOTES.md, 2026-12-03), cause not found
            x = ops.down_proj_residual(ops.rms_norm_gate_up_silu(x, ln2, eps2, wg, wu, ready=links[i]), wd, x,
                                       ahead=ahead, keep=self.ahead_keep, ready=links[i])
        # the count after lm_head (which does not read it), not between the last down
        # projection and lm_head, whose dependent launch would then follow an aten kernel
        logits = ops.rms_norm_linear(x, self.norm_w, self.norm_eps, self.lm_head_w)
        _advance(cache, 1)
        return logits

    def ready_links(self, x: torch.Tensor) -> list:
        """Per layer, the ready counters between its gate-up and down launches (with
        ``TILEFLOW_READY=1``), else None each. Layer ``i`` counts in row ``i`` of one table
        and clears row ``i + 1`` (the last clears row 0 for the next step), so no launch
        of the step clears counters; :meth:`reset_ready` zeroes the table (before a capture)."""
        n = len(self.layers)
        if not self.ready:
            return [None] * n
        if self.ready_table is None or self.ready_table.device != x.device:
            wg = self.layers[0][12]
            chunk, why = ops.ready_chunk(wg.shape[0], wg.shape[1], x.dtype, x.device)
            if not chunk:
                warnings.warn(f"tileflow: TILEFLOW_READY=1 ignored: {why}", stacklevel=2)
                self.ready = False
                return [None] * n
            t = self.ready_table = torch.zeros(n, -(-wg.shape[0] // chunk), dtype=torch.int32, device=x.device)
            self._links = [ops.ReadyLink(t[i], t[(i + 1) % n], chunk) for i in range(n)]
        return self._links

    def reset_ready(self) -> None:
        """Zero the ready counters (a step cut short could leave row 0 counted)."""
        if self.ready_table is not None:
            self.ready_table.zero_()


MLP_AHEAD_KERNELS = ("qkv", "attention", "o")


def parse_mlp_ahead(spec: str) -> tuple[dict, bool]:
    """``"qkv=4,attention=8,o=8[,keep]"`` -> ({kernel: MB}, keep). Raises ValueError on
    a kernel name outside ``MLP_AHEAD_KERNELS`` or a share that is not a number."""
    shares, keep = {}, False
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "keep":
            keep = True
            continue
        name, _, mb = item.partition("=")
        if name not in MLP_AHEAD_KERNELS:
            raise ValueError(f"TILEFLOW_MLP_AHEAD: {name!r} is not one of {', '.join(MLP_AHEAD_KERNELS)}")
        shares[name] = float(mb)
    return shares, keep


def mlp_ahead(shares: dict, wg: torch.Tensor, wu: torch.Tensor) -> dict:
    """Which rows of a layer's gate and up weights each of its attention-side kernels
    prefetches: consecutive row blocks from row 0, ``shares[kernel]`` MB of both weights
    together for each, in the order the kernels run. Gate-up's programs take rows in
    order, so its first programs find their rows in L2. A kernel with no share is absent."""
    row_bytes = wg[0].numel() * wg.element_size() + wu[0].numel() * wu.element_size()
    out, lo = {}, 0
    for name in MLP_AHEAD_KERNELS:
        rows = min(int(shares.get(name, 0) * 2**20) // row_bytes, wg.shape[0] - lo)
        if rows > 0:
            out[name] = (wg[lo:lo + rows], wu[lo:lo + rows])
            lo += rows
    return out


def next_layer_ahead(weights: tuple) -> tuple:
    """What a down projection prefetches of the next layer (its ``layer_weights``): the
    norms, the q/k/v weights and biases, the o weight, in the order they are read."""
    ln1, _, wq, bq, wk, wv, bk, bv, wo, _, ln2 = weights[:11]
    return tuple(t for t in (ln1, wq, wk, wv, bq, bk, bv, wo, ln2) if t is not None)


def layer_weights(layer) -> tuple:
    """A decoder layer's tensors and constants where they lie, in the order the decode and
    prompt programs unpack them: ln1, eps1, wq, bq, wk, wv, bk, bv, wo, scale, ln2, eps2,
    wg, wu, wd."""
    a, m = layer.self_attn, layer.mlp
    return (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
            a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.v_proj.weight, a.k_proj.bias, a.v_proj.bias,
            a.o_proj.weight, a.scaling,
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
            m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)


def _key_mask(mask: torch.Tensor, cache) -> torch.Tensor:
    """The [1, S] int32 key mask of a [1, T] attention mask: rows past T hidden."""
    key_mask = torch.zeros(1, cache.layers[0].keys.shape[2], dtype=torch.int32, device=mask.device)
    key_mask[:, :mask.shape[1]] = mask
    return key_mask


def cache_row(cache) -> Optional[torch.Tensor]:
    """The row the next token goes to, as the device tensor [1] transformers counts
    with (``StaticLayer.cumulative_length``), or None where the count is not a tensor."""
    counter = getattr(cache.layers[0], "cumulative_length", None)
    return counter.reshape(1) if isinstance(counter, torch.Tensor) and counter.numel() == 1 else None


def _advance(cache, n: int) -> None:
    """What ``StaticLayer.update`` does besides writing: count the tokens (transformers
    keeps the count as a device tensor, so this is capturable). One ``_foreach_add_``:
    a launch per layer's counter cost ~1.5 us each on an H200 (28 a token for the 1.5B
    model, 45 us of a 1.25 ms step, seen in the step breakdown)."""
    counters = [c for c in (getattr(layer, "cumulative_length", None) for layer in cache.layers)
                if isinstance(c, torch.Tensor)]
    if counters:
        torch._foreach_add_(counters, n)


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
        self.graphs = GraphTable(max_graphs)
        self.addresses = AddressMemo()

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache, mask: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """Logits of one step; ``mask`` [1, T] is the model's 2-D attention mask (T up to
        the cache capacity; rows past T are hidden, as transformers pads it)."""
        if tok.device.type != "cuda":
            return self.program.run(tok, pos, cache, None if mask is None else _key_mask(mask, cache))
        key = (self.addresses(cache), mask is not None)
        entry = self.graphs.get(key, cache) or self.graphs.put(
            key, cache, lambda: self._capture(tok, pos, cache, None if mask is None else _key_mask(mask, cache)))
        _, graph, tok_buf, pos_buf, mask_buf, logits = entry
        # one multi-tensor launch for both (two copies cost a launch and a gap each, ~2 us)
        torch._foreach_copy_([tok_buf, pos_buf], [tok.reshape(1, 1), pos.reshape(1, 1)])
        if mask is not None:
            mask_buf[:, mask.shape[1]:].zero_()
            mask_buf[:, :mask.shape[1]].copy_(mask)
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's buffer

    def _capture(self, tok, pos, cache, key_mask) -> tuple:
        tok_buf, pos_buf = tok.reshape(1, 1).clone(), pos.reshape(1, 1).clone()
        mask_buf = None if key_mask is None else key_mask.clone()
        self.program.reset_ready()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles every kernel; writes the next row (rewritten identically below)
            self.program.run(tok_buf, pos_buf, cache, mask_buf)
            _advance(cache, -1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.program.run(tok_buf, pos_buf, cache, mask_buf)
        return graph, tok_buf, pos_buf, mask_buf, logits


def cache_keyword(model) -> str:
    """The keyword a CausalLM's forward takes its cache by: ``cache`` where the class's
    own forward names it (transformers 5.24 and later, which warn on ``past_key_values``
    and drop it in 5.40), else ``past_key_values``. Read from the class, so a patched or
    compiled instance forward does not hide it."""
    import inspect

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


def mask_row(mask, capacity: int) -> tuple[Optional[torch.Tensor], str]:
    """The attention mask of a one-token step as one [1, T] row over the keys (T up to
    ``capacity``), or None for no mask, and "" or why the program cannot honour it.

    transformers passes a 2-D padding mask [1, T] (earlier releases), or (5.24 generate)
    a dict of precomputed masks per attention type whose ``full_attention`` entry is a
    bool [1, 1, 1, S]: for one query that row is exactly a per-key mask."""
    if isinstance(mask, dict):
        if set(mask) - {"full_attention"}:
            return None, f"attention masks {sorted(mask)} (the program has full attention only)"
        mask = mask.get("full_attention")
    if mask is None:
        return None, ""
    if not isinstance(mask, torch.Tensor):
        return None, f"attention mask of type {type(mask).__name__}"
    if mask.dim() == 4 and mask.shape[:3] == (1, 1, 1) and mask.dtype == torch.bool:
        mask = mask.reshape(1, mask.shape[3])
    elif mask.dim() == 4:
        return None, f"attention mask {tuple(mask.shape)} {mask.dtype} (the program takes one bool row of keys)"
    if mask.dim() != 2 or mask.shape[0] != 1 or mask.shape[1] > capacity:
        return None, f"attention mask of shape {tuple(mask.shape)} (the program takes [1, T <= {capacity}])"
    return mask, ""


def unsupported_request(kwargs: dict) -> str:
    """What a forward call asks for that the programs do not give (extra outputs, inputs
    embedded by the caller, a loss, a tuple), or ""."""
    for flag in ("output_attentions", "output_hidden_states", "inputs_embeds", "labels"):
        if kwargs.get(flag):
            return f"{flag} requested"
    return "return_dict=False" if kwargs.get("return_dict") is False else ""


def decode_request(args, kwargs, any_position: bool = False
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], object, Optional[torch.Tensor], str]:
    """(tok, pos, cache, mask, "") when a CausalLM forward call is a plain one-token
    decode step on a static cache of batch 1, else (..., why not). ``mask`` is the 2-D
    attention mask to honour, or None.

    With ``any_position`` (a program that writes at the cache's count and takes a key
    mask, and a cache that counts on the device) nothing is read back to the host: the
    step does not wait for the one before it (unless a ``cache_position`` is passed, as
    generate does before transformers 5.24: one read checks it against the count).
    Otherwise one host sync checks that the position is the cache's length and that no
    position is masked."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = cache_argument(kwargs)
    none = (None, None, None, None)
    if input_ids is None or input_ids.dim() != 2 or tuple(input_ids.shape) != (1, 1):
        return (*none, "not a one-token step")
    why = unsupported_request(kwargs)
    if why:
        return (*none, why)
    if cache is None:
        return (*none, "no cache")
    why = static_cache_problem(cache)
    if why:
        return (*none, why)
    pos = kwargs.get("position_ids")
    mask, why = mask_row(kwargs.get("attention_mask"), cache.layers[0].keys.shape[2])
    if why:
        return (*none, why)
    row = cache_row(cache)
    given = kwargs.get("cache_position")
    if isinstance(given, torch.Tensor) and given.numel() != 1:
        return (*none, f"cache_position of {given.numel()} elements")
    if any_position and row is not None:
        # releases before 5.24 bound the causal mask by cache_position (generate passes
        # it every step): the program bounds it by the cache's count, so they must agree
        if isinstance(given, torch.Tensor) and int(given.reshape(-1)[0]) != int(row[0]):
            return (*none, "cache_position differs from the cache length")
        if pos is None and isinstance(given, torch.Tensor):
            pos = given.reshape(1, 1)
        return input_ids, (row.reshape(1, 1) if pos is None else pos), cache, mask, ""
    filled = row if row is not None else cache.get_seq_length()
    if pos is not None and int(pos.reshape(-1)[0]) != int(filled):
        return (*none, "padded sequence: the position differs from the cache length")
    if isinstance(given, torch.Tensor) and int(given.reshape(-1)[0]) != int(filled):
        return (*none, "cache_position differs from the cache length")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        return (*none, "attention mask hides positions (padding)")
    if pos is None:
        pos = torch.as_tensor(filled, device=input_ids.device).reshape(1, 1).to(torch.int64)
    return input_ids, pos, cache, None, ""
