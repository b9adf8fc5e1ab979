"""The suite kernels as JAX functions (Hugging Face layouts), each one primitive call.

Each function names the kernel's arrays and scalars; the kernel's calling convention,
derived from its tile definition (``tileflow.runtime.binding``, as on the torch side),
puts the operands in order and derives the sizes from their shapes. Leading dimensions
of row-wise operands are flattened into the kernel's row count and restored on the way out.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from tileflow.integrations.jax.primitives import bind
from tileflow.runtime import binding
from tileflow.suite.rope import ROPE_KINDS, ROPE_SCALARS

Array = jax.Array


def _rows(x: Array) -> int:
    return math.prod(x.shape[:-1])


def _need_rank(fn: str, name: str, x, ndim: Optional[int] = None, at_least: Optional[int] = None) -> None:
    """A ValueError naming the rank ``fn`` expects of operand ``name`` (a bare IndexError
    or unpacking error otherwise)."""
    got = jnp.ndim(x)
    if ndim is not None and got != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimension{'s' * (ndim != 1)}, got shape {jnp.shape(x)}")
    if at_least is not None and got < at_least:
        raise ValueError(f"{fn}: {name} must have at least {at_least} dimension{'s' * (at_least != 1)}, "
                         f"got shape {jnp.shape(x)}")


def _need_ranks(fn: str, **specs) -> None:
    """``_need_rank`` for each ``name=(x, ndim)``; a negative ndim means "at least -ndim"."""
    for name, (x, nd) in specs.items():
        if x is not None:
            _need_rank(fn, name, x, ndim=nd if nd >= 0 else None, at_least=-nd if nd < 0 else None)


def _call(kernel: str, values: dict, sizes: Optional[dict] = None) -> list:
    """Suite kernel ``kernel`` on the NAMED arrays and scalars ``values`` (None: not
    given) as its primitive: the operands in the kernel's order, every size read off their
    shapes; ``sizes``: the structural flags and sizes no operand has. Returns the outputs
    and in-place views, in the kernel's order."""
    conv = binding.convention(kernel, sizes)
    return bind(kernel, conv.operands(values), conv.sizes(values), conv.scalar_values(values))


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """RMSNorm over the last axis of ``x`` with gamma ``w`` [D]; fp32 sums."""
    _need_ranks("rms_norm", x=(x, -1), w=(w, 1))
    d = x.shape[-1]
    (out,) = _call("rms_norm", {"x": x.reshape(_rows(x), d), "w": w, "eps": eps})
    return out.reshape(x.shape)


def embedding_lookup(ids: Array, table: Array) -> Array:
    """Rows of ``table`` [V, D] for the integer ``ids`` (any shape)."""
    _need_ranks("embedding_lookup", table=(table, 2))
    d = table.shape[1]
    (out,) = _call("embedding_lookup", {"ids": ids.reshape(math.prod(ids.shape)), "table": table})
    return out.reshape(ids.shape + (d,))


def matvec(x: Array, w: Array, b: Optional[Array] = None) -> Array:
    """``x @ w.T (+ b)`` with ``w`` [N, K] (the ``nn.Linear`` layout)."""
    _need_ranks("matvec", x=(x, -1), w=(w, 2), b=(b, 1))
    n, k = w.shape
    (out,) = _call("matvec", {"x": x.reshape(_rows(x), k), "w": w, "b": b}, {"HAS_BIAS": int(b is not None)})
    return out.reshape(x.shape[:-1] + (n,))


def matvec_pair(x: Array, wk: Array, wv: Array, bk: Optional[Array] = None,
            bv: Optional[Array] = None) -> tuple[Array, Array]:
    """``x @ wk.T + bk`` and ``x @ wv.T + bv`` over one read of ``x``."""
    _need_ranks("matvec_pair", x=(x, -1), wk=(wk, 2), wv=(wv, 2), bk=(bk, 1), bv=(bv, 1))
    n, k = wk.shape
    ko, vo = _call("matvec_pair", {"x": x.reshape(_rows(x), k), "wk": wk, "wv": wv, "bk": bk, "bv": bv},
                   {"HAS_BIAS": int(bk is not None)})
    shape = x.shape[:-1] + (n,)
    return ko.reshape(shape), vo.reshape(shape)


def matvec_residual(x: Array, w: Array, r: Array) -> Array:
    """``x @ w.T + r`` (the attention output or MLP down projection and the residual, one pass)."""
    _need_ranks("matvec_residual", x=(x, -1), w=(w, 2), r=(r, -1))
    n, k = w.shape
    m = _rows(x)
    (out,) = _call("matvec_residual", {"x": x.reshape(m, k), "w": w, "r": r.reshape(m, n)})
    return out.reshape(r.shape)


