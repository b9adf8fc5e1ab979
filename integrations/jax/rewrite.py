"""The jaxpr rewrite: decode subgraphs -> tileflow primitives.

Implements the catalogue (``tileflow.patterns``: rms_norm, rope, gqa_attention,
gate_up_silu, matvec_residual, matvec) on the flattened jaxpr of a function
(``graph.py``). Each matcher starts from a cheap trigger equation (an ``rsqrt``, a
rotate-half ``concatenate``, a softmax ``div``, a ``logistic``, an ``add`` or a
``dot_general``), walks the dataflow around it and either claims a Match (the
equations it replaces, and what the fusion pass needs to know) or gives a reason. A
reason is recorded only once the trigger has proved the subgraph is the pattern's (a
``logistic`` that is not SiLU-times-up is not news), so the report lists the near
misses a user can act on. Patterns run in catalogue order; an equation claimed by one
match is not matched again.

Exactness conditions on the jaxpr (beyond the catalogue's descriptions):

- rms_norm: ``reduce_sum`` of ``x*x`` over the last axis only, divided by exactly D
  (or times 1/D), ``+ eps`` with eps a constant scalar (passed to the kernel as
  read), ``rsqrt``, times x, optionally cast, times a [D] weight broadcast along the
  last axis; squares summed in fp32 (x upcast or fp32); x, w and the result share
  one storage dtype.
- rope: ``x * cos + concat(-x[..., D/2:], x[..., :D/2]) * sin`` with cos / sin of one
  ``concat(f, f)``, ``f = float32(position) * inv_freq`` where inv_freq is a
  constant equal, to fp32 rounding, to the kernel's default, linear or llama3
  frequencies (theta and scaling are fitted from it and re-checked); exactly one
  position (decode); cos / sin broadcast along x's last axis.
- gqa_attention: fp32 softmax over the last axis of
  ``where(arange(S) < L, (qg . K) * scale, -inf)`` (``<=`` means L + 1; fill may be
  any value <= -1e30), then ``probs . V``, with ``qg`` [B, NKV, G, DH] and K, V
  [B, NKV, S, DH] contracted batched over (B, NKV) (the grouped-query layout; the
  ``repeat_kv`` form is reported, not matched), not transposed, one storage dtype,
  L one runtime integer (batch 1), scale a constant.
- gate_up_silu / matvec_residual / matvec: ``dot_general`` over x's last axis with a
  2-D weight read as [N, K] (``x @ W.T``; a [K, N] weight is reported), one row,
  x / W / result of one dtype; SiLU as ``g * logistic(g)`` (``jax.nn.silu``); the
  residual of the product's shape and dtype and not a broadcast bias; a bias is a
  [N] vector broadcast along the last axis.

Fusion, after the catalogue (``Rewriter.fuse``): an rms_norm match and the matches that
read its normalized value become one norm-fused kernel, reported by the kernel's name
in place of its parts (the catalogue names count what stays unfused):

- rms_norm_gate_up_silu: the gate and up matvecs of one gate_up_silu are the only
  readers of the normalized value.
- rms_norm_matvec: one matvec (+ bias) is its only reader (the final norm, lm_head).
- qkv_rope_cache: three matvecs are its only readers, all with or all without a bias,
  each reshaped (row-major) to heads [M, H, DH]; two are the x of rope matches at one
  position with one fitted frequency set; the rotated k and the v heads are each,
  through reshapes / broadcasts that keep the element count, the [M, NKV, 1, DH]
  update of a ``dynamic_update_slice`` into a [M, NKV, S, DH] cache in x's dtype at
  (0, 0, row, 0), one row for both ("one" position or row: one equation, or copies of
  one, as each ``dynamic_update_slice`` normalizes its start on its own). The kernel
  gets that row as its
  ``cache_pos`` clamped to [0, S - 1], as XLA clamps the update's start (a position
  past the cache writes where plain JAX writes, RoPE still at the position itself).
  No value between the normalized x and the three results (q, K cache, V cache) is
  read outside the subgraph or returned, and no equation reads a result before the
  last of them is computed.

Another reader of a value the fused kernel keeps to itself would need the unfused
computation anyway: the parts stay, and the reason is reported under the fused name.
The fused kernels keep the normalized row (and qkv_rope_cache the projections before
RoPE) in fp32 where the unfused kernels round it to the storage dtype in between:
equal in fp32 up to summation order, a rounding fewer in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from tileflow.integrations.jax import ops
from tileflow.integrations.jax.graph import Graph, Node, Replacement
from tileflow.patterns import matvec as matvec_pattern
from tileflow.report import Report
from tileflow.suite.rope import ROPE_SCALARS

STORAGE = ("bfloat16", "float16", "float32")
_SHAPE_OPS = ("broadcast_in_dim", "reshape", "squeeze", "expand_dims")


class Miss(Exception):
    """A pattern's condition failed: the message is the reason."""


def _dt(a) -> str:
    return str(a.aval.dtype)


def _shape(a) -> tuple:
    return tuple(a.aval.shape)


def _scalar(g: Graph, a) -> Optional[float]:
    v = g.const(a)
    if v is None or v.size == 0 or not np.all(v == v.flat[0]):
        return None
    return float(v.flat[0])


def _other(n: Node, a):
    """The operand of binary ``n`` that is not ``a`` (None when both are)."""
    x, y = n.ins
    return y if x is a else x if y is a else None


# ------------------------------------------------------------------------ matvec


