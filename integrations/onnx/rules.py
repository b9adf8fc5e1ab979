"""The tileflow decode patterns as onnxscript rewrite rules, for two targets.

``ort``: ONNX Runtime contrib ops (``SimplifiedLayerNormalization`` -- registered by
ORT in the default domain -- ``com.microsoft`` ``SkipSimplifiedLayerNormalization``,
``RotaryEmbedding`` and ``GroupQueryAttention``). ``opset23``: the standard
``RMSNormalization``, ``RotaryEmbedding`` and ``Attention``.

The patterns are written against what ``torch.onnx.export(dynamo=True)`` makes of a
transformers Qwen2 / Llama decoder (see ``export.py``). Every ``check`` states the
exactness conditions of ``tileflow.patterns``: when one fails the original subgraph
stays and the reason goes to the report.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from tileflow.report import Report

FLOAT = ir.DataType.FLOAT
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


def where(node: Optional[ir.Node]) -> str:
    """The transformers module a node was exported from (``layers.3.self_attn``), from
    the ``namespace`` metadata the dynamo exporter writes on every node."""
    if node is None:
        return "?"
    scopes = [s.split(": ")[0] for s in node.metadata_props.get("namespace", "").split("/")[:-1]]
    scopes = [s for s in scopes if s]
    if not scopes:
        return node.name or node.op_type
    return re.sub(r"^(model\.)+", "", scopes[-1]) or scopes[-1]


def _const(value: Optional[ir.Value]) -> Optional[np.ndarray]:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _scalar(value) -> Optional[float]:
    arr = _const(value)
    return float(arr.reshape(())) if arr is not None and arr.size == 1 else None


def _is_ints(value, expected) -> bool:
    arr = _const(value)
    return arr is not None and arr.reshape(-1).tolist() == list(expected)


def _resolves(value, shape) -> bool:
    """A constant Reshape target that gives ``shape`` (a -1 standing for its entry)."""
    arr = _const(value)
    if arr is None or arr.size != len(shape):
        return False
    got = arr.reshape(-1).tolist()
    return got.count(-1) <= 1 and all(g == s or g == -1 for g, s in zip(got, shape))


def _dims(value: ir.Value) -> Optional[list]:
    return None if value.shape is None else list(value.shape)


class _Rule(pattern.RewriteRuleClassBase):
    """A rule that reports: a match in ``rewrite``, a failed exactness check as a
    fallback with its reason. ``PATTERN`` is the catalogue name."""

    PATTERN = ""

    def __init__(self, name: str, report: Report, target: str, **kwargs):
        super().__init__(name, **kwargs)
        self.report, self.target = report, target

    def fail(self, context, reason: str):
        root = context.root
        if hasattr(self.report, "checked"):
            # Settled at the end: another rule may still rewrite this node.
            self.report.checked.append((self.PATTERN, where(root), root.name, reason))
        else:
            self.report.fallback(self.PATTERN, where(root), reason)
        return pattern.MatchResult().fail(reason)

    def done(self, op):
        self.report.match(self.PATTERN)
        if hasattr(self.report, "applied"):
            self.report.applied.append((self.PATTERN, self._where))
            self.report.rewritten.add(self._root)

    def check(self, context, **kw):
        self._where, self._root = where(context.root), context.root.name
        self._graph_inputs = {i.name for i in context.graph_or_function.inputs}
        reason = self.exact(**kw)
        return self.fail(context, reason) if reason else pattern.MatchResult()

    def exact(self, **kw) -> Optional[str]:  # pragma: no cover - overridden
        raise NotImplementedError


# ------------------------------------------------------------------ rms_norm
def _rms_body(op, x, eps, weight):
    var = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1, noop_with_empty_axes=0)
    return op.Mul(weight, op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(var, eps)))))


def _rms_exact(x, eps, weight) -> Optional[str]:
    if _scalar(eps) is None:
        return "eps is not a constant scalar"
    if x.dtype != FLOAT:
        # transformers computes the norm of half inputs in fp32 through casts this
        # pattern does not contain; only fp32 graphs are claimed exact.
        return f"input dtype {x.dtype} (only float32 matched)"
    w = _const(weight)
    if w is None or w.ndim != 1:
        return "weight is not a constant 1-D tensor"
    dims = _dims(x)
    if not dims or dims[-1] != w.shape[0]:
        return f"weight length {w.shape[0]} != normalized dim {dims[-1] if dims else '?'}"
    if weight.dtype != x.dtype:
        return "weight dtype differs from input dtype"
    return None


class RmsNorm(_Rule):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis."""

    PATTERN = "rms_norm"

    def pattern(self, op, x, eps, weight):
        return _rms_body(op, x, eps, weight)

    def exact(self, x, eps, weight, **_):
        return _rms_exact(x, eps, weight)

    def rewrite(self, op, x, eps, weight, **_):
        self.done(op)
        name = "SimplifiedLayerNormalization" if self.target == "ort" else "RMSNormalization"
        return getattr(op, name)(x, weight, axis=-1, epsilon=_scalar(eps), stash_type=1)