def gate_up_silu(x: Array, wg: Array, wu: Array) -> Array:
    """``silu(x @ wg.T) * (x @ wu.T)``; the two products never reach memory."""
    _need_ranks("gate_up_silu", x=(x, -1), wg=(wg, 2), wu=(wu, 2))
    n, k = wg.shape
    (out,) = _call("gate_up_silu", {"x": x.reshape(_rows(x), k), "wg": wg, "wu": wu})
    return out.reshape(x.shape[:-1] + (n,))


def rms_norm_gate_up_silu(x: Array, ln_w: Array, eps: float, wg: Array, wu: Array) -> Array:
    """``silu(n @ wg.T) * (n @ wu.T)`` with ``n = rms_norm(x, ln_w, eps)``, one launch."""
    _need_ranks("rms_norm_gate_up_silu", x=(x, -1), ln_w=(ln_w, 1), wg=(wg, 2), wu=(wu, 2))
    n, k = wg.shape
    (out,) = _call("rms_norm_gate_up_silu", {"x": x.reshape(_rows(x), k), "ln_w": ln_w, "wg": wg, "wu": wu, "eps": eps})
    return out.reshape(x.shape[:-1] + (n,))


def rms_norm_matvec(x: Array, ln_w: Array, eps: float, w: Array, b: Optional[Array] = None) -> Array:
    """``rms_norm(x, ln_w, eps) @ w.T (+ b)`` in one launch (the final norm and the lm_head);
    the normalized row never reaches memory."""
    _need_ranks("rms_norm_matvec", x=(x, -1), ln_w=(ln_w, 1), w=(w, 2), b=(b, 1))
    n, k = w.shape
    (out,) = _call("rms_norm_matvec", {"x": x.reshape(_rows(x), k), "ln_w": ln_w, "w": w, "b": b, "eps": eps},
                   {"HAS_BIAS": int(b is not None)})
    return out.reshape(x.shape[:-1] + (n,))


def qkv_rope_cache(x: Array, ln_w: Array, eps: float, wq: Array, wk: Array, wv: Array, bq: Optional[Array],
                   bk: Optional[Array], bv: Optional[Array], pos: Array, k_cache: Array, v_cache: Array,
                   theta: Optional[float] = None, scaling: Optional[dict] = None, *, rope: Optional[tuple] = None,
                   cache_pos: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """The attention input of a decode layer in one launch: RMSNorm of ``x`` [M, D], the
    q/k/v projections (+ biases), RoPE at ``pos`` [M], K and V written into row ``pos``
    (or ``cache_pos`` [M], when given) of the caches [M, NKV, S, DH]. Returns
    (q [M, NH, DH], k_cache, v_cache). The rotation is ``theta`` and a transformers-style
    ``scaling`` dict, or ``rope=(ROPE_KIND, scalars)`` as the rewrite fits them."""
    _need_ranks("qkv_rope_cache", x=(x, -1), ln_w=(ln_w, 1), wq=(wq, 2), wk=(wk, 2), wv=(wv, 2), pos=(pos, 1),
                k_cache=(k_cache, 4), v_cache=(v_cache, 4))
    m, dh = k_cache.shape[0], k_cache.shape[3]
    kind, scal = rope if rope is not None else rope_scalars(theta, scaling)
    # q [M, NH, DH] is the primitive's to make: its head count is the one size no operand has
    sizes = {"NH": wq.shape[0] // dh, "HAS_BIAS": int(bq is not None), "ROPE_KIND": kind,
             **({"CACHE_POS": 1} if cache_pos is not None else {})}
    values = {"x": x.reshape(m, x.shape[-1]), "ln_w": ln_w, "wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk,
              "bv": bv, "pos": pos, "cache_pos": cache_pos, "k_cache": k_cache, "v_cache": v_cache, "eps": eps, **scal}
    q, kc, vc = _call("qkv_rope_cache", values, sizes)
    return q, kc, vc


def _elementwise(name: str, a: Array, b: Array) -> Array:
    _need_ranks(name.removesuffix("_fused"), a=(a, -1), b=(b, -1))
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"{name.removesuffix('_fused')}: a and b have shapes {jnp.shape(a)} and {jnp.shape(b)}, "
                         "expected equal shapes")
    n = a.shape[-1]
    m = _rows(a)
    (out,) = _call(name, {"a": a.reshape(m, n), "b": b.reshape(m, n)})
    return out.reshape(a.shape)