def matvec_of(g: Graph, d: Node) -> tuple:
    """(x, W [N, K]) when dot_general ``d`` is a decode matvec ``x @ W.T``; else Miss."""
    (lc, rc), (lb, rb) = d.params["dimension_numbers"]
    x, w = d.ins
    if lb or rb or len(lc) != 1 or tuple(lc) != (len(_shape(x)) - 1,):
        raise Miss("not a product over x's last axis")
    if len(_shape(w)) != 2:
        raise Miss("the weight is not 2-D")
    rows = math.prod(_shape(x)[:-1])
    if rows > matvec_pattern.MAX_ROWS:
        raise Miss(f"{rows} rows: prefill stays with the library GEMM")
    t = g.op(w, "transpose")
    if rc[0] == 1:
        weight = w
    elif t is not None and tuple(t.params["permutation"]) == (1, 0):
        weight = t.ins[0]
    else:
        raise Miss("the weight is [K, N] (x @ W): the kernel reads the nn.Linear layout [N, K]; store W transposed")
    dts = {_dt(x), _dt(weight), _dt(d.outs[0])}
    if len(dts) != 1 or next(iter(dts)) not in STORAGE:
        raise Miss(f"dtypes {sorted(dts)} (x, W and the product must share bf16 / fp16 / fp32)")
    return x, weight


def _dot(g: Graph, a) -> Optional[Node]:
    return g.op(a, "dot_general")


# ---------------------------------------------------------------------- patterns


@dataclass(eq=False)
class Match:
    """One matched subgraph: ``anchor``'s outputs (or ``outs``) come from ``fn(inputs)``.
    ``nodes`` are the equations it claims, ``fields`` what the fusion pass reads of it
    (its input x, weights, output value, ...)."""

    pattern: str
    anchor: Node
    inputs: list
    fn: Callable
    nodes: list
    fields: dict = field(default_factory=dict)
    outs: Optional[list] = None

    def __getitem__(self, key):
        return self.fields[key]


class _Branch(NamedTuple):
    """One of the q / k / v projections of an attention input: its matvec match, the
    reshape to heads and the rope match rotating them (None for v)."""

    mv: Match
    heads: Node
    rope: Optional[Match]


