"""One whole decode step of a DeepSeek-V2 / V3 model as suite kernels.

The same role as ``decode_step.DecodeProgram`` (``patch`` runs it instead of the model's
forward for one new token on a transformers ``StaticCache``, captured in a CUDA graph on
a GPU), for the DeepSeek architecture: multi-head latent attention (MLA) over the latent
cache and DeepSeekMoE. Per layer::

    q: rms_norm_matvec (input_layernorm, q_proj), or rms_norm_matvec (input_layernorm, q_a_proj)
       -> rms_norm_matvec (q_a_layernorm, q_b_proj)
    -> mla_latent_cache (input_layernorm, kv_a_proj_with_mqa, kv_a_layernorm, rope of k_pe: the new
       latent row written into the model's own cache tensors)
    -> mla_attention (the query's rope, then absorbed attention over the filled latent rows)
    -> matvec_residual (o_proj)
    dense layers (the first ``first_k_dense_replace``): rms_norm_gate_up_silu -> matvec_residual
    MoE layers: rms_norm -> moe_router -> moe_experts (the chosen experts only, the shared
                experts as more of weight 1, and the residual)

then the final norm and the lm_head (``rms_norm_matvec``).

The cache: transformers (5.17 and 5.25 alike) caches the latent, not per-head K/V: each
layer's ``keys`` is the normed compressed kv [B, 1, S, kv_lora_rank] and ``values`` the
rotated rope key [B, 1, S, qk_rope_head_dim]; the program writes those tensors (views
``[:, 0]``), so the model's own forward and ``generate`` see the same cache. A cache of
another layout is declined per call (:meth:`DeepSeekDecodeProgram.declines`).

One token of each of B sequences a step (R = 1; a left-padded batch: every sequence's row
written at the cache's own count, on the device, rotated at its own position, the padding a
key mask): a speculative verify step runs the model's own forward, the reason in the patch
report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tileflow.integrations.transformers.decode_step import _advance, step_rows
from tileflow.runtime import ops

DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# mla_latent_cache's ROPE_LAYOUT for each way the model pairs its rope dimensions
HALVES, INTERLEAVED, INTERLEAVED_OUT = 0, 1, 2
# moe_router scores all experts in one tile of the select stage
MAX_EXPERTS = 256


def deepseek_problems(model) -> list[str]:
    """Why ``model`` (a DeepSeek-V2 / V3 CausalLM) cannot take :class:`DeepSeekDecodeProgram`,
    or []: what the kernels do not compute (biases, a routing method, rope frequencies that
    change with the length) or a module layout other than transformers'."""
    cfg = model.config
    base = getattr(model, "model", None)
    why = []
    if getattr(cfg, "attention_bias", False):
        why.append("attention_bias=True (mla_latent_cache and o_proj's matvec_residual have no bias)")
    rotary = getattr(base, "rotary_emb", None)
    rope_type = str(getattr(rotary, "rope_type", ""))
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        why.append("no rotary_emb.inv_freq table")
    elif "dynamic" in rope_type or rope_type == "longrope":
        why.append(f"rope_type {rope_type!r} (its frequencies change with the length; the program reads one table)")
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear) or model.lm_head.bias is not None:
        why.append("lm_head is not a Linear without bias")
    for i, layer in enumerate(getattr(base, "layers", None) or []):
        why += [f"model.layers.{i}: {w}" for w in _layer_problems(layer, cfg)]
    return why