class ResidualRmsNorm(_Rule):
    """``s = a + b; rms_norm(s)`` with ``s`` used on (the residual stream): ORT's
    ``SkipSimplifiedLayerNormalization`` returns both."""

    PATTERN = "residual_rms_norm"

    def pattern(self, op, a, b, eps, weight):
        s = op.Add(a, b)
        return _rms_body(op, s, eps, weight), s

    def exact(self, a, b, eps, weight, **_):
        reason = _rms_exact(a, eps, weight)
        if reason:
            return reason
        if a.shape is None or b.shape is None or a.shape != b.shape or len(a.shape) != 3:
            return f"residual operands are not both 3-D of one shape ({a.shape} vs {b.shape})"
        if a.dtype != b.dtype:
            return "residual operands differ in dtype"
        return None

    def rewrite(self, op, a, b, eps, weight, **_):
        self.done(op)
        y, _mean, _inv_std, s = op.SkipSimplifiedLayerNormalization(
            a, b, weight, epsilon=_scalar(eps), _outputs=4, _domain="com.microsoft")
        return y, s


# ---------------------------------------------------------------------- rope
class Rope(_Rule):
    """transformers' ``apply_rotary_pos_emb`` (rotate-half form) with the cos / sin of
    ``Qwen2RotaryEmbedding`` / ``LlamaRotaryEmbedding`` computed in the graph from the
    constant ``inv_freq``. Replaced by a RotaryEmbedding reading precomputed
    ``cos(p * inv_freq)`` / ``sin(...)`` tables indexed by position."""

    PATTERN = "rope"

    def __init__(self, name, report, target, max_positions: int):
        super().__init__(name, report, target, remove_nodes=False)
        self.max_positions = max_positions
        self._tables: dict = {}

    def pattern(self, op, x, pos, inv_freq, ax_c, ax_s, s1a, s1b, s1x, s1s, s2a, s2b, s2x, s2s):
        freqs = op.Mul(op.Cast(pos, to=FLOAT), inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), ax_c)
        sin = op.Unsqueeze(op.Sin(emb), ax_s)
        x1 = op.Slice(x, s1a, s1b, s1x, s1s)
        x2 = op.Slice(x, s2a, s2b, s2x, s2s)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def exact(self, x, pos, inv_freq, ax_c, ax_s, s1a, s1b, s1x, s1s, s2a, s2b, s2x, s2s, **_):
        dims = _dims(x)
        if dims is None or len(dims) != 4 or not isinstance(dims[-1], int):
            return f"input is not 4-D [batch, heads, seq, head_dim] with static head_dim ({dims})"
        if x.dtype != FLOAT:
            return f"input dtype {x.dtype} (only float32 matched)"
        dh = dims[-1]
        f = _const(inv_freq)
        if f is None or f.size != dh // 2 or dh % 2:
            return "inv_freq is not a constant of head_dim / 2 entries"
        if not (_is_ints(ax_c, [1]) and _is_ints(ax_s, [1])):
            return "cos / sin are not broadcast over the head axis"
        half, last = dh // 2, (-1, 3)
        if not (_is_ints(s1a, [0]) and _is_ints(s1b, [half]) and _const(s1x) is not None
                and int(_const(s1x).reshape(-1)[0]) in last and _is_ints(s1s, [1])):
            return "first slice is not x[..., :head_dim/2]"
        end = _const(s2b)
        if not (_is_ints(s2a, [half]) and end is not None and int(end.reshape(-1)[0]) >= dh
                and _const(s2x) is not None and int(_const(s2x).reshape(-1)[0]) in last and _is_ints(s2s, [1])):
            return "second slice is not x[..., head_dim/2:]"
        pdims = _dims(pos)
        if pos.dtype != ir.DataType.INT64 or pdims is None or len(pdims) != 3 or pdims[0] != 1 or pdims[2] != 1:
            return f"positions are not int64 [1, seq, 1] ({pdims})"
        if dims[0] != 1:
            return "batch is not 1"
        return None

    def _cache(self, op, inv_freq):
        key = inv_freq.name
        if key not in self._tables:
            f = _const(inv_freq).reshape(1, -1).astype(np.float32)
            # One fp32 multiply per entry, as the graph's Mul(Cast(pos), inv_freq) does.
            angles = np.arange(self.max_positions, dtype=np.float32).reshape(-1, 1) * f
            cos = op.initializer(ir.tensor(np.cos(angles).astype(np.float32)), name=f"tileflow.rope_cos.{len(self._tables)}")
            sin = op.initializer(ir.tensor(np.sin(angles).astype(np.float32)), name=f"tileflow.rope_sin.{len(self._tables)}")
            self._tables[key] = (cos, sin)
        return self._tables[key]

    def rewrite(self, op, x, pos, inv_freq, **_):
        self.done(op)
        cos, sin = self._cache(op, inv_freq)
        position_ids = op.Reshape(pos, op.Constant(value_ints=[1, -1]))
        if self.target == "ort":
            return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, _domain="com.microsoft")
        return op.RotaryEmbedding(x, cos, sin, position_ids, interleaved=0)