class Rewriter:
    def __init__(self, g: Graph, report: Report):
        self.g, self.report = g, report
        self.claimed: set[int] = set()
        self.matches: dict[int, Match] = {}  # anchor index -> match
        self.owner: dict[int, Match] = {}  # claimed equation index -> its match

    def _claim(self, pattern: str, nodes: list, anchor: Node, inputs: list, fn: Callable, **fields) -> None:
        self._add(Match(pattern, anchor, inputs, fn, nodes, fields))

    def _add(self, m: Match) -> None:
        self.claimed.update(n.idx for n in m.nodes)
        self.owner.update((n.idx, m) for n in m.nodes)
        self.matches[m.anchor.idx] = m

    def _drop(self, m: Match) -> None:
        """Forget ``m`` (a fused match takes its place; its equations stay claimed)."""
        del self.matches[m.anchor.idx]

    def _free(self, *nodes) -> bool:
        return not any(n.idx in self.claimed for n in nodes)

    def run(self) -> dict:
        for name, trigger, match in (("rms_norm", "rsqrt", self.rms_norm), ("rope", "concatenate", self.rope),
                                     ("gqa_attention", "div", self.gqa_attention),
                                     ("gate_up_silu", "logistic", self.gate_up_silu),
                                     ("matvec_residual", "add", self.matvec_residual),
                                     ("matvec", "dot_general", self.matvec)):
            for n in list(self.g.nodes):
                if n.name != trigger or n.idx in self.claimed:
                    continue
                try:
                    match(n)
                except Miss as e:
                    if str(e):
                        self.report.fallback(name, n.where(), str(e))
        self.fuse()
        for m in self.matches.values():  # counted after fusion: a fused match counts once, by its name
            self.report.match(m.pattern)
        return {i: Replacement(i, m.inputs, m.fn, m.outs) for i, m in self.matches.items()}

    # -------------------------------------------------------------- rms_norm
    def rms_norm(self, r: Node) -> None:
        """``w * cast(x * rsqrt(mean(x * x) + eps))`` (see patterns/rms_norm.py)."""
        g = self.g
        add = g.op(r.ins[0], "add")
        if add is None:
            raise Miss("")
        eps, ms = None, None
        for a, b in (add.ins, add.ins[::-1]):
            if _scalar(g, b) is not None:
                eps, ms = _scalar(g, b), a
        if ms is None:
            raise Miss("")
        mean = g.op(g.peel(ms, ("convert_element_type",))[0], "div", "mul")
        if mean is None:
            raise Miss("")
        root, _ = g.peel(mean.ins[0], _SHAPE_OPS)
        total = g.op(root, "reduce_sum")
        if total is None:
            raise Miss("")
        sq = g.op(g.peel(total.ins[0], ("convert_element_type",))[0], "mul", "integer_pow", "square")
        if sq is None or (sq.name == "mul" and sq.ins[0] is not sq.ins[1]) or \
                (sq.name == "integer_pow" and sq.params["y"] != 2):
            raise Miss("")
        x = sq.ins[0]
        d = _shape(x)[-1]
        # from here on the subgraph is an RMSNorm: a failed condition is worth reporting
        if tuple(total.params["axes"]) != (len(_shape(x)) - 1,):
            raise Miss(f"mean over axes {total.params['axes']}, not the last axis")
        k = _scalar(g, mean.ins[1])
        if k is None or not (mean.name == "div" and k == d or mean.name == "mul" and abs(k * d - 1) < 1e-7):
            raise Miss(f"the sum of squares is not divided by D={d}")
        if _dt(x) != "float32":
            raise Miss(f"the mean of squares is computed in {_dt(x)}; the kernel sums in fp32")
        scaled = [u for u in self._through(r.outs[0]) if u.name == "mul" and x in u.ins]
        if len(scaled) != 1:
            raise Miss("rsqrt(...) does not scale x")
        cur = scaled[0].outs[0]
        cast = g.only_user(cur)
        if cast is not None and cast.name == "convert_element_type":
            cur = cast.outs[0]
        final = g.only_user(cur)
        if final is None or final.name != "mul":
            raise Miss("the normalized x is not multiplied by a weight")
        wb = _other(final, cur)
        w, passed = g.peel(wb, ("broadcast_in_dim",))
        if _shape(w) != (d,) or any(tuple(p.params["broadcast_dimensions"]) != (len(_shape(p.outs[0])) - 1,)
                                    for p in passed):
            raise Miss(f"the weight is not a [D={d}] vector along the last axis")
        src = g.op(x, "convert_element_type")
        x0 = src.ins[0] if src is not None and _dt(src.ins[0]) in STORAGE else x
        if _dt(x0) not in STORAGE or _dt(w) != _dt(x0) or _dt(final.outs[0]) != _dt(x0):
            raise Miss(f"dtypes x={_dt(x0)} w={_dt(w)} out={_dt(final.outs[0])}: the kernel keeps one storage dtype")
        shape = _shape(final.outs[0])
        self._claim("rms_norm", [r, final], final, [x0, w],
                    lambda xv, wv: [ops.rms_norm(xv, wv, eps).reshape(shape)], x=x0, w=w, eps=eps, out=final.outs[0])

    def _through(self, a) -> list:
        """Users of ``a``, looking through broadcasts and reshapes."""
        out = []
        for u in self.g.uses(a):
            if u.name in _SHAPE_OPS:
                out += self._through(u.outs[0])
            else:
                out.append(u)
        return out

    # ------------------------------------------------------------------ rope
    def rope(self, cat: Node) -> None:
        """``x * cos + rotate_half(x) * sin`` at one integer position (patterns/rope.py)."""
        g = self.g
        if len(cat.ins) != 2:
            raise Miss("")
        neg, lo = g.op(cat.ins[0], "neg"), g.op(cat.ins[1], "slice")
        hi = g.op(neg.ins[0], "slice") if neg is not None else None
        if hi is None or lo is None or hi.ins[0] is not lo.ins[0]:
            raise Miss("")
        x = lo.ins[0]
        shape = _shape(x)
        dh, half = shape[-1], shape[-1] // 2
        nd = len(shape)
        if cat.params["dimension"] != nd - 1 or dh % 2 or \
                tuple(lo.params["start_indices"])[-1] != 0 or tuple(lo.params["limit_indices"])[-1] != half or \
                tuple(hi.params["start_indices"])[-1] != half or tuple(hi.params["limit_indices"])[-1] != dh or \
                any(s != 0 for s in tuple(lo.params["start_indices"])[:-1] + tuple(hi.params["start_indices"])[:-1]) \
                or tuple(lo.params["limit_indices"])[:-1] != shape[:-1] or lo.params.get("strides") or \
                hi.params.get("strides"):
            raise Miss("")
        rot = cat.outs[0]
        m2 = g.only_user(rot)
        if m2 is None or m2.name != "mul":
            raise Miss("")
        add = g.only_user(m2.outs[0])
        if add is None or add.name != "add":
            raise Miss("")
        m1 = g.op(_other(add, m2.outs[0]), "mul")
        if m1 is None or x not in m1.ins:
            raise Miss("")
        # a rotate-half RoPE: from here on failures are reported
        cos_e, cos_path = g.peel(_other(m1, x))
        sin_e, sin_path = g.peel(_other(m2, rot))
        cos, sin = g.op(cos_e, "cos"), g.op(sin_e, "sin")
        if cos is None or sin is None or cos.ins[0] is not sin.ins[0]:
            raise Miss("cos and sin are not of one angle tensor")
        if not (_last_axis_kept(cos_path) and _last_axis_kept(sin_path)):
            raise Miss("cos / sin are not broadcast along x's last axis")
        emb = g.op(cos.ins[0], "concatenate")
        if emb is None or len(emb.ins) != 2 or emb.ins[0] is not emb.ins[1]:
            raise Miss("the angles are not concat(freqs, freqs) (rotate-half layout)")
        freqs = emb.ins[0]
        if _dt(freqs) != "float32":
            raise Miss(f"angles computed in {_dt(freqs)}; the kernel computes them in fp32")
        prod = g.op(freqs, "mul")
        if prod is None:
            raise Miss("the angles are not positions * inv_freq")
        pos, inv = None, None
        for a, b in (prod.ins, prod.ins[::-1]):
            iv = g.const(b)
            p, _ = g.peel(a)
            if iv is not None and jnp.issubdtype(p.aval.dtype, jnp.integer):
                pos, inv = p, np.asarray(iv, np.float64).reshape(-1)
        if pos is None:
            raise Miss("the angles are not integer positions times constant inverse frequencies")
        if math.prod(_shape(pos)) != 1:
            raise Miss(f"{math.prod(_shape(pos))} positions: only decode (one position) is rewritten")
        if inv.size != half:
            raise Miss(f"{inv.size} frequencies for head dim {dh}")
        if _dt(x) not in STORAGE or _dt(add.outs[0]) != _dt(x):
            raise Miss(f"dtypes x={_dt(x)} out={_dt(add.outs[0])}")
        fit = fit_rope(inv, dh)
        if isinstance(fit, str):
            raise Miss(fit)
        kind, scalars = fit
        rows = math.prod(shape[:-1])

        def build(xv, pv):
            (out,) = ops.bind("rope_q", [xv.reshape(1, rows, dh), pv.reshape(1)],
                              {"M": 1, "NH": rows, "DH": dh, "ROPE_KIND": kind}, scalars)
            return [out.reshape(shape)]

        self._claim("rope", [lo, hi, neg, cat, m1, m2, add], add, [x, pos], build, x=x, pos=pos, kind=kind,
                    scalars=scalars, out=add.outs[0])

    # --------------------------------------------------------- gqa_attention
    def gqa_attention(self, div: Node) -> None:
        """softmax(mask(q k^T * scale)) v over a static cache (patterns/gqa_attention.py)."""
        g = self.g
        e_node = g.op(div.ins[0], "exp")
        total, _ = g.peel(div.ins[1], _SHAPE_OPS)
        s_node = g.op(total, "reduce_sum")
        if e_node is None or s_node is None or s_node.ins[0] is not div.ins[0]:
            raise Miss("")
        nd = len(_shape(div.outs[0]))
        sub = g.op(e_node.ins[0], "sub")
        if sub is None or tuple(s_node.params["axes"]) != (nd - 1,):
            raise Miss("")
        scores = sub.ins[0]
        mx, _ = g.peel(sub.ins[1], _SHAPE_OPS + ("stop_gradient",))
        mnode = g.op(mx, "max")
        if mnode is not None:
            mx = next((a for a in mnode.ins if g.const(a) is None), None)
        rmax = g.op(mx, "reduce_max")
        if rmax is None or rmax.ins[0] is not scores:
            raise Miss("")
        # a softmax over the last axis: is it decode attention?
        probs = div.outs[0]
        user = g.only_user(probs)
        if user is not None and user.name == "convert_element_type":
            probs = user.outs[0]
            user = g.only_user(probs)
        if user is None or user.name != "dot_general" or user.ins[0] is not probs or nd != 4:
            raise Miss("")
        pv = user
        if _dt(div.outs[0]) != "float32":
            raise Miss(f"softmax in {_dt(div.outs[0])}; the kernel's is fp32")
        if pv.params["dimension_numbers"] != (((3,), (2,)), ((0, 1), (0, 1))):
            raise Miss("probs @ V is not batched over (batch, KV head) with V as [B, NKV, S, DH]")
        v = pv.ins[1]
        sel = g.op(scores, "select_n")
        if sel is None or len(sel.ins) != 3:
            raise Miss("no length mask (jnp.where(arange(S) < length, scores, -inf)): the kernel reads only "
                       "the filled part of the cache")
        fill = g.const(sel.ins[1])
        if fill is None or not np.all(fill <= -1e30):
            raise Miss("the masked scores are not -inf (or below -1e30)")
        length, inc = self._length(sel.ins[0], _shape(scores)[-1])
        raw, _ = g.peel(sel.ins[2], ("convert_element_type",))
        scale = 1.0
        sc = g.op(raw, "mul", "div")
        if sc is not None:
            for a, b in (sc.ins, sc.ins[::-1]):
                k = _scalar(g, b)
                if k is not None and (sc.name == "mul" or b is sc.ins[1]):
                    scale, raw = (k if sc.name == "mul" else 1.0 / k), a
                    break
        qk = _dot(g, raw)
        if qk is None or qk.params["dimension_numbers"] != (((3,), (3,)), ((0, 1), (0, 1))):
            raise Miss("q k^T is not batched over (batch, KV head) with K as [B, NKV, S, DH] (repeated K/V "
                       "heads are not recognized: reshape q to [B, NKV, G, DH] instead)")
        qg, k = qk.ins
        if g.op(k, "transpose") or g.op(v, "transpose"):
            raise Miss("the KV cache is read transposed; the kernel wants [B, NKV, S, DH]")
        if _shape(k) != _shape(v) or len({_dt(qg), _dt(k), _dt(v), _dt(pv.outs[0])}) != 1 or _dt(k) not in STORAGE:
            raise Miss(f"q {_dt(qg)}{_shape(qg)}, K {_dt(k)}{_shape(k)}, V {_dt(v)}{_shape(v)}: one storage dtype "
                       "and equal K/V shapes required")
        b, nkv, grp, dh = _shape(qg)
        out_shape = _shape(pv.outs[0])

        def build(qv, kv, vv, lv):
            lens = jnp.broadcast_to((lv + inc).astype(jnp.int32).reshape(-1), (b,))
            out = ops.gqa_attention(qv.reshape(b, nkv * grp, dh), kv, vv, lens, scale)
            return [out.reshape(out_shape)]

        self._claim("gqa_attention", [div, qk, pv], pv, [qg, k, v, length], build)

    def _length(self, pred, s: int) -> tuple:
        """(L, offset) when ``pred`` is ``arange(S) < L`` broadcast along the last axis
        (``<=`` gives offset 1); else Miss."""
        g = self.g
        root, path = g.peel(pred, _SHAPE_OPS)
        if not _last_axis_kept(path):
            raise Miss("the mask does not run along the key axis")
        cmp = g.op(root, "lt", "le", "gt", "ge")
        if cmp is None:
            raise Miss("the mask is not a comparison of key positions with a length")
        a, b = cmp.ins if cmp.name in ("lt", "le") else cmp.ins[::-1]
        io = g.const(a)
        if io is None or io.shape != (s,) or not np.array_equal(io, np.arange(s)):
            raise Miss("the mask does not compare arange(S) with a length")
        if g.const(b) is not None or not jnp.issubdtype(b.aval.dtype, jnp.integer) or math.prod(_shape(b)) > 1:
            raise Miss("the mask's length is not one runtime integer (batch 1)")
        return b, int(cmp.name in ("le", "ge"))

    # ---------------------------------------------------------- gate_up_silu
    def gate_up_silu(self, sig: Node) -> None:
        """``silu(x @ Wg.T) * (x @ Wu.T)`` (patterns/gate_up_silu.py)."""
        g = self.g
        gate = sig.ins[0]
        silu = next((u for u in g.uses(sig.outs[0]) if u.name == "mul" and gate in u.ins), None)
        if silu is None:
            raise Miss("")
        prod = g.only_user(silu.outs[0])
        gd = _dot(g, gate)
        if prod is None or prod.name != "mul" or gd is None:
            raise Miss("")
        up = _other(prod, silu.outs[0])
        ud = _dot(g, up) if up is not None else None
        if ud is None:
            raise Miss("silu(gate) is not multiplied by a matvec")
        if not self._free(gd, ud):
            raise Miss("")
        xg, wg = matvec_of(g, gd)
        xu, wu = matvec_of(g, ud)
        if xg is not xu:
            raise Miss("gate and up read different x")
        if _shape(wg) != _shape(wu):
            raise Miss(f"gate {_shape(wg)} and up {_shape(wu)} weights differ in shape")
        if len(g.uses(gate)) != 2 or len(g.uses(up)) != 1:
            raise Miss("the gate or up product is used elsewhere")
        shape = _shape(prod.outs[0])
        self._claim("gate_up_silu", [sig, silu, prod, gd, ud], prod, [xg, wg, wu],
                    lambda x, a, b: [ops.gate_up_silu(x, a, b).reshape(shape)], x=xg, wg=wg, wu=wu, dots=(gd, ud))

    # ------------------------------------------------------- matvec_residual
    def matvec_residual(self, add: Node) -> None:
        """``r + x @ W.T`` (patterns/matvec_residual.py)."""
        g = self.g
        for r, p in (add.ins, add.ins[::-1]):
            d = _dot(g, p)
            if d is None or d.idx in self.claimed or g.const(r) is not None:
                continue
            src, path = g.peel(r, ("broadcast_in_dim",))
            if path and len(_shape(src)) < len(_shape(r)):
                continue  # a broadcast bias: the matvec pattern's
            try:
                x, w = matvec_of(g, d)
            except Miss as e:
                if str(e).endswith("library GEMM"):
                    raise
                continue
            if _shape(r) != _shape(p) or _dt(r) != _dt(p):
                raise Miss(f"residual {_dt(r)}{_shape(r)} vs product {_dt(p)}{_shape(p)}")
            if len(g.uses(p)) != 1:
                raise Miss("the product is used elsewhere")
            n, k = _shape(w)
            self._claim("matvec_residual", [add, d], add, [x, w, r], lambda xv, wv, rv: [ops.matvec_residual(xv, wv, rv)])
            return
        raise Miss("")

    # ---------------------------------------------------------------- matvec
    def matvec(self, d: Node) -> None:
        """``x @ W.T (+ b)`` (patterns/matvec.py)."""
        g = self.g
        x, w = matvec_of(g, d)
        out = d.outs[0]
        anchor, bias = d, None
        user = g.only_user(out)
        if user is not None and user.name == "add" and user.idx not in self.claimed:
            b, path = g.peel(_other(user, out) or out, ("broadcast_in_dim",))
            if _shape(b) == (_shape(w)[0],) and _dt(b) == _dt(out) and _last_axis_kept(path) and path:
                anchor, bias = user, b
        shape = _shape(anchor.outs[0])
        fields = dict(x=x, w=w, bias=bias, dot=d, out=anchor.outs[0])
        if bias is None:
            self._claim("matvec", [d], d, [x, w], lambda xv, wv: [ops.matvec(xv, wv).reshape(shape)], **fields)
        else:
            self._claim("matvec", [d, anchor], anchor, [x, w, bias],
                        lambda xv, wv, bv: [ops.matvec(xv, wv, bv).reshape(shape)], **fields)

    # ---------------------------------------------------------------- fusion
    def fuse(self) -> None:
        """Norm-fused kernels in place of an rms_norm match and the matches it feeds.

        A norm whose normalized value only the matvecs of other matches read fuses with
        them: the gate / up of one gate_up_silu (``rms_norm_gate_up_silu``), the q / k / v
        matvecs of an attention input (``qkv_rope_cache``) or one matvec
        (``rms_norm_matvec``: the final norm and the lm_head). Another reader of the
        normalized value would need it computed anyway (the norm twice): the unfused
        matches stay, and the reason goes to the report under the fused name."""
        for norm in [m for m in self.matches.values() if m.pattern == "rms_norm"]:
            fed = {}
            for u in self.g.uses(norm["out"]):
                m = self.owner.get(u.idx)
                if m is not None and m.anchor.idx in self.matches and m.fields.get("x") is norm["out"]:
                    fed[m.anchor.idx] = m
            gate_up = [m for m in fed.values() if m.pattern == "gate_up_silu"]
            mvs = [m for m in fed.values() if m.pattern == "matvec"]
            if len(gate_up) == 1:
                name, fuse, fed_by = "rms_norm_gate_up_silu", self._fuse_gate_up, gate_up[0]
            elif len(mvs) == 3 and not gate_up:
                name, fuse, fed_by = "qkv_rope_cache", self._fuse_qkv, mvs
            elif len(mvs) == 1 and not gate_up:
                name, fuse, fed_by = "rms_norm_matvec", self._fuse_head, mvs[0]
            else:
                continue
            try:
                fuse(norm, fed_by)
            except Miss as e:
                if str(e):
                    self.report.fallback(name, norm.anchor.where(), str(e))

    def _fused(self, pattern: str, parts: list, anchor: Node, inputs: list, fn: Callable,
               outs: Optional[list] = None) -> None:
        """One match ``pattern`` in place of the matches ``parts``."""
        for m in parts:
            self._drop(m)
        self._add(Match(pattern, anchor, inputs, fn, [n for m in parts for n in m.nodes], outs=outs))

    def _other_reader(self, a, readers) -> Optional[str]:
        """A reader of ``a`` besides ``readers`` (or the function's output), described."""
        if a in self.g.outvars:
            return "the function's output"
        extra = [u for u in self.g.uses(a) if all(u is not r for r in readers)]
        return extra[0].where() if extra else None

    def _fuse_gate_up(self, norm: Match, gu: Match) -> None:
        """``silu(n @ Wg.T) * (n @ Wu.T)``, n the norm: one ``rms_norm_gate_up_silu``."""
        other = self._other_reader(norm["out"], gu["dots"])
        if other:
            raise Miss(f"the normalized x is also read by {other}: the norm stays, unfused")
        eps, shape = norm["eps"], _shape(gu.anchor.outs[0])
        self._fused("rms_norm_gate_up_silu", [norm, gu], gu.anchor, [norm["x"], norm["w"], gu["wg"], gu["wu"]],
                    lambda x, lw, a, b: [ops.rms_norm_gate_up_silu(x, lw, eps, a, b).reshape(shape)])

    def _fuse_head(self, norm: Match, mv: Match) -> None:
        """``n @ W.T (+ b)``, n the norm (the final norm and the lm_head): one ``rms_norm_matvec``."""
        other = self._other_reader(norm["out"], [mv["dot"]])
        if other:
            raise Miss(f"the normalized x is also read by {other}: the norm stays, unfused")
        eps, shape, bias = norm["eps"], _shape(mv.anchor.outs[0]), mv["bias"]
        inputs = [norm["x"], norm["w"], mv["w"]] + ([bias] if bias is not None else [])
        self._fused("rms_norm_matvec", [norm, mv], mv.anchor, inputs,
                    lambda x, lw, w, *b: [ops.rms_norm_matvec(x, lw, eps, w, *b).reshape(shape)])

    def _fuse_qkv(self, norm: Match, mvs: list) -> None:
        """The attention input, one ``qkv_rope_cache``: three matvecs of the norm, each
        reshaped to heads; two rotated (rope matches) and of those one, k, written with
        the third, v, into static caches by ``dynamic_update_slice``. Rows are written
        where XLA writes them (the update's start clamped into the cache: the kernel's
        own ``cache_pos``), rotated at the rope's position."""
        g = self.g
        ropes = {m["x"]: m for m in self.matches.values() if m.pattern == "rope"}
        branches = []
        for mv in mvs:
            r = next((u for u in g.uses(mv["out"]) if u.name == "reshape" and u.params.get("dimensions") is None),
                     None)
            if r is None:
                raise Miss("")
            branches.append(_Branch(mv, r, ropes.get(r.outs[0])))
        roped = [b for b in branches if b.rope is not None]
        plain = [b for b in branches if b.rope is None]
        if len(roped) != 2 or len(plain) != 1:
            raise Miss("")
        writes = [self._written(b.rope["out"]) for b in roped]
        if writes[0] is not None:
            roped, writes = roped[::-1], writes[::-1]
        (q, k), (v,) = roped, plain
        vw = self._written(v.heads.outs[0])
        if writes[0] is not None or writes[1] is None or vw is None:
            raise Miss("")
        # norm -> q, k, v matvecs, q and k rotated, k and v written into caches: from here
        # on the subgraph is the attention input and a failed condition is reported
        (dk, kpath), (dv, vpath) = writes[1], vw
        m_rows = math.prod(_shape(norm["x"])[:-1])
        qh, kh, vh = (_shape(b.heads.outs[0]) for b in (q, k, v))
        if len(qh) != 3 or qh[0] != m_rows or kh != vh or kh[0] != m_rows or qh[2] != kh[2]:
            raise Miss(f"heads q {qh}, k {kh}, v {vh} are not [M={m_rows}, heads, DH] of one DH")
        row_k, row_v = self._cache_row(dk, kh), self._cache_row(dv, vh)
        if not _same(g, row_k, row_v):
            raise Miss("K and V are written at different rows")
        if not _same(g, q.rope["pos"], k.rope["pos"]):
            raise Miss("q and k are rotated at different positions")
        if (q.rope["kind"], q.rope["scalars"]) != (k.rope["kind"], k.rope["scalars"]):
            raise Miss("q and k are rotated with different frequencies")
        biases = [b.mv["bias"] for b in (q, k, v)]
        has_bias = biases[0] is not None
        if any((b is not None) != has_bias for b in biases):
            raise Miss("some of q, k, v have a bias, some not")
        kc, vc = dk.ins[0], dv.ins[0]
        if {_dt(kc), _dt(vc)} != {_dt(norm["x"])}:
            raise Miss(f"caches {_dt(kc)} / {_dt(vc)} and x {_dt(norm['x'])}: the kernel keeps one storage dtype")
        other = self._other_reader(norm["out"], [b.mv["dot"] for b in branches])
        if other:
            raise Miss(f"the normalized x is also read by {other}: the norm stays, unfused")
        parts = [norm] + [b.mv for b in branches] + [q.rope, k.rope]
        body = [n for m in parts[1:] for n in m.nodes] + [b.heads for b in branches] + kpath + vpath + [dk, dv]
        outs = [q.rope["out"], dk.outs[0], dv.outs[0]]
        leak = _leak(g, body, outs)
        if leak:
            raise Miss(f"an intermediate of q / k / v is also read by {leak}")
        anchor = max((g.prod(o) for o in outs), key=lambda n: n.idx)
        early = [u for o in outs for u in g.uses(o) if u.idx <= anchor.idx]
        if early:
            raise Miss(f"{early[0].where()} reads q or a cache before the last of them is written")
        eps, rope, s_len = norm["eps"], (q.rope["kind"], q.rope["scalars"]), _shape(kc)[2]
        inputs = [norm["x"], norm["w"]] + [b.mv["w"] for b in (q, k, v)] + (biases if has_bias else []) + \
            [q.rope["pos"], row_k, kc, vc]

        def build(x, lw, wq, wk, wv, *rest):
            bq, bk, bv = rest[:3] if has_bias else (None, None, None)
            pv, row, kcv, vcv = rest[-4:]
            pos = jnp.broadcast_to(pv.reshape(()), (m_rows,))
            at = jnp.broadcast_to(jnp.clip(row.reshape(()), 0, s_len - 1), (m_rows,))  # XLA's clamp
            qv, kn, vn = ops.qkv_rope_cache(x, lw, eps, wq, wk, wv, bq, bk, bv, pos, kcv, vcv, rope=rope,
                                            cache_pos=at)
            return [qv.reshape(qh), kn, vn]

        self._fused("qkv_rope_cache", parts, anchor, inputs, build, outs)

    def _written(self, a) -> Optional[tuple]:
        """(dynamic_update_slice, shape ops passed) when ``a`` is the update of a
        ``dynamic_update_slice`` through reshapes and broadcasts that keep its element
        count (so its elements in order: a row inserted as ``k[:, :, None, :]``)."""
        path = []
        while True:
            us = self.g.uses(a)
            dus = next((u for u in us if u.name == "dynamic_update_slice" and u.ins[1] is a), None)
            if dus is not None:
                return dus, path
            nxt = next((u for u in us if u.name in _SHAPE_OPS and u.params.get("dimensions") is None
                        and math.prod(_shape(u.outs[0])) == math.prod(_shape(a))), None)
            if nxt is None:
                return None
            path.append(nxt)
            a = nxt.outs[0]

    def _cache_row(self, dus: Node, heads: tuple):
        """The row index of a one-row write of ``heads`` [M, NKV, DH] into a cache
        [M, NKV, S, DH] at (0, 0, row, 0); else Miss."""
        g = self.g
        cache, upd, *idx = dus.ins
        m, nkv, dh = heads
        cs = _shape(cache)
        if len(cs) != 4 or (cs[0], cs[1], cs[3]) != (m, nkv, dh) or _shape(upd) != (m, nkv, 1, dh):
            raise Miss(f"the write {_shape(upd)} is not one row [M, NKV, 1, DH] of a cache [M, NKV, S, DH] {cs}")
        zeros = [g.const(i) for i in (idx[0], idx[1], idx[3])]
        if any(z is None or int(z) != 0 for z in zeros):
            raise Miss("the cache is not written at (0, 0, row, 0)")
        if math.prod(_shape(idx[2])) != 1:
            raise Miss("the cache row is not one integer")
        return idx[2]


