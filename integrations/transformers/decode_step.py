"""One whole decode step of a Qwen2 / Llama model as suite kernels, and its CUDA graph.

Launching ~250 kernels a token from Python costs far more than the kernels (measured
slower than the model's own code; docs/performance.md). So for the common case, one new token on a transformers ``StaticCache``,
``patch`` runs this program instead of the model's forward: the embedding row, per
layer ``rms_norm -> q/kv matvecs -> rope (K and V written straight into the cache)
-> attention over the filled part -> o_proj+residual -> rms_norm -> gate_up_silu ->
down+residual``, the final norm and the lm_head. On a GPU it is captured once per
cache into a CUDA graph and replayed every token; inputs are copied into the graph's
buffers, the cache tensors never move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tileflow import settings
from tileflow.integrations.shared.hf import cache_argument
from tileflow.integrations.transformers.graph_table import AddressMemo, GraphTable
from tileflow.runtime import ops


class DecodeProgram:
    """The decode step of ``model`` reading its weights where they lie. ``options``: a
    :class:`tileflow.settings.Options` or a mapping of its fields (over the environment's)."""

    def __init__(self, model, rope_cfg: ops.RopeConfig, options=None):
        cfg = model.config
        self.rope_cfg = rope_cfg
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        base = model.model
        self.dh = base.layers[0].self_attn.head_dim
        self.embed = base.embed_tokens.weight
        self.layers = [layer_weights(layer) for layer in base.layers]
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head_w = model.lm_head.weight
        # the step's order vouches for early inputs: the positions, lengths and residual that
        # qkv, attention and o read were written two or more kernels before them (the
        # option early_inputs, TILEFLOW_EARLY_INPUTS=0: off, to measure what it buys);
        # launch_at_start: the launches that let the next one in at their programs' start,
        # which turns the early inputs of the launch after them off (launch_plan)
        opts = settings.resolve(options)
        self.early = opts.early_inputs
        self.plan = launch_plan(settings.launch_set(opts.launch_at_start), opts.early_inputs)
        self.notes = self.plan.notes()

    @property
    def takes_any_position(self) -> bool:
        """The program rotates at the given position, writes at the cache's own count and
        hides what a key mask hides, as the model does: a padded sequence needs no
        host-side check."""
        return True

    def run(self, tok: torch.Tensor, pos: torch.Tensor, cache, key_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
        """Logits [B * R, V] of the tokens ``tok`` [B, R] at positions ``pos`` [B, R] on a
        batch-B static cache; K/V go to the cache's next R rows (the same rows for every
        sequence, as transformers writes a left-padded batch); ``key_mask`` [B, S]
        (int32, 0 = hidden) as the model's padding mask. Updates ``cache``. R > 1 (B = 1):
        a speculative verify step, the R tokens consecutive and causal among themselves.

        Six launches a layer (qkv_rope_cache, attention's two stages, o_proj+residual,
        rms_norm_gate_up_silu, down+residual); the norms run inside the matvecs, whose
        programs read each weight tile once for all B * R rows."""
        b, r = tok.shape
        m = b * r
        p = pos.reshape(m)
        row, lengths = step_rows(cache, p, b, r)
        start, early = self.plan.at_start, self.plan.early
        x = ops.embedding_lookup(tok.reshape(m), self.embed, at_start="embedding" in start)
        nh, dh = self.nh, self.dh
        for w, layer in zip(self.layers, cache.layers):
            # early=: the positions / lengths / residual come from before the kernel just
            # ahead (the step's counters and inputs, the previous layer's down projection)
            q = ops.qkv_rope_cache(x, w.ln1, w.eps1, w.wq, w.wk, w.wv, w.bq, w.bk, w.bv, p, layer.keys, layer.values,
                                   self.rope_cfg, cache_pos=None if row is p else row, early="qkv" in early,
                                   at_start="qkv" in start)
            if r > 1:
                q = q.view(b, r, nh, dh)
            o = ops.gqa_attention(q, layer.keys, layer.values, lengths, w.scale, key_mask=key_mask,
                                  early="attention" in early, at_start="attention" in start)
            x = ops.matvec_residual(o.view(m, nh * dh), w.wo, x, early="o" in early, at_start="o" in start)
            # not early=: down's residual loaded before the wait measured slower
            # (docs/notebook.md), cause not found
            act = ops.rms_norm_gate_up_silu(x, w.ln2, w.eps2, w.wg, w.wu, at_start="gate_up" in start)
            x = ops.matvec_residual(act, w.wd, x, at_start="down" in start)
        # the count after lm_head (which does not read it), not between the last down
        # projection and lm_head, whose dependent launch would then follow an aten kernel
        logits = ops.rms_norm_matvec(x, self.norm_w, self.norm_eps, self.lm_head_w, at_start="lm_head" in start)
        _advance(cache, r)
        return logits


# The launch each of the step's launches follows (the first layer's qkv follows the
# embedding, the others the previous layer's down), and the launches that load early inputs.
PREDECESSORS = {"qkv": ("embedding", "down"), "attention": ("qkv",), "o": ("attention",),
                "gate_up": ("o",), "down": ("gate_up",), "lm_head": ("down",)}
EARLY_INPUT_LAUNCHES = ("qkv", "attention", "o")


@dataclass(frozen=True)
class LaunchPlan:
    """How the step makes its launches (roles as ``settings.STEP_LAUNCHES``): those whose
    programs let the next launch in at their start (``LAUNCH_AT_START``), those that load
    their early inputs before the dependent-launch wait (``EARLY_INPUTS``), and the early
    inputs turned off by the rule, with why."""

    at_start: frozenset
    early: frozenset
    refused: tuple = ()  # (launch, why) pairs

    def __post_init__(self):
        unsafe = [(r, q) for r in self.early for q in PREDECESSORS.get(r, ()) if q in self.at_start]
        if unsafe:
            r, q = unsafe[0]
            raise ValueError(f"tileflow: decode step: {r} may not load early inputs after {q}, which lets it "
                             "in at its programs' start (launch_plan turns them off)")

    def notes(self) -> list:
        return [f"decode step: {role} loads no early inputs: {why}" for role, why in self.refused]


def launch_plan(at_start: frozenset, early_inputs: bool) -> LaunchPlan:
    """The step's launch plan for the launches that let the next one in at their start
    (``at_start``) and the option ``early_inputs``. The rule: a launch whose predecessor lets
    it in at the predecessor's start may start while the launch before that predecessor
    still writes (the predecessor has not passed its own wait), so before its own wait it
    may load only step constants (weights): its early inputs, written by earlier launches
    of the step, are turned off. (A predecessor that lets it in after its wait has seen
    everything before it complete, which is what ``early`` vouches for otherwise.)"""
    unknown = sorted(set(at_start) - set(settings.STEP_LAUNCHES))
    if unknown:
        raise ValueError(f"tileflow: launch_at_start: unknown launch(es) {', '.join(unknown)} "
                         f"(the step's: {', '.join(settings.STEP_LAUNCHES)})")
    early, refused = set(EARLY_INPUT_LAUNCHES if early_inputs else ()), []
    for role in EARLY_INPUT_LAUNCHES:
        first = [q for q in PREDECESSORS[role] if q in at_start]
        if role in early and first:
            early.discard(role)
            refused.append((role, f"it follows {' / '.join(first)}, which lets it in at its programs' start "
                                  "(launch_at_start), before the launch ahead of that one is complete"))
    return LaunchPlan(frozenset(at_start), frozenset(early), tuple(refused))


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """A Qwen2 / Llama decoder layer's tensors and constants, where they lie (no copies):
    what the decode and prompt programs read, by name."""

    ln1: torch.Tensor  # input_layernorm gamma [D]
    eps1: float  # input_layernorm epsilon
    wq: torch.Tensor  # q_proj [NH * DH, D]
    bq: Optional[torch.Tensor]  # q_proj bias [NH * DH] (Qwen2; None without)
    wk: torch.Tensor  # k_proj [NKV * DH, D]
    wv: torch.Tensor  # v_proj [NKV * DH, D]
    bk: Optional[torch.Tensor]
    bv: Optional[torch.Tensor]
    wo: torch.Tensor  # o_proj [D, NH * DH]
    scale: float  # attention scaling (1/sqrt(DH) unless the config says otherwise)
    ln2: torch.Tensor  # post_attention_layernorm gamma [D]
    eps2: float
    wg: torch.Tensor  # gate_proj [INTER, D]
    wu: torch.Tensor  # up_proj [INTER, D]
    wd: torch.Tensor  # down_proj [D, INTER]


def layer_weights(layer) -> LayerWeights:
    """A decoder layer's :class:`LayerWeights`."""
    a, m = layer.self_attn, layer.mlp
    return LayerWeights(
        ln1=layer.input_layernorm.weight, eps1=layer.input_layernorm.variance_epsilon,
        wq=a.q_proj.weight, bq=a.q_proj.bias, wk=a.k_proj.weight, wv=a.v_proj.weight, bk=a.k_proj.bias,
        bv=a.v_proj.bias, wo=a.o_proj.weight, scale=a.scaling,
        ln2=layer.post_attention_layernorm.weight, eps2=layer.post_attention_layernorm.variance_epsilon,
        wg=m.gate_proj.weight, wu=m.up_proj.weight, wd=m.down_proj.weight)


def _key_mask(mask: torch.Tensor, cache) -> torch.Tensor:
    """The [B, S] int32 key mask of a [B, T] attention mask: rows past T hidden."""
    key_mask = torch.zeros(mask.shape[0], cache.layers[0].keys.shape[2], dtype=torch.int32, device=mask.device)
    key_mask[:, :mask.shape[1]] = mask
    return key_mask


def cache_row(cache) -> Optional[torch.Tensor]:
    """The row the next token goes to, as the device tensor [1] transformers counts
    with (``StaticLayer.cumulative_length``), or None where the count is not a tensor."""
    counter = getattr(cache.layers[0], "cumulative_length", None)
    return counter.reshape(1) if isinstance(counter, torch.Tensor) and counter.numel() == 1 else None


def step_rows(cache, p: torch.Tensor, b: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cache rows a step of ``b`` sequences x ``r`` tokens at positions ``p`` [b * r]
    writes, attention's lengths): the cache's own count on the device (every sequence the
    same row, the R tokens consecutive rows), or ``p`` where the count is not a tensor
    (decode_request checked it equal); lengths one a sequence, or with R rows the count
    after all of them."""
    row = cache_row(cache)
    if row is None:
        row = p
    elif r > 1:
        row = row + torch.arange(r, device=row.device)
    elif b > 1:
        row = row.expand(b).contiguous()
    return row, (row[-1:] + 1 if r > 1 else row + 1)


def _advance(cache, n: int) -> None:
    """What ``StaticLayer.update`` does besides writing: count the tokens (transformers
    keeps the count as a device tensor, so this is capturable). One ``_foreach_add_``:
    a launch per layer's counter cost ~1.5 us each on an H200 (28 a token for the 1.5B
    model, 45 us of a 1.25 ms step, seen in the step breakdown)."""
    counters = [c for c in (getattr(layer, "cumulative_length", None) for layer in cache.layers)
                if isinstance(c, torch.Tensor)]
    if counters:
        torch._foreach_add_(counters, n)


def static_cache_problem(cache, rows: int = 1) -> str:
    """Why ``cache`` cannot take the decode program for ``rows`` sequences, or ""."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return f"cache {type(cache).__name__} has no layers"
    for layer in layers:
        if type(layer).__name__ != "StaticLayer":
            return f"cache layer {type(layer).__name__} (the program writes StaticLayer tensors)"
        if not getattr(layer, "is_initialized", False):
            return "cache not initialised yet"
        if layer.keys.shape[0] != rows:
            return f"cache batch {layer.keys.shape[0]} for {rows} sequences"
    return ""


# the most tokens of one sequence a verify step takes (speculative decoding: the drafts + 1)
MAX_VERIFY_ROWS = 16


class GraphedDecode:
    """Runs a :class:`DecodeProgram`: captured in a CUDA graph per cache on a GPU,
    directly on CPU."""

    def __init__(self, program: DecodeProgram, max_graphs: int = 2 + MAX_VERIFY_ROWS):
        self.program = program
        self.graphs = GraphTable(max_graphs)
        self.addresses = AddressMemo()

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache, mask: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """Logits of one step; ``mask`` [B, T] is the model's 2-D attention mask (T up to
        the cache capacity; rows past T are hidden, as transformers pads it). One graph
        per cache (its addresses hold its batch), mask presence and tokens a sequence."""
        if tok.device.type != "cuda":
            return self.program.run(tok, pos, cache, None if mask is None else _key_mask(mask, cache))
        key = (self.addresses(cache), mask is not None, tok.shape[1])
        entry = self.graphs.get(key, cache) or self.graphs.put(
            key, cache, lambda: self._capture(tok, pos, cache, None if mask is None else _key_mask(mask, cache)))
        _, graph, tok_buf, pos_buf, mask_buf, logits = entry
        # one multi-tensor launch for both (two copies cost a launch and a gap each, ~2 us)
        torch._foreach_copy_([tok_buf, pos_buf], [tok.reshape(tok_buf.shape), pos.reshape(pos_buf.shape)])
        if mask is not None:
            mask_buf[:, mask.shape[1]:].zero_()
            mask_buf[:, :mask.shape[1]].copy_(mask)
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's buffer

    def _capture(self, tok, pos, cache, key_mask) -> tuple:
        tok_buf, pos_buf = tok.clone(), pos.reshape(tok.shape).clone()
        mask_buf = None if key_mask is None else key_mask.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles every kernel; writes the next row (rewritten identically below)
            self.program.run(tok_buf, pos_buf, cache, mask_buf)
            _advance(cache, -tok.shape[1])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.program.run(tok_buf, pos_buf, cache, mask_buf)
        return graph, tok_buf, pos_buf, mask_buf, logits


def mask_row(mask, capacity: int, rows: int = 1) -> tuple[Optional[torch.Tensor], str]:
    """The attention mask of a one-token step as one [B, T] row over the keys per sequence
    (T up to ``capacity``), or None for no mask, and "" or why the program cannot honour it.

    transformers passes a 2-D padding mask [B, T] (earlier releases), or (5.24 generate)
    a dict of precomputed masks per attention type whose ``full_attention`` entry is a
    bool [B, 1, 1, S]: for one query that row is exactly a per-key mask."""
    if isinstance(mask, dict):
        if set(mask) - {"full_attention"}:
            return None, f"attention masks {sorted(mask)} (the program has full attention only)"
        mask = mask.get("full_attention")
    if mask is None:
        return None, ""
    if not isinstance(mask, torch.Tensor):
        return None, f"attention mask of type {type(mask).__name__}"
    if mask.dim() == 4 and mask.shape[:3] == (rows, 1, 1) and mask.dtype == torch.bool:
        mask = mask.reshape(rows, mask.shape[3])
    elif mask.dim() == 4:
        return None, f"attention mask {tuple(mask.shape)} {mask.dtype} (the program takes one bool row of keys)"
    if mask.dim() != 2 or mask.shape[0] != rows or mask.shape[1] > capacity:
        return None, f"attention mask of shape {tuple(mask.shape)} (the program takes [{rows}, T <= {capacity}])"
    return mask, ""


def unsupported_request(kwargs: dict) -> str:
    """What a forward call asks for that the programs do not give (extra outputs, inputs
    embedded by the caller, a loss, a tuple), or ""."""
    for flag in ("output_attentions", "output_hidden_states", "inputs_embeds", "labels"):
        if kwargs.get(flag):
            return f"{flag} requested"
    return "return_dict=False" if kwargs.get("return_dict") is False else ""


def step_inputs(kwargs: dict, cache, sequences: int, what: str, tokens: int = 1
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], str]:
    """(position_ids, mask, "") of a call feeding ``tokens`` tokens to each of ``sequences``
    sequences of a static ``cache``, or (None, None, why the programs cannot take it): the
    checks the one-token and the verify steps share (``what`` names the call in a reason)."""
    why = unsupported_request(kwargs)
    if not why and cache is None:
        why = "no cache"
    why = why or static_cache_problem(cache, sequences)
    if why:
        return None, None, why
    pos = kwargs.get("position_ids")
    if pos is not None and (not isinstance(pos, torch.Tensor) or pos.numel() != sequences * tokens):
        return None, None, f"position_ids of shape {tuple(getattr(pos, 'shape', ()))} for {what}"
    mask, why = mask_row(kwargs.get("attention_mask"), cache.layers[0].keys.shape[2], sequences)
    return (None, None, why) if why else (pos, mask, "")


def decode_request(args, kwargs, any_position: bool = False
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], object, Optional[torch.Tensor], str]:
    """(tok, pos, cache, mask, "") when a CausalLM forward call is a plain one-token
    decode step of B sequences on a static cache of batch B, else (..., why not).
    ``mask`` is the 2-D attention mask to honour, or None.

    With ``any_position`` (a program that writes at the cache's count and takes a key
    mask, and a cache that counts on the device) nothing is read back to the host: the
    step does not wait for the one before it (unless a ``cache_position`` is passed, as
    generate does before transformers 5.24: one read checks it against the count).
    Otherwise one host sync checks that the position is the cache's length and that no
    position is masked."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = cache_argument(kwargs)
    none = (None, None, None, None)
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return (*none, "not a one-token step")
    rows = input_ids.shape[0]
    pos, mask, why = step_inputs(kwargs, cache, rows, f"{rows} sequences")
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
        if pos is None:
            pos = (given if isinstance(given, torch.Tensor) else row).reshape(1, 1).expand(rows, 1)
        return input_ids, pos.reshape(rows, 1), cache, mask, ""
    filled = row if row is not None else cache.get_seq_length()
    if pos is not None and not bool((pos.reshape(-1) == int(filled)).all()):
        return (*none, "padded sequence: the position differs from the cache length")
    if isinstance(given, torch.Tensor) and int(given.reshape(-1)[0]) != int(filled):
        return (*none, "cache_position differs from the cache length")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        return (*none, "attention mask hides positions (padding)")
    if pos is None:
        pos = torch.as_tensor(filled, device=input_ids.device).reshape(1, 1).to(torch.int64).expand(rows, 1)
    return input_ids, pos.reshape(rows, 1), cache, None, ""


def verify_request(args, kwargs) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], object,
                                          Optional[torch.Tensor], int, str]:
    """(tok [1, R], pos [1, R], cache, mask, logits_to_keep, "") when a CausalLM forward
    call feeds R tokens (2 to ``MAX_VERIFY_ROWS``) of one sequence into a static cache
    that counts on the device: the verify step of assisted generation or prompt lookup,
    else (..., why not). The caller knows the cache already holds tokens (a prompt into
    an empty cache is the prompt program's). Nothing is read back unless a
    ``cache_position`` is passed (releases before 5.24): one read checks it against the count."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    none = (None, None, None, None, 0)
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
            or not 2 <= input_ids.shape[1] <= MAX_VERIFY_ROWS:
        return (*none, f"not 2 to {MAX_VERIFY_ROWS} tokens of one sequence")
    r = input_ids.shape[1]
    cache = cache_argument(kwargs)
    pos, mask, why = step_inputs(kwargs, cache, 1, f"{r} tokens", tokens=r)
    if why:
        return (*none, why)
    row = cache_row(cache)
    if row is None:
        return (*none, "a cache without a device-side count")
    keep = kwargs.get("logits_to_keep", 0)
    if not isinstance(keep, int):
        return (*none, "logits_to_keep given as indices")
    given = kwargs.get("cache_position")
    if isinstance(given, torch.Tensor):
        if given.numel() != r or int(given.reshape(-1)[0]) != int(row[0]):
            return (*none, "cache_position differs from the cache's next rows")
        pos = given if pos is None else pos
    if pos is None:
        pos = row + torch.arange(r, device=row.device)
    return input_ids, pos.reshape(1, r), cache, mask, keep, ""