def silu_mul(a: Array, b: Array) -> Array:
    """``silu(a) * b``, elementwise."""
    return _elementwise("silu_mul", a, b)


def residual_add(a: Array, b: Array) -> Array:
    """``a + b`` in fp32, rounded once."""
    return _elementwise("residual_add", a, b)


def rope_scalars(theta: float, scaling: Optional[dict] = None) -> tuple[int, dict]:
    """(ROPE_KIND, runtime scalars) for ``theta`` and a transformers-style
    ``rope_scaling`` dict (``rope_type`` default / linear / llama3)."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ROPE_KINDS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3 are)")
    kind = ROPE_KINDS[rope_type]
    vals = {"theta": float(theta), "factor": scaling.get("factor"),
            "low_freq_factor": scaling.get("low_freq_factor"), "high_freq_factor": scaling.get("high_freq_factor"),
            "original_max_position": scaling.get("original_max_position_embeddings")}
    return kind, {n: float(vals[n]) for n in ROPE_SCALARS[kind]}


def rope_q(x: Array, pos: Array, theta: float, scaling: Optional[dict] = None) -> Array:
    """Rotary embedding (rotate-half) of ``x`` [M, H, DH] at integer positions ``pos`` [M]."""
    _need_ranks("rope_q", x=(x, 3), pos=(pos, 1))
    kind, scal = rope_scalars(theta, scaling)
    (out,) = _call("rope_q", {"x": x, "pos": pos, **scal}, {"ROPE_KIND": kind})
    return out


def rope_k(k: Array, v: Array, pos: Array, k_cache: Array, v_cache: Array, theta: float,
                      scaling: Optional[dict] = None) -> tuple[Array, Array]:
    """Rotate ``k`` [M, NKV, DH] at ``pos`` [M] and write it, and ``v``, into row ``pos``
    of the static caches [M, NKV, S, DH]; returns the updated caches (donate them to
    the enclosing ``jit`` and XLA updates them in place)."""
    _need_ranks("rope_k", k=(k, 3), v=(v, 3), pos=(pos, 1), k_cache=(k_cache, 4), v_cache=(v_cache, 4))
    kind, scal = rope_scalars(theta, scaling)
    kc, vc = _call("rope_k", {"x": k, "pos": pos, "v": v, "k_cache": k_cache, "v_cache": v_cache, **scal},
                   {"ROPE_KIND": kind})
    return kc, vc


def gqa_attention(q: Array, k_cache: Array, v_cache: Array, lengths: Array, scale: float) -> Array:
    """GQA decode attention of ``q`` [B, NH, DH] over the first ``lengths[b]``
    positions of the caches [B, NKV, S, DH]."""
    _need_ranks("gqa_attention", q=(q, 3), k_cache=(k_cache, 4), v_cache=(v_cache, 4), lengths=(lengths, 1))
    (out,) = _call("gqa_attention", {"q": q, "k_cache": k_cache, "v_cache": v_cache, "lengths": lengths,
                                            "scale": scale})
    return out


def argmax_greedy(logits: Array) -> Array:
    """Greedy tokens of ``logits`` [..., V] (ties to the lowest index)."""
    _need_ranks("argmax_greedy", logits=(logits, -1))
    v = logits.shape[-1]
    (out,) = _call("argmax_greedy", {"logits": logits.reshape(_rows(logits), v)})
    return out.reshape(logits.shape[:-1])


# --- DeepSeek-V2 / V3: multi-head latent attention over the latent cache, routed experts ---


def mla_latent_cache(x: Array, w_kva: Array, ln_w: Array, eps: float, pos: Array, inv_freq: Array,
                     rope_scale: float, rope_layout: int, kv_cache: Array, pe_cache: Array) -> tuple[Array, Array]:
    """The latent cache rows of the normed inputs ``x`` [M, D] written at row ``pos[m]``
    (also the rope position): ``kv_cache`` [M, S, R] gets ``kv_a_layernorm`` (``ln_w``,
    ``eps``) of the compressed part of ``x @ w_kva.T``, ``pe_cache`` [M, S, DR] its rope part
    rotated with ``inv_freq`` [DR/2] (fp32), cos and sin times ``rope_scale``, in pair layout
    ``rope_layout`` (0 rotate-half, 1 interleaved in / halves out, 2 interleaved in and out).
    Returns the updated (kv_cache, pe_cache)."""
    _need_ranks("mla_latent_cache", x=(x, -1), w_kva=(w_kva, 2), ln_w=(ln_w, 1), pos=(pos, 1),
                inv_freq=(inv_freq, 1), kv_cache=(kv_cache, 3), pe_cache=(pe_cache, 3))
    layout = int(rope_layout)
    # the layout is both the code's specialisation and the reference's argument: one value binds both
    values = {"x": x.reshape(kv_cache.shape[0], x.shape[-1]), "w_kva": w_kva, "ln_w": ln_w, "pos": pos,
              "inv_freq": inv_freq, "kv_cache": kv_cache, "pe_cache": pe_cache, "eps": eps,
              "rope_scale": rope_scale, "rope_layout": layout}
    kv, pe = _call("mla_latent_cache", values, {"ROPE_LAYOUT": layout})
    return kv, pe


def mla_attention(q_nope: Array, q_pe: Array, kv_cache: Array, pe_cache: Array, lengths: Array, w_uk: Array,
                  w_uv: Array, scale: float, key_mask: Optional[Array] = None) -> Array:
    """MLA decode attention of one new token a sequence, absorbed: ``q_nope`` [B, NH, DN] and
    the rotated ``q_pe`` [B, NH, DR] over the first ``lengths[b]`` rows of the latent caches
    ``kv_cache`` [B, S, R] / ``pe_cache`` [B, S, DR]; ``w_uk`` [NH, DN, R] and ``w_uv``
    [NH, DV, R] are ``kv_b_proj.weight`` viewed [NH, DN + DV, R] and split; with ``key_mask``
    [B, S] only where it is nonzero. Returns [B, NH, DV]."""
    _need_ranks("mla_attention", q_nope=(q_nope, 3), q_pe=(q_pe, 3), kv_cache=(kv_cache, 3),
                pe_cache=(pe_cache, 3), lengths=(lengths, 1), w_uk=(w_uk, 3), w_uv=(w_uv, 3), key_mask=(key_mask, 2))
    values = {"q_nope": q_nope, "q_pe": q_pe, "kv_cache": kv_cache, "pe_cache": pe_cache, "lengths": lengths,
              "key_mask": key_mask, "w_uk": w_uk, "w_uv": w_uv, "scale": scale}
    (out,) = _call("mla_attention", values, {"HAS_MASK": int(key_mask is not None)})
    return out


def moe_router(x: Array, w: Array, top_k: int, scale: float, n_group: int = 1, topk_group: int = 1,
               norm_topk: bool = False, bias: Optional[Array] = None) -> tuple[Array, Array]:
    """DeepSeekMoE's gate for ``x`` [..., D] with the router weight ``w`` [E, D] (fp32):
    (topk_idx [..., top_k], best first, of the index dtype; topk_weight [..., top_k] fp32).
    Without ``bias``: DeepSeek-V2's softmax scores; with ``bias`` (``e_score_correction_bias``
    [E]): DeepSeek-V3's sigmoid scores chosen with the bias. The best ``topk_group`` of
    ``n_group`` groups are kept, the weights normalised where ``norm_topk``, times ``scale``."""
    _need_ranks("moe_router", x=(x, -1), w=(w, 2), bias=(bias, 1))
    d = x.shape[-1]
    values = {"x": x.reshape(_rows(x), d), "w": w, "bias": bias, "scale": scale, "top_k": top_k,
              "n_group": n_group, "topk_group": topk_group, "norm_topk": int(norm_topk)}
    # K sizes the outputs (no operand has it); METHOD picks the scores
    idx, wt = _call("moe_router", values, {"K": int(top_k), "METHOD": int(bias is not None)})
    lead = x.shape[:-1] + (int(top_k),)
    return idx.reshape(lead), wt.reshape(lead)


def moe_experts(x: Array, topk_idx: Array, topk_weight: Array, gate_up: Array, down: Array,
                residual: Optional[Array] = None) -> Array:
    """``sum_j topk_weight[..., j] * down_e(silu(gate_e(x)) * up_e(x))`` over the chosen experts
    ``e = topk_idx[..., j]`` (+ ``residual``), reading only those experts' weights: ``gate_up``
    is ``gate_up_proj`` [E, 2I, D] (or that viewed [E, 2, I, D]), ``down`` is ``down_proj``
    [E, D, I], as transformers keeps them."""
    _need_ranks("moe_experts", x=(x, -1), topk_idx=(topk_idx, -1), topk_weight=(topk_weight, -1),
                gate_up=(gate_up, -3), down=(down, 3), residual=(residual, -1))
    if gate_up.ndim == 3:  # the parameter as it lies: gate rows, then up rows
        e, two_i, d = gate_up.shape
        gate_up = gate_up.reshape(e, 2, two_i // 2, d)
    m, d, k = _rows(x), x.shape[-1], topk_idx.shape[-1]
    values = {"x": x.reshape(m, d), "topk_idx": topk_idx.reshape(m, k), "topk_weight": topk_weight.reshape(m, k),
              "gate_up": gate_up, "down": down, "residual": None if residual is None else residual.reshape(m, d)}
    (out,) = _call("moe_experts", values, {"HAS_RESIDUAL": int(residual is not None)})
    return out.reshape(x.shape)


# --- low-precision weights: group-wise int4 and block-scaled fp8 matvecs ---


def matvec_int4(x: Array, qw: Array, scales: Array, zeros: Array, b: Optional[Array] = None) -> Array:
    """``x @ dequant(W).T (+ b)`` for ``x`` [..., K] and a group-wise int4 weight as
    ``tileflow.suite.quantize.quantize_int4`` packs it: ``qw`` uint8 [N, K/2], ``scales`` /
    ``zeros`` [N, K/128] in ``x``'s dtype (as ``b``), K a multiple of 256."""
    _need_ranks("matvec_int4", x=(x, -1), qw=(qw, 2), scales=(scales, 2), zeros=(zeros, 2), b=(b, 1))
    n, k = qw.shape[0], x.shape[-1]
    (out,) = _call("matvec_int4", {"x": x.reshape(_rows(x), k), "qw": qw, "scales": scales, "zeros": zeros, "b": b},
                   {"HAS_BIAS": int(b is not None)})
    return out.reshape(x.shape[:-1] + (n,))