def _same(g: Graph, a, b, depth: int = 8) -> bool:
    """Whether ``a`` and ``b`` are one value: the same, equal constants, or the same
    effect-free equation of the same inputs (each dynamic_update_slice normalizes its
    start index on its own; two such copies are one value)."""
    if a is b:
        return True
    ca, cb = g.const(a), g.const(b)
    if ca is not None or cb is not None:
        return ca is not None and cb is not None and ca.dtype == cb.dtype and ca.shape == cb.shape and \
            bool(np.array_equal(ca, cb))
    na, nb = g.prod(a), g.prod(b)
    if depth == 0 or na is None or nb is None or na.prim is not nb.prim or na.effects or nb.effects or \
            len(na.ins) != len(nb.ins) or na.outs.index(a) != nb.outs.index(b):
        return False
    try:
        if na.params != nb.params:
            return False
    except (TypeError, ValueError):  # params holding arrays: not worth comparing
        return False
    return all(_same(g, x, y, depth - 1) for x, y in zip(na.ins, nb.ins))


def _leak(g: Graph, body: list, exits: list) -> Optional[str]:
    """An equation outside ``body`` (or the function's output) reading a value of
    ``body`` other than ``exits``: a fused kernel would leave it to be computed anyway."""
    inside = {n.idx for n in body}
    for n in body:
        for o in n.outs:
            if any(o is e for e in exits):
                continue
            if o in g.outvars:
                return "the function's output"
            out = next((u for u in g.uses(o) if u.idx not in inside), None)
            if out is not None:
                return out.where()
    return None