# ------------------------------------------------------------- gqa_attention
class GqaAttention(_Rule):
    """One decode query over ``concat(past, new)`` keys / values, the K/V heads repeated
    for the groups (``repeat_kv``), SDPA as torch's exporter decomposes it, and the
    causal mask of a query at the last position (all keys visible). Replaced by a
    GroupQueryAttention / Attention that appends to the cache itself."""

    PATTERN = "gqa_attention"

    def __init__(self, name, report, target):
        super().__init__(name, report, target, remove_nodes=False)

    def pattern(self, op, q, k, v, past_k, past_v, any_past, ax_k, shp5_k, shp4_k, ax_v, shp5_v, shp4_v,
                sq, sk, zero, neg, one, zero_i, zero_v, axm1, axm2, axq1, axq2, mshape, shp_o1, shp_o2):
        present_k = op.Concat(past_k, k, axis=-2)
        present_v = op.Concat(past_v, v, axis=-2)
        k_rep = op.Reshape(op.Expand(op.Unsqueeze(present_k, ax_k), shp5_k), shp4_k)
        v_rep = op.Reshape(op.Expand(op.Unsqueeze(present_v, ax_v), shp5_v), shp4_v)
        # k_rep.transpose(-2, -1) as the exporter writes it: via a 3-D reshape.
        kshape = op.Shape(k_rep, start=0)
        last = op.Slice(kshape, [-1], [INT64_MAX])
        second = op.Slice(kshape, [-2], [-1])
        lead = op.Slice(kshape, [INT64_MIN], [-2])
        k3 = op.Reshape(k_rep, op.Concat([-1], second, last, axis=0), allowzero=0)
        k_t = op.Reshape(op.Transpose(k3, perm=[0, 2, 1]), op.Concat(lead, last, second, axis=0), allowzero=0)
        # kv index <= query position, the query being at position past_len: all True.
        past_len = op.Squeeze(op.Shape(any_past, start=2, end=3))
        total = op.Add(past_len, one)
        kv_idx = op.Unsqueeze(op.Unsqueeze(op.Range(zero_i, total, one), axm1), axm2)
        q_pos = op.Unsqueeze(op.Unsqueeze(op.Add(zero_v, past_len), axq1), axq2)
        mask = op.Where(op.Expand(op.LessOrEqual(kv_idx, q_pos), mshape), zero, neg)
        scores = op.Add(op.MatMul(op.Mul(q, sq), op.Mul(k_t, sk)), mask)
        probs = op.Softmax(scores, axis=-1)
        probs = op.Where(op.IsNaN(probs), zero, probs)
        out = op.MatMul(probs, v_rep)
        out = op.Reshape(op.Transpose(op.Reshape(out, shp_o1), perm=[0, 2, 1, 3]), shp_o2)
        return out, present_k, present_v

    def exact(self, q, k, v, past_k, past_v, any_past, shp4_k, shp4_v, sq, sk, zero, one, zero_i, zero_v,
              ax_k, ax_v, shp_o1, shp_o2, **_):
        qd, kd, vd, pkd, pvd = (_dims(t) for t in (q, k, v, past_k, past_v))
        if None in (qd, kd, vd, pkd, pvd) or any(len(d) != 4 for d in (qd, kd, vd, pkd, pvd)):
            return "q / k / v / cache are not 4-D"
        if qd[0] != 1 or qd[2] != 1:
            return f"not one decode query of batch 1 (q {qd}): the causal mask matters, original kept"
        h, dh, hkv = qd[1], qd[3], kd[1]
        if not all(isinstance(d, int) for d in (h, dh, hkv)) or h % hkv:
            return f"heads {h} not a multiple of kv heads {hkv}"
        if kd != [1, hkv, 1, dh] or vd != [1, hkv, 1, dh]:
            return f"new k / v are not [1, {hkv}, 1, {dh}] ({kd}, {vd})"
        for cache in (past_k, past_v, any_past):
            if cache.name not in self._graph_inputs:
                return f"{cache.name} is not a cache input of the graph"
        if pkd[:2] + pkd[3:] != [1, hkv, dh] or pvd[:2] + pvd[3:] != [1, hkv, dh]:
            return "cache layout is not [1, kv_heads, past, head_dim]"
        if not (pkd[2] == pvd[2] == _dims(any_past)[2]):
            return "the mask is built from a cache of another length"
        if not (_is_ints(shp4_k, [1, h, -1, dh]) and _is_ints(shp4_v, [1, h, -1, dh])
                and _is_ints(ax_k, [2]) and _is_ints(ax_v, [2])):
            return "K / V heads are not repeated in repeat_kv order (kv head j -> heads j*G..j*G+G-1)"
        s_q, s_k = _scalar(sq), _scalar(sk)
        if s_q is None or s_k is None or s_q != s_k:
            return "query / key scale factors are not one constant"
        if _scalar(zero) != 0.0 or _scalar(one) != 1 or _scalar(zero_i) != 0 or not _is_ints(zero_v, [0]):
            return "mask constants are not those of a causal mask"
        if not (_resolves(shp_o1, [1, h, 1, dh]) and _resolves(shp_o2, [1, 1, h * dh])):
            return "output is not reshaped [1, heads, 1, head_dim] -> [1, 1, heads * head_dim]"
        self._dims_seen = (h, hkv, dh, s_q * s_k)
        return None

    def rewrite(self, op, q, k, v, past_k, past_v, **_):
        self.done(op)
        h, hkv, dh, scale = self._dims_seen
        if self.target == "ort":
            # With one query, [1, H, 1, dh] and [1, 1, H*dh] are the same memory.
            q3 = op.Reshape(q, op.Constant(value_ints=[1, 1, h * dh]))
            k3 = op.Reshape(k, op.Constant(value_ints=[1, 1, hkv * dh]))
            v3 = op.Reshape(v, op.Constant(value_ints=[1, 1, hkv * dh]))
            seqlens_k = op.Cast(op.Shape(past_k, start=2, end=3), to=ir.DataType.INT32)
            total = op.Squeeze(op.Add(seqlens_k, op.Constant(value=ir.tensor(np.array([1], np.int32)))))
            return op.GroupQueryAttention(q3, k3, v3, past_k, past_v, seqlens_k, total, num_heads=h,
                                          kv_num_heads=hkv, scale=scale, _outputs=3, _domain="com.microsoft")
        y, present_k, present_v = op.Attention(q, k, v, None, past_k, past_v, scale=scale, is_causal=0,
                                               q_num_heads=h, kv_num_heads=hkv, _outputs=3)
        out = op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[1, 1, h * dh]))
        return out, present_k, present_v