def matvec_fp8(x: Array, w: Array, ws: Array, b: Optional[Array] = None) -> Array:
    """transformers' fine-grained FP8 linear of ``x`` [..., K]: ``w`` float8_e4m3fn [N, K],
    ``ws`` its fp32 ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] (128 x 128 blocks), ``x``
    quantized per row and 128 columns inside the kernel (+ ``b``, x's dtype)."""
    _need_ranks("matvec_fp8", x=(x, -1), w=(w, 2), ws=(ws, 2), b=(b, 1))
    n, k = w.shape
    (out,) = _call("matvec_fp8", {"x": x.reshape(_rows(x), k), "w": w, "ws": ws, "b": b},
                   {"HAS_BIAS": int(b is not None)})
    return out.reshape(x.shape[:-1] + (n,))


# --- their fused forms (the quantized decode layer's launches): each weight given as its
# arrays, int4 (qw, scales, zeros) or fp8 (w, ws), as the plain functions above take them ---


def _quantized(fn: str, kind: str, weight: tuple, suffix: str) -> dict:
    names = ("qw", "scales", "zeros") if kind == "int4" else ("w", "ws")
    if len(weight) != len(names):
        raise ValueError(f"{fn}: a {kind} weight is ({', '.join(names)}), got {len(weight)} arrays")
    return {f"{n}{suffix}": a for n, a in zip(names, weight)}