def _last_axis_kept(path: list) -> bool:
    """Whether the broadcasts / reshapes in ``path`` keep the last axis last and whole."""
    for p in path:
        out = p.outs[0].aval.shape
        src = p.ins[0].aval.shape
        if p.name == "broadcast_in_dim":
            dims = tuple(p.params["broadcast_dimensions"])
            if src and (not dims or dims[-1] != len(out) - 1 or src[-1] != out[-1]):
                return False
        elif p.name in ("reshape", "squeeze", "expand_dims", "convert_element_type", "stop_gradient"):
            if src and out and src[-1] != out[-1]:
                return False
    return True


# ------------------------------------------------------------------- rope fit


def _kernel_inv_freq(kind: int, dh: int, s: dict) -> np.ndarray:
    """The kernel's fp32 inverse frequencies (suite/rope.py ``inv_freq_tile``)."""
    i = np.arange(dh // 2, dtype=np.float32)
    inv = np.exp2(i * np.float32(-2.0) / np.float32(dh) * np.log2(np.float32(s["theta"]))).astype(np.float32)
    if kind == 1:
        inv = inv / np.float32(s["factor"])
    elif kind == 2:
        old, low, high, factor = (np.float32(s[k]) for k in ("original_max_position", "low_freq_factor",
                                                             "high_freq_factor", "factor"))
        wavelen = np.float32(2 * math.pi) / inv
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen < old / high, inv, np.where(wavelen > old / low, inv / factor, smoothed))
    return inv.astype(np.float32)


