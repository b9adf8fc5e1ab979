"""The suite kernels as JAX functions (Hugging Face layouts), each one primitive call.

Mirrors ``tileflow.runtime.ops`` (the torch side): the same operands, sizes and
scalars per kernel. Leading dimensions of row-wise operands are flattened into the
kernel's row count and restored on the way out.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from tileflow.integrations.jax.primitives import bind
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


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """RMSNorm over the last axis of ``x`` with gamma ``w`` [D]; fp32 sums."""
    _need_ranks("rms_norm", x=(x, -1), w=(w, 1))
    d = x.shape[-1]
    (out,) = bind("rms_norm", [x.reshape(_rows(x), d), w], {"M": _rows(x), "D": d}, {"eps": eps})
    return out.reshape(x.shape)


def embedding(ids: Array, table: Array) -> Array:
    """Rows of ``table`` [V, D] for the integer ``ids`` (any shape)."""
    _need_ranks("embedding", table=(table, 2))
    v, d = table.shape
    m = math.prod(ids.shape)
    (out,) = bind("embedding_lookup", [ids.reshape(m), table], {"M": m, "V": v, "D": d})
    return out.reshape(ids.shape + (d,))


def linear(x: Array, w: Array, b: Optional[Array] = None) -> Array:
    """``x @ w.T (+ b)`` with ``w`` [N, K] (the ``nn.Linear`` layout)."""
    _need_ranks("linear", x=(x, -1), w=(w, 2), b=(b, 1))
    n, k = w.shape
    m = _rows(x)
    ops = [x.reshape(m, k), w] + ([b] if b is not None else [])
    (out,) = bind("q_proj_matvec", ops, {"M": m, "N": n, "K": k, "HAS_BIAS": int(b is not None)})
    return out.reshape(x.shape[:-1] + (n,))


def kv_proj(x: Array, wk: Array, wv: Array, bk: Optional[Array] = None,
            bv: Optional[Array] = None) -> tuple[Array, Array]:
    """``x @ wk.T + bk`` and ``x @ wv.T + bv`` over one read of ``x``."""
    _need_ranks("kv_proj", x=(x, -1), wk=(wk, 2), wv=(wv, 2), bk=(bk, 1), bv=(bv, 1))
    n, k = wk.shape
    m = _rows(x)
    ops = [x.reshape(m, k), wk, wv] + ([bk, bv] if bk is not None else [])
    ko, vo = bind("kv_proj_matvec", ops, {"M": m, "N": n, "K": k, "HAS_BIAS": int(bk is not None)})
    shape = x.shape[:-1] + (n,)
    return ko.reshape(shape), vo.reshape(shape)


def _matvec_residual(name: str, x: Array, w: Array, r: Array) -> Array:
    _need_ranks(name, x=(x, -1), w=(w, 2), r=(r, -1))
    n, k = w.shape
    m = _rows(x)
    (out,) = bind(name, [x.reshape(m, k), w, r.reshape(m, n)], {"M": m, "N": n, "K": k})
    return out.reshape(r.shape)


def o_proj_residual(x: Array, w: Array, r: Array) -> Array:
    """``x @ w.T + r`` (attention output projection and residual, one pass)."""
    return _matvec_residual("o_proj_residual", x, w, r)


def down_proj_residual(x: Array, w: Array, r: Array) -> Array:
    """``x @ w.T + r`` (MLP down projection and residual, one pass)."""
    return _matvec_residual("down_proj_residual", x, w, r)


def gate_up_silu(x: Array, wg: Array, wu: Array) -> Array:
    """``silu(x @ wg.T) * (x @ wu.T)``; the two products never reach memory."""
    _need_ranks("gate_up_silu", x=(x, -1), wg=(wg, 2), wu=(wu, 2))
    n, k = wg.shape
    m = _rows(x)
    (out,) = bind("mlp_gate_up_silu", [x.reshape(m, k), wg, wu], {"M": m, "N": n, "K": k})
    return out.reshape(x.shape[:-1] + (n,))


def rms_norm_gate_up_silu(x: Array, ln_w: Array, eps: float, wg: Array, wu: Array) -> Array:
    """``silu(n @ wg.T) * (n @ wu.T)`` with ``n = rms_norm(x, ln_w, eps)``, one launch."""
    _need_ranks("rms_norm_gate_up_silu", x=(x, -1), ln_w=(ln_w, 1), wg=(wg, 2), wu=(wu, 2))
    n, k = wg.shape
    m = _rows(x)
    (out,) = bind("rms_norm_gate_up_silu", [x.reshape(m, k), ln_w, wg, wu], {"M": m, "N": n, "K": k}, {"eps": eps})
    return out.reshape(x.shape[:-1] + (n,))


def rms_norm_linear(x: Array, ln_w: Array, eps: float, w: Array, b: Optional[Array] = None) -> Array:
    """``rms_norm(x, ln_w, eps) @ w.T (+ b)`` in one launch (the final norm and the lm_head);
    the normalized row never reaches memory."""
    _need_ranks("rms_norm_linear", x=(x, -1), ln_w=(ln_w, 1), w=(w, 2), b=(b, 1))
    n, k = w.shape
    m = _rows(x)
    ops = [x.reshape(m, k), ln_w, w] + ([b] if b is not None else [])
    (out,) = bind("rms_norm_matvec", ops, {"M": m, "N": n, "K": k, "HAS_BIAS": int(b is not None)}, {"eps": eps})
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
    m, nkv, s, dh = k_cache.shape
    nq = wq.shape[0]
    kind, scal = rope if rope is not None else rope_scalars(theta, scaling)
    sizes = {"M": m, "K": x.shape[-1], "NH": nq // dh, "NKV": nkv, "DH": dh, "NQ": nq, "NKD": nkv * dh, "S": s,
             "HAS_BIAS": int(bq is not None), "ROPE_KIND": kind, **({"CACHE_POS": 1} if cache_pos is not None else {})}
    ops = [x.reshape(m, x.shape[-1]), ln_w, wq, wk, wv] + ([bq, bk, bv] if bq is not None else [])
    ops += [pos] + ([cache_pos] if cache_pos is not None else [])
    q, kc, vc = bind("qkv_rope_cache", ops + [k_cache, v_cache], sizes, {"eps": eps, **scal})
    return q, kc, vc


def _elementwise(name: str, a: Array, b: Array) -> Array:
    _need_ranks(name.removesuffix("_fused"), a=(a, -1), b=(b, -1))
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"{name.removesuffix('_fused')}: a and b have shapes {jnp.shape(a)} and {jnp.shape(b)}, "
                         "expected equal shapes")
    n = a.shape[-1]
    m = _rows(a)
    (out,) = bind(name, [a.reshape(m, n), b.reshape(m, n)], {"M": m, "N": n})
    return out.reshape(a.shape)


def silu_mul(a: Array, b: Array) -> Array:
    """``silu(a) * b``, elementwise."""
    return _elementwise("silu_mul_fused", a, b)


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


def rope(x: Array, pos: Array, theta: float, scaling: Optional[dict] = None) -> Array:
    """Rotary embedding (rotate-half) of ``x`` [M, H, DH] at integer positions ``pos`` [M]."""
    _need_ranks("rope", x=(x, 3), pos=(pos, 1))
    m, h, dh = x.shape
    kind, scal = rope_scalars(theta, scaling)
    (out,) = bind("rope_q", [x, pos], {"M": m, "NH": h, "DH": dh, "ROPE_KIND": kind}, scal)
    return out


def rope_k_into_cache(k: Array, v: Array, pos: Array, k_cache: Array, v_cache: Array, theta: float,
                      scaling: Optional[dict] = None) -> tuple[Array, Array]:
    """Rotate ``k`` [M, NKV, DH] at ``pos`` [M] and write it, and ``v``, into row ``pos``
    of the static caches [M, NKV, S, DH]; returns the updated caches (donate them to
    the enclosing ``jit`` and XLA updates them in place)."""
    _need_ranks("rope_k_into_cache", k=(k, 3), v=(v, 3), pos=(pos, 1), k_cache=(k_cache, 4), v_cache=(v_cache, 4))
    m, h, dh = k.shape
    kind, scal = rope_scalars(theta, scaling)
    sizes = {"M": m, "NKV": h, "DH": dh, "S": k_cache.shape[2], "ROPE_KIND": kind}
    kc, vc = bind("rope_k", [k, pos, v, k_cache, v_cache], sizes, scal)
    return kc, vc


def attention_decode(q: Array, k_cache: Array, v_cache: Array, lengths: Array, scale: float) -> Array:
    """GQA decode attention of ``q`` [B, NH, DH] over the first ``lengths[b]``
    positions of the caches [B, NKV, S, DH]."""
    _need_ranks("attention_decode", q=(q, 3), k_cache=(k_cache, 4), v_cache=(v_cache, 4), lengths=(lengths, 1))
    b, nh, dh = q.shape
    nkv, s = k_cache.shape[1], k_cache.shape[2]
    (out,) = bind("attention_decode_gqa", [q, k_cache, v_cache, lengths],
                  {"B": b, "NH": nh, "NKV": nkv, "DH": dh, "S": s}, {"scale": scale})
    return out


def argmax(logits: Array) -> Array:
    """Greedy tokens of ``logits`` [..., V] (ties to the lowest index)."""
    _need_ranks("argmax", logits=(logits, -1))
    v = logits.shape[-1]
    m = _rows(logits)
    (out,) = bind("argmax_greedy", [logits.reshape(m, v)], {"M": m, "V": v})
    return out.reshape(logits.shape[:-1])