def _layer_problems(layer, cfg) -> list[str]:
    attn, mlp = layer.self_attn, layer.mlp
    why = []
    for name in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        if getattr(attn, name, None) is None:
            return [f"self_attn has no {name} (not transformers' DeepSeek attention)"]
    if attn.kv_b_proj.bias is not None:
        why.append("kv_b_proj has a bias")
    if getattr(mlp, "experts", None) is None:
        if any(getattr(getattr(mlp, n, None), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
            why.append("MLP projections have biases")
        return why
    gate = mlp.gate
    e = gate.weight.shape[0]
    if e > MAX_EXPERTS:
        why.append(f"{e} routed experts (moe_router scores at most {MAX_EXPERTS})")
    groups = getattr(gate, "num_group", None) or 1
    if e % groups:
        why.append(f"{e} experts in {groups} groups")
    if cfg.model_type == "deepseek_v2" and getattr(gate, "topk_method", None) not in ("greedy", "group_limited_greedy"):
        why.append(f"topk_method {getattr(gate, 'topk_method', None)!r} (moe_router has greedy, "
                   "group_limited_greedy and V3's noaux_tc)")
    if cfg.model_type == "deepseek_v3" and e // groups < 2:
        why.append("groups of one expert (V3 scores a group by its best two)")
    if mlp.shared_experts is None:
        why.append("no shared experts")
    elif mlp.shared_experts.gate_proj.weight.shape[0] % (mlp.experts.gate_up_proj.shape[1] // 2):
        # moe_experts runs the shared MLP as slices of the routed experts' width
        why.append(f"shared experts of {mlp.shared_experts.gate_proj.weight.shape[0]} rows, not a multiple of the "
                   f"experts' {mlp.experts.gate_up_proj.shape[1] // 2}")
    return why


@dataclass(frozen=True, slots=True)
class DeepSeekLayer:
    """A DeepSeek decoder layer's tensors and constants, where they lie (views, no copies,
    except V3's correction bias where it is not fp32: see :func:`deepseek_layer`)."""

    ln1: torch.Tensor  # input_layernorm gamma [D]
    eps1: float
    wq: Optional[torch.Tensor]  # q_proj [NH * (DN + DR), D], None with q_lora_rank
    wqa: Optional[torch.Tensor]  # q_a_proj [QR, D]
    q_ln: Optional[torch.Tensor]  # q_a_layernorm gamma [QR]
    q_eps: float
    wqb: Optional[torch.Tensor]  # q_b_proj [NH * (DN + DR), QR]
    w_kva: torch.Tensor  # kv_a_proj_with_mqa [R + DR, D]
    kv_ln: torch.Tensor  # kv_a_layernorm gamma [R]
    kv_eps: float
    w_uk: torch.Tensor  # kv_b_proj.weight viewed [NH, DN + DV, R][:, :DN]
    w_uv: torch.Tensor  # ... [:, DN:]
    wo: torch.Tensor  # o_proj [D, NH * DV]
    scale: float  # the attention's own scaling (qk_head_dim ** -0.5 times YaRN's mscale^2)
    ln2: torch.Tensor  # post_attention_layernorm gamma [D]
    eps2: float
    wg: torch.Tensor  # dense MLP gate_proj [I, D], or the shared experts' [n_shared * MI, D]
    wu: torch.Tensor
    wd: torch.Tensor
    router: Optional[torch.Tensor]  # gate.weight [E, D] (fp32 or the model's dtype); None in a dense layer
    bias: Optional[torch.Tensor]  # e_score_correction_bias [E] fp32 (V3), else None
    top_k: int
    n_group: int
    topk_group: int
    norm_topk: bool
    routed_scale: float
    gate_up: Optional[torch.Tensor]  # experts.gate_up_proj [E, 2 * MI, D] viewed [E, 2, MI, D]
    down: Optional[torch.Tensor]  # experts.down_proj [E, D, MI]


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # the correction bias as the router upcasts it (a one-time copy of E values where not fp32)
    return t if t.dtype == torch.float32 else t.detach().float()


def deepseek_layer(layer, cfg) -> DeepSeekLayer:
    """A decoder layer's :class:`DeepSeekLayer`."""
    a, mlp = layer.self_attn, layer.mlp
    nh, dn = a.num_heads, a.qk_nope_head_dim
    kvb = a.kv_b_proj.weight.view(nh, dn + a.v_head_dim, a.kv_lora_rank)
    lora = a.q_lora_rank is not None
    moe = getattr(mlp, "experts", None) is not None
    dense = mlp.shared_experts if moe else mlp
    q = dict(wq=None, wqa=a.q_a_proj.weight, q_ln=a.q_a_layernorm.weight, q_eps=a.q_a_layernorm.variance_epsilon,
             wqb=a.q_b_proj.weight) if lora else dict(wq=a.q_proj.weight, wqa=None, q_ln=None, q_eps=0.0, wqb=None)
    route = dict(router=None, bias=None, top_k=0, n_group=1, topk_group=1, norm_topk=False, routed_scale=1.0,
                 gate_up=None, down=None)
    if moe:
        g, ex = mlp.gate, mlp.experts
        v3 = cfg.model_type == "deepseek_v3"
        # V2's greedy is one group of all experts; V2 never normalises (its router ignores norm_topk_prob)
        grouped = v3 or g.topk_method == "group_limited_greedy"
        e, two_i, d = ex.gate_up_proj.shape
        # gate.weight where it lies: fp32 (transformers 5.25) or the model's dtype (5.17), upcast by moe_router
        route = dict(router=g.weight, bias=_fp32(g.e_score_correction_bias) if v3 else None, top_k=g.top_k,
                     n_group=g.num_group if grouped else 1, topk_group=g.topk_group if grouped else 1,
                     norm_topk=bool(v3 and g.norm_topk_prob), routed_scale=float(g.routed_scaling_factor),
                     gate_up=ex.gate_up_proj.view(e, 2, two_i // 2, d), down=ex.down_proj)
    return DeepSeekLayer(
        ln1=layer.input_layernorm.weight, eps1=layer.input_layernorm.variance_epsilon, **q,
        w_kva=a.kv_a_proj_with_mqa.weight, kv_ln=a.kv_a_layernorm.weight, kv_eps=a.kv_a_layernorm.variance_epsilon,
        w_uk=kvb[:, :dn], w_uv=kvb[:, dn:], wo=a.o_proj.weight, scale=float(a.scaling),
        ln2=layer.post_attention_layernorm.weight, eps2=layer.post_attention_layernorm.variance_epsilon,
        wg=dense.gate_proj.weight, wu=dense.up_proj.weight, wd=dense.down_proj.weight, **route)


def rope_layout(cfg) -> int:
    """mla_latent_cache's ROPE_LAYOUT of the model: V2 rotates interleaved pairs as complex
    numbers (pairs in and out); V3 rotates interleaved pairs into halves
    (``rope_interleave``, its default) or rotate-half pairs."""
    if cfg.model_type == "deepseek_v2":
        return INTERLEAVED_OUT
    return INTERLEAVED if getattr(cfg, "rope_interleave", True) else HALVES


class DeepSeekDecodeProgram:
    """The decode step of a DeepSeek-V2 / V3 ``model`` reading its weights where they lie
    (the interface of ``decode_step.DecodeProgram``). ``options``: unused (the DeepSeek
    step has no early-input launches yet), taken for the same constructor."""

    fallback_runs = "the model's forward"  # what a step the program does not take runs (for the report)

    def __init__(self, model, options=None):
        cfg = model.config
        base = model.model
        a = base.layers[0].self_attn
        self.nh, self.dn, self.dr, self.dv = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.r = a.kv_lora_rank
        self.layout = rope_layout(cfg)
        self.inv_freq = base.rotary_emb.inv_freq  # fp32 [DR / 2]: default and YaRN frequencies alike
        self.rope_scale = float(base.rotary_emb.attention_scaling)
        self.embed = base.embed_tokens.weight
        self.layers = [deepseek_layer(layer, cfg) for layer in base.layers]
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head_w = model.lm_head.weight

    @property
    def takes_any_position(self) -> bool:
        """mla_latent_cache rotates at the given position and writes at the cache's own
        count, mla_attention hides what a key mask hides, as the model does: a padded
        sequence needs no host-side check."""
        return True

    @property
    def matches(self) -> dict:
        """The suite kernels a step launches (pattern name -> count), for the report."""
        n, moe = len(self.layers), sum(w.router is not None for w in self.layers)
        lora = sum(w.wq is None for w in self.layers)  # q_a_proj, then q_a_layernorm + q_b_proj
        counts = {"embedding": 1, "rms_norm": moe, "rms_norm_matvec": 1 + n + lora, "mla_latent_cache": n,
                  "mla_attention": n, "matvec_residual": 2 * n - moe, "rms_norm_gate_up_silu": n - moe,
                  "moe_router": moe, "moe_experts": moe}
        return {k: v for k, v in counts.items() if v}

    def declines(self, input_ids: torch.Tensor, cache) -> str:
        """Why a forward call of ``input_ids`` [B, T] on ``cache`` does not take the program
        (the model's forward runs it), or "": the program decodes one token a sequence into
        the latent cache. A prompt (T > 1 into an empty cache) is the model's own and
        not declined; tokens continuing a filled cache are (one device read, T > 1 only)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return ""
        b, t = input_ids.shape
        if t > 1:
            filled = cache is not None and getattr(cache, "layers", None) and \
                getattr(cache.layers[0], "is_initialized", False) and int(cache.get_seq_length()) > 0
            return f"{t} tokens continuing a sequence (the DeepSeek program takes one token a step)" if filled else ""
        layers = getattr(cache, "layers", None)
        layer = layers[0] if layers else None  # every layer of a model's cache has one layout
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not getattr(layer, "is_initialized", False):
            return ""  # decode_request says why (no cache, not static, not initialised)
        if keys.dim() != 4 or keys.shape[1] != 1 or keys.shape[3] != self.r or values.shape[3] != self.dr \
                or values.shape[:3] != keys.shape[:3]:
            return (f"cache layer of keys {tuple(keys.shape)} / values {tuple(values.shape)}, not the latent "
                    f"[B, 1, S, {self.r}] / [B, 1, S, {self.dr}] the program writes")
        return ""

    def run(self, tok: torch.Tensor, pos: torch.Tensor, cache, key_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
        """Logits [B, V] of the tokens ``tok`` [B, 1] at positions ``pos`` [B, 1]; each latent
        row goes to the cache's next row of every layer (the same row for every sequence, as
        transformers writes a left-padded batch), ``key_mask`` [B, S] (int32, 0 = hidden)
        as the model's padding mask. Updates ``cache``."""
        b, r = tok.shape
        if r != 1:
            # patch declines these calls before the program runs (declines)
            raise ValueError(f"tileflow: the DeepSeek program takes one token a sequence, got {b} x {r}")
        p = pos.reshape(b)
        row, lengths = step_rows(cache, p, b, 1)
        # the query's rope inside mla_attention, in fp32 as the key's in mla_latent_cache (V3's
        # model rotates in bf16: within the bf16 bound test's margin)
        rope = ops.MlaRope(p, self.inv_freq, self.rope_scale, self.layout)
        x = ops.embedding_lookup(tok.reshape(b), self.embed)
        nh, dn, dv = self.nh, self.dn, self.dv
        for w, layer in zip(self.layers, cache.layers):
            kv_cache, pe_cache = layer.keys[:, 0], layer.values[:, 0]  # [B, S, R], [B, S, DR]: views
            # input_layernorm inside the query projection and the latent write (no launch of its own)
            if w.wq is not None:
                q = ops.rms_norm_matvec(x, w.ln1, w.eps1, w.wq)
            else:
                q = ops.rms_norm_matvec(ops.rms_norm_matvec(x, w.ln1, w.eps1, w.wqa), w.q_ln, w.q_eps, w.wqb)
            q = q.view(b, nh, dn + self.dr)
            ops.mla_latent_cache(x, w.w_kva, w.kv_ln, w.kv_eps, p, self.inv_freq, self.rope_scale, self.layout,
                                 kv_cache, pe_cache, cache_pos=None if row is p else row, x_norm=(w.ln1, w.eps1))
            o = ops.mla_attention(q[..., :dn], q[..., dn:], kv_cache, pe_cache, lengths, w.w_uk, w.w_uv, w.scale,
                                  key_mask, rope)
            x = ops.matvec_residual(o.view(b, nh * dv), w.wo, x)
            if w.router is None:  # dense MLP
                x = ops.matvec_residual(ops.rms_norm_gate_up_silu(x, w.ln2, w.eps2, w.wg, w.wu), w.wd, x)
                continue
            h = ops.rms_norm(x, w.ln2, w.eps2)
            idx, wt = ops.moe_router(h, w.router, w.top_k, w.routed_scale, w.n_group, w.topk_group, w.norm_topk,
                                     w.bias)
            # the chosen experts, the shared experts (as more experts of weight 1) and the residual
            x = ops.moe_experts(h, idx, wt, w.gate_up, w.down, residual=x, shared=(w.wg, w.wu, w.wd))
        logits = ops.rms_norm_matvec(x, self.norm_w, self.norm_eps, self.lm_head_w)
        _advance(cache, 1)
        return logits