def _rope_candidates(inv: np.ndarray, dh: int, theta: float) -> list:
    """Kinds and scalars to try for one theta."""
    factor = float(1.0 / inv[0])
    cands = [(0, {"theta": theta})] if abs(factor - 1) < 1e-6 else [(1, {"theta": theta, "factor": factor})]
    base = _kernel_inv_freq(0, dh, {"theta": theta}).astype(np.float64)
    ratio = inv / base
    low_f = float(base[-1] / inv[-1])
    if low_f > 1 + 1e-6:
        smooth_idx = [i for i, r in enumerate(ratio) if abs(r - 1) > 1e-5 and abs(r * low_f - 1) > 1e-5]
        rw = base / (2 * math.pi)  # 1 / wavelen
        if len(smooth_idx) >= 2:
            s = (ratio[smooth_idx] - 1 / low_f) / (1 - 1 / low_f)
            a, c = np.polyfit(rw[smooth_idx], s, 1)
            low, high = -c / a, (1 - c) / a  # in units of 1/wavelen, for old = 1
            cands.append((2, {"theta": theta, "factor": low_f, "low_freq_factor": low * 1.0,
                              "high_freq_factor": high * 1.0, "original_max_position": 1.0}))
        elif not smooth_idx:
            hi_r = [rw[i] for i, r in enumerate(ratio) if abs(r - 1) <= 1e-5]
            lo_r = [rw[i] for i, r in enumerate(ratio) if abs(r - 1) > 1e-5]
            if hi_r and lo_r and min(hi_r) > max(lo_r):
                edge = math.sqrt(min(hi_r) * max(lo_r))
                cands.append((2, {"theta": theta, "factor": low_f, "low_freq_factor": edge * 0.999,
                                  "high_freq_factor": edge, "original_max_position": 1.0}))
    return cands