# -------------------------------------------------------------- gate_up_silu
class GateUpSilu(_Rule):
    """``silu(x @ Wg) * (x @ Wu)``: one MatMul over ``[Wg | Wu]`` (x read once), then
    Split, so the two products are the same dot products as before."""

    PATTERN = "gate_up_silu"

    def __init__(self, name, report, target):
        super().__init__(name, report, target, remove_nodes=False)
        self._n = 0

    def pattern(self, op, x, wg, wu):
        g = op.MatMul(x, wg)
        return op.Mul(op.Mul(g, op.Sigmoid(g)), op.MatMul(x, wu))

    def exact(self, x, wg, wu, **_):
        a, b = _const(wg), _const(wu)
        if a is None or b is None or a.ndim != 2 or a.shape != b.shape:
            return "gate / up weights are not constant 2-D tensors of one shape"
        xd = _dims(x)
        if not xd or xd[-1] != a.shape[0]:
            return "x's last dim is not the weights' K"
        if any(d != 1 for d in xd[:-1]):
            return f"x has more than one row ({xd}): prefill stays with the GEMMs"
        if not (x.dtype == wg.dtype == wu.dtype) or x.dtype not in (FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return "dtypes differ or are not float"
        return None

    def rewrite(self, op, x, wg, wu, **_):
        self.done(op)
        a, b = _const(wg), _const(wu)
        w = op.initializer(ir.tensor(np.concatenate([a, b], axis=1)), name=f"tileflow.gate_up.{self._n}")
        self._n += 1
        n = a.shape[1]
        g, u = op.Split(op.MatMul(x, w), op.Constant(value_ints=[n, n]), axis=-1, _outputs=2)
        return op.Mul(op.Mul(g, op.Sigmoid(g)), u)


# ----------------------------------------------------------- matvec_residual
class MatvecResidual(_Rule):
    """``r + x @ W`` for a decode row: one Gemm with ``r`` as its C (beta 1)."""

    PATTERN = "matvec_residual"

    def pattern(self, op, r, x, w):
        return op.Add(r, op.MatMul(x, w))

    def exact(self, r, x, w, **_):
        wa = _const(w)
        if wa is None or wa.ndim != 2:
            return "weight is not a constant 2-D tensor"
        xd, rd = _dims(x), _dims(r)
        if not xd or any(d != 1 for d in xd[:-1]) or xd[-1] != wa.shape[0]:
            return f"x is not one row of K={wa.shape[0]} ({xd})"
        if rd != xd[:-1] + [wa.shape[1]]:
            return f"residual shape {rd} is not the product's"
        if not (r.dtype == x.dtype == w.dtype):
            return "dtypes differ"
        return None

    def rewrite(self, op, r, x, w, **_):
        self.done(op)
        k, n = _const(w).shape
        shape = _dims(r)
        y = op.Gemm(op.Reshape(x, op.Constant(value_ints=[1, k])), w,
                    op.Reshape(r, op.Constant(value_ints=[1, n])), alpha=1.0, beta=1.0)
        return op.Reshape(y, op.Constant(value_ints=shape))


def rule_passes(report: Report, target: str, max_positions: int) -> list:
    """Rule sets in the order they must run: norms first (the skip norm takes the
    residual adds before ``matvec_residual`` could), RoPE before attention (whose
    q / k inputs are then RotaryEmbedding outputs), the MLP last."""
    norms = ([ResidualRmsNorm.rule("residual_rms_norm", report, target)] if target == "ort" else [])
    norms.append(RmsNorm.rule("rms_norm", report, target))
    return [
        norms,
        [Rope.rule("rope", report, target, max_positions)],
        [GqaAttention.rule("gqa_attention", report, target)],
        [GateUpSilu.rule("gate_up_silu", report, target), MatvecResidual.rule("matvec_residual", report, target)],
    ]