def _gate_up(kind: str, x: Array, ln_w: Array, eps: float, gate: tuple, up: tuple) -> Array:
    fn = f"rms_norm_gate_up_silu_{kind}"
    _need_ranks(fn, x=(x, -1), ln_w=(ln_w, 1))
    values = {"x": x.reshape(_rows(x), x.shape[-1]), "ln_w": ln_w, **_quantized(fn, kind, gate, "_g"),
              **_quantized(fn, kind, up, "_u"), "eps": eps}
    (out,) = _call(fn, values)
    return out.reshape(x.shape[:-1] + (gate[0].shape[0],))


def _residual(kind: str, x: Array, weight: tuple, r: Array) -> Array:
    fn = f"matvec_residual_{kind}"
    _need_ranks(fn, x=(x, -1), r=(r, -1))
    n = weight[0].shape[0]
    (out,) = _call(fn, {"x": x.reshape(_rows(x), x.shape[-1]), **_quantized(fn, kind, weight, ""),
                        "r": r.reshape(_rows(r), n)})
    return out.reshape(x.shape[:-1] + (n,))


def _qkv_rope_cache(kind: str, x: Array, ln_w: Array, eps: float, q: tuple, k: tuple, v: tuple,
                    bq: Optional[Array], bk: Optional[Array], bv: Optional[Array], pos: Array, k_cache: Array,
                    v_cache: Array, theta: Optional[float], scaling: Optional[dict], rope: Optional[tuple],
                    cache_pos: Optional[Array]) -> tuple[Array, Array, Array]:
    fn = f"rms_norm_qkv_rope_cache_{kind}"
    _need_ranks(fn, x=(x, 2), ln_w=(ln_w, 1), bq=(bq, 1), bk=(bk, 1), bv=(bv, 1), pos=(pos, 1),
                k_cache=(k_cache, 4), v_cache=(v_cache, 4))
    rope_kind, scal = rope if rope is not None else rope_scalars(theta, scaling)
    # q [M, NH, DH] is the primitive's to make: its head count is the one size no operand has
    sizes = {"NH": q[0].shape[0] // k_cache.shape[3], "HAS_BIAS": int(bq is not None), "ROPE_KIND": rope_kind,
             **({"CACHE_POS": 1} if cache_pos is not None else {}),
             **({"ROWS": x.shape[0] // k_cache.shape[0]} if x.shape[0] != k_cache.shape[0] else {})}
    values = {"x": x, "ln_w": ln_w, **_quantized(fn, kind, q, "_q"), **_quantized(fn, kind, k, "_k"),
              **_quantized(fn, kind, v, "_v"), "b_q": bq, "b_k": bk, "b_v": bv, "pos": pos, "cache_pos": cache_pos,
              "k_cache": k_cache, "v_cache": v_cache, "eps": eps, **scal}
    q_out, kc, vc = _call(fn, values, sizes)
    return q_out, kc, vc


def rms_norm_gate_up_silu_int4(x: Array, ln_w: Array, eps: float, gate: tuple, up: tuple) -> Array:
    """``silu(n @ Wg.T) * (n @ Wu.T)``, ``n = rms_norm(x, ln_w, eps)``, int4 weights, one launch."""
    return _gate_up("int4", x, ln_w, eps, gate, up)


def rms_norm_gate_up_silu_fp8(x: Array, ln_w: Array, eps: float, gate: tuple, up: tuple) -> Array:
    """``silu(n @ Wg.T) * (n @ Wu.T)``, ``n = rms_norm(x, ln_w, eps)``, fp8 weights, one launch."""
    return _gate_up("fp8", x, ln_w, eps, gate, up)


def matvec_residual_int4(x: Array, weight: tuple, r: Array) -> Array:
    """``x @ W.T + r`` for an int4 weight (qw, scales, zeros), one launch."""
    return _residual("int4", x, weight, r)


def matvec_residual_fp8(x: Array, weight: tuple, r: Array) -> Array:
    """``x @ W.T + r`` for an fp8 weight (w, ws), one launch."""
    return _residual("fp8", x, weight, r)


def rms_norm_qkv_rope_cache_int4(x: Array, ln_w: Array, eps: float, q: tuple, k: tuple, v: tuple,
                                 bq: Optional[Array], bk: Optional[Array], bv: Optional[Array], pos: Array,
                                 k_cache: Array, v_cache: Array, theta: Optional[float] = None,
                                 scaling: Optional[dict] = None, *, rope: Optional[tuple] = None,
                                 cache_pos: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """:func:`qkv_rope_cache` over int4 weights (each (qw, scales, zeros)), one launch: (q [M, NH,
    DH], k_cache, v_cache); M rows of x [M, D], R = M / B consecutive tokens of each of the
    caches' B sequences."""
    return _qkv_rope_cache("int4", x, ln_w, eps, q, k, v, bq, bk, bv, pos, k_cache, v_cache, theta, scaling, rope,
                           cache_pos)


def rms_norm_qkv_rope_cache_fp8(x: Array, ln_w: Array, eps: float, q: tuple, k: tuple, v: tuple,
                                bq: Optional[Array], bk: Optional[Array], bv: Optional[Array], pos: Array,
                                k_cache: Array, v_cache: Array, theta: Optional[float] = None,
                                scaling: Optional[dict] = None, *, rope: Optional[tuple] = None,
                                cache_pos: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """:func:`qkv_rope_cache` over fp8 weights (each (w, ws)), one launch: (q [M, NH, DH],
    k_cache, v_cache); M rows of x [M, D], R = M / B consecutive tokens of each of the caches'
    B sequences."""
    return _qkv_rope_cache("fp8", x, ln_w, eps, q, k, v, bq, bk, bv, pos, k_cache, v_cache, theta, scaling, rope,
                           cache_pos)