def fit_rope(inv: np.ndarray, dh: int, rtol: float = 2e-6) -> tuple | str:
    """(ROPE_KIND, scalars) whose kernel frequencies equal ``inv`` to fp32 rounding, or
    the reason there are none. Default and linear RoPE are read off the first two
    frequencies; llama3's smoothing depends on its constants only through the line
    ``s(1/wavelen)``, fitted from the smoothed frequencies."""
    if inv.size < 2 or inv[0] <= 0 or np.any(inv <= 0):
        return "non-positive inverse frequencies"
    cands = []
    # high frequencies are unscaled in every kind but linear, low ones all scaled alike:
    # the ratio of the first two or of the last two entries gives theta
    thetas = {float((inv[1] / inv[0]) ** (-dh / 2.0))}
    if inv.size >= 3:
        thetas.add(float((inv[-1] / inv[-2]) ** (-dh / 2.0)))
        # a line through all (or the low-frequency half of) log inv: rounding of single
        # entries is amplified by dh/2 in a two-point ratio
        i = np.arange(inv.size)
        for lo in (0, inv.size // 2):
            slope = np.polyfit(i[lo:], np.log(inv[lo:]), 1)[0]
            thetas.add(float(np.exp(-slope * dh / 2.0)))
    for theta in sorted(thetas):
        cands += _rope_candidates(inv, dh, theta)
    for kind, scal in cands:
        got = _kernel_inv_freq(kind, dh, scal).astype(np.float64)
        if np.allclose(got, inv, rtol=rtol, atol=0):
            return kind, {n: float(scal[n]) for n in ROPE_SCALARS[kind]}
    return "the inverse frequencies are not theta**(-2i/DH) (default, linear or llama3 scaled)"


def rewrite(g: Graph, report: Optional[Report] = None) -> tuple[dict, Report]:
    """The replacements for ``g`` and the report of what matched and what did not."""
    report = report or Report("tileflow.jax")
    return Rewriter(g, report).run(), report
