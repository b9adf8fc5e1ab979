"""Rewriting the dynamo graph of a transformers decode step into the fused suite kernels.

Dynamo hands the backend a torch-level FX graph in which a Qwen2 / Llama layer is still
legible line by line (``torch._C._nn.linear``, ``torch.rsqrt``, ``index_copy_`` on the
static cache, ``scaled_dot_product_attention`` with the mask transformers built). Before
inductor sees it, this pass replaces, per layer,

- ``rms_norm`` + q/k/v ``matvec`` + ``rope`` + the cache writes -> ``tileflow::qkv_rope_cache``
  (RoPE from the graph's own ``inv_freq`` at ``position_ids``; rows written at the
  cache's own ``cache_position``, as transformers writes them),
- ``gqa_attention`` (repeat_kv + SDPA over the whole static cache with the causal mask,
  and the padding mask when ``generate`` passes one) -> ``tileflow::gqa_attention``
  over the first ``q_position + 1`` rows with the per-key terms as its key mask, which is
  exactly the set the mask admits,
- ``rms_norm`` + gate/up + ``silu * up`` -> ``tileflow::rms_norm_gate_up_silu``,
- the final ``rms_norm`` + lm_head -> ``tileflow::rms_norm_matvec``.

A step may have B sequences (a left-padded batch: every sequence writes the same cache
row, RoPE at its own position_ids, the padding mask a per-row key mask) and R new tokens
each (a speculative verify step: causal among them); the MLP and head then take the
step's B x R rows, and so do the post-grad pass's linears (``rewrite.py``). MHA
(no repeat_kv) is G = 1.

Every condition is checked on the graph (node kinds, constants, example shapes and
dtypes, and no in-place write between the traced reads and the fused op, ``effects.py``);
anything else stays as traced and the reason goes to the report. The o_proj
and down_proj residual adds are left for the post-grad pass (``rewrite.py``). A
DeepSeek-V2 / V3 graph's SDPA over ``expand_kv``, its routers and grouped experts are
``deepseek_graph.py``'s.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_bool, statically_known_true

from tileflow.integrations.torch import effects
from tileflow.integrations.torch.rewrite import where
from tileflow.patterns import gqa_attention, rms_norm, rope
from tileflow.report import Report
from tileflow.runtime import torch_library  # noqa: F401  (registers torch.ops.tileflow)

_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class NoMatch(Exception):
    """A pattern's condition that does not hold; the message is the reported reason."""


def _fn(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _meth(n, *names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def _ev(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def _symbolic_float(n) -> bool:
    """A float the graph computes, not a constant: under ``torch.compile(dynamic=True)``
    dynamo lifts a module's float attribute (eps, attention_scaling) to an input and reads
    it with ``.item()``."""
    return isinstance(_ev(n), torch.SymFloat)


_SYMBOLIC = ("is symbolic, not a constant (torch.compile(dynamic=True) makes the model's float attributes "
             "graph inputs): compile without dynamic=True")


def _need(cond, reason: str) -> None:
    if not cond:
        raise NoMatch(reason)


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _pair(n: fx.Node, test_a, test_b) -> Optional[tuple]:
    """The two operands of a commutative ``n`` as (a, b) with test_a(a), test_b(b)."""
    if len(n.args) != 2:
        return None
    for a, b in (n.args, n.args[::-1]):
        if test_a(a) and test_b(b):
            return a, b
    return None


def _placeholder(n) -> bool:
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")


# ----------------------------------------------------------------- rms_norm
def match_rms_norm(out: fx.Node) -> tuple[fx.Node, fx.Node, float]:
    """(x, weight, eps) when ``out`` is transformers' RMSNorm of ``x``:
    ``w * (h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)``, ``h = x.to(f32)``."""
    _need(_fn(out, operator.mul), "not a product")
    wc = _pair(out, _placeholder, lambda c: _meth(c, "to"))
    _need(wc, "not weight * normalized")
    w, cast = wc
    prod = cast.args[0]
    _need(_fn(prod, operator.mul), "not h * rsqrt(..)")
    hr = _pair(prod, lambda h: True, lambda r: _fn(r, torch.rsqrt))
    _need(hr, "no rsqrt")
    h, r = hr
    add = r.args[0]
    is_add = _fn(add, operator.add)
    _need(not (is_add and _pair(add, lambda v: _meth(v, "mean"), _symbolic_float)), f"eps {_SYMBOLIC}")
    ve = _pair(add, lambda v: _meth(v, "mean"), lambda e: isinstance(e, float)) if is_add else None
    _need(ve, "rsqrt of something other than mean + eps")
    mean, eps = ve
    dims = _arg(mean, 1, "dim")
    _need(dims in (-1, [-1], (-1,)) and _arg(mean, 2, "keepdim", False) is True, "not a mean over the last axis")
    pw = mean.args[0]
    _need(_meth(pw, "pow") and pw.args[0] is h and pw.args[1] == 2, "not a mean of squares of h")
    _need(_meth(h, "to", "float") and (h.target == "float" or torch.float32 in h.args[1:]
                                       or h.kwargs.get("dtype") == torch.float32), "h is not x in float32")
    x = h.args[0]
    xv, wv, ov = _ev(x), _ev(w), _ev(out)
    _need(xv is not None and wv is not None and ov is not None, "no example values")
    _need(xv.dtype in _DTYPES and xv.dtype == wv.dtype == ov.dtype, f"dtypes x {xv.dtype}, weight {wv.dtype}")
    _need(cast.args[1:] == (xv.dtype,) or cast.kwargs.get("dtype") == xv.dtype, "cast back to another dtype")
    _need(wv.dim() == 1 and wv.shape[0] == xv.shape[-1], "weight is not [hidden]")
    return x, w, float(eps)


def _same(a, b) -> bool:
    """Sizes equal without adding a guard: equal ints, or SymInts of one expression."""
    return statically_known_true(a == b)


def _step_rows(x: fx.Node, rows: tuple) -> None:
    """NoMatch unless ``x`` [..., D] holds one decode row, or the (batch, new tokens)
    rows of this step's matched attention (``rows``): a prefill keeps its GEMMs."""
    xv = _ev(x)
    _need(xv is not None, "no example value")
    lead = tuple(xv.shape[:-1])
    if all(_same(d, 1) for d in lead):
        return
    _need(rows and len(lead) == 2 and _same(lead[0], rows[0]) and _same(lead[1], rows[1]),
          f"{tuple(xv.shape)}: not one decode row, nor the rows of a decode step's matched attention")


def _no_writes_inside(outs: list, inputs: list, until: fx.Node, allowed=()) -> None:
    """NoMatch when a node from the pattern's first node up to ``until`` (where the fused
    op reads its inputs) may write memory the pattern reads: the fused op would read it
    at another moment than the traced code did."""
    inputs = [n for n in inputs if isinstance(n, fx.Node)]
    stop, region, todo = set(inputs), set(), list(outs)
    while todo:
        n = todo.pop()
        if isinstance(n, fx.Node) and n not in region and n not in stop and n.op not in ("placeholder", "get_attr"):
            region.add(n)
            todo += n.all_input_nodes
    nodes = list(until.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    targets = region | stop
    keys = {effects.storage(t) for t in targets} - {None}
    for n in nodes[min(order[r] for r in region | {until}):order[until]]:
        if n not in allowed and effects.writes_any(n, targets, keys):
            raise NoMatch(f"{n.name} writes in place what the pattern reads")


# ------------------------------------------------------------ rope, q/k/v
def _heads(n: fx.Node, rows: tuple) -> tuple[fx.Node, fx.Node, Optional[fx.Node]]:
    """(input, weight, bias) of ``linear(x, W, b).view(B, R, -1, dh).transpose(1, 2)``
    with ``x`` [B, R, D]: row (b, r) of ``x`` is row b * R + r of the fused op's input."""
    _need(_meth(n, "transpose") and sorted(n.args[1:3]) == [1, 2], "projection not transposed to heads")
    view = n.args[0]
    _need(_meth(view, "view", "reshape"), "projection not viewed as heads")
    lin = view.args[0]
    _need(_fn(lin, *_LINEARS), "heads do not come from a linear")
    x, w = lin.args[:2]
    b = _arg(lin, 2, "bias")
    _need(_placeholder(w) and (b is None or _placeholder(b)), "linear weight / bias not parameters")
    xv, vv = _ev(x), _ev(view)
    _need(xv is not None and vv is not None and xv.dim() == 3 and vv.dim() == 4
          and all(_same(a, e) for a, e in zip((*xv.shape[:2], *vv.shape[:2]), rows * 2)),
          "the projection's rows are not [batch, new tokens] of the queries")
    return x, w, b


def _strip(n, methods=("float", "to", "expand", "contiguous")):
    """Through dtype casts, broadcasts and ``[None, :, None]``-style indexing."""
    while True:
        if _meth(n, *methods):
            if n.target == "to":
                _need(all(a in (torch.float32,) or isinstance(a, torch.device) for a in n.args[1:])
                      and n.kwargs.get("dtype", torch.float32) == torch.float32, "cast to a non-fp32 dtype")
            n = n.args[0]
        elif _fn(n, operator.getitem) and isinstance(n.args[1], tuple) and all(
                i is None or i is Ellipsis or i == slice(None) for i in n.args[1]):
            n = n.args[0]
        else:
            return n


def match_cos_sin(cos_u: fx.Node, sin_u: fx.Node, dh: int) -> tuple[fx.Node, fx.Node]:
    """(position_ids, inv_freq) when cos / sin are transformers' rotary tables:
    ``cos(cat(f, f)) * 1.0`` cast, unsqueezed on the head axis, ``f = pos * inv_freq``."""
    embs = []
    for n, fn in ((cos_u, "cos"), (sin_u, "sin")):
        _need(_meth(n, "unsqueeze") and n.args[1:] == (1,), "cos/sin not broadcast over heads")
        n = n.args[0]
        if _meth(n, "to"):
            n = n.args[0]
        if _fn(n, operator.mul):
            _need(not _pair(n, lambda t: _meth(t, fn), _symbolic_float),
                  f"the {fn} table's scale (attention_scaling) {_SYMBOLIC}")
            ts = _pair(n, lambda t: _meth(t, fn), lambda s: isinstance(s, (int, float)))
            _need(ts, f"{fn} table scaled by a tensor")
            _need(ts[1] == 1.0, f"attention_scaling {ts[1]} (the kernel applies none)")
            n = ts[0]
        _need(_meth(n, fn), f"no {fn}")
        embs.append(n.args[0])
    emb = embs[0]
    _need(emb is embs[1], "cos and sin of different angles")
    _need(_fn(emb, torch.cat) and len(emb.args[0]) == 2 and emb.args[0][0] is emb.args[0][1]
          and _arg(emb, 1, "dim", 0) in (-1, 2), "angles are not cat(f, f)")
    freqs = emb.args[0][0]
    if _meth(freqs, "transpose"):  # (inv_freq[None, :, None] @ pos[:, None, :]).transpose(1, 2)
        mm = freqs.args[0]
        _need(sorted(freqs.args[1:3]) == [1, 2] and _fn(mm, operator.matmul), "angles not inv_freq @ positions")
        inv, pos = _strip(mm.args[0]), _strip(mm.args[1])
    else:  # pos[..., None].float() * inv_freq
        _need(_fn(freqs, operator.mul), "angles are not positions * inv_freq")
        a, b = (_strip(x) for x in freqs.args)
        inv, pos = (a, b) if _ev(a) is not None and _ev(a).is_floating_point() else (b, a)
    iv, pv = _ev(inv), _ev(pos)
    # a model cast to bf16 carries a bf16 inv_freq that the graph widens to fp32: the
    # kernel reads the same widened values (the rewrite inserts that exact cast)
    _need(_placeholder(inv) and iv is not None and iv.is_floating_point() and tuple(iv.shape) == (dh // 2,),
          "inv_freq is not a buffer of head_dim / 2 frequencies")
    _need(pos.op == "placeholder" and pv is not None and pv.dtype == torch.int64 and pv.dim() == 2,
          "positions are not an int64 position_ids input [batch, tokens]")
    return pos, inv


def match_rope(n: fx.Node, dh: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(x, cos_u, sin_u) when ``n = x * cos + cat(-x[..., h:], x[..., :h]) * sin``."""
    _need(_fn(n, operator.add), "not a sum")
    half = dh // 2
    for a, b in (n.args, n.args[::-1]):
        if not (_fn(a, operator.mul) and _fn(b, operator.mul)):
            continue
        for x, c in (a.args, a.args[::-1]):
            for rot, s in (b.args, b.args[::-1]):
                if _fn(rot, torch.cat) and len(rot.args[0]) == 2 and _arg(rot, 1, "dim", 0) == -1:
                    neg, x1 = rot.args[0]
                    if (_fn(neg, operator.neg) and _fn(x1, operator.getitem) and _fn(neg.args[0], operator.getitem)
                            and x1.args[0] is x and neg.args[0].args[0] is x
                            and x1.args[1] == (Ellipsis, slice(None, half, None))
                            and neg.args[0].args[1] == (Ellipsis, slice(half, None, None))):
                        return x, c, s
    raise NoMatch("not x * cos + rotate_half(x) * sin")


# ------------------------------------------------------------- attention
def _cache_read(n: fx.Node) -> fx.Node:
    """The cache tensor under repeat_kv (``kv[:, :, None].expand(..).reshape(..)``), or
    the cache itself (MHA: transformers' repeat_kv returns it unchanged)."""
    if _meth(n, "reshape"):
        _need(_meth(n, "reshape"), "keys are not repeat_kv of the cache")
        ex = n.args[0]
        _need(_meth(ex, "expand"), "keys are not repeat_kv of the cache")
        gi = ex.args[0]
        _need(_fn(gi, operator.getitem) and gi.args[1] == (slice(None), slice(None), None, slice(None), slice(None)),
              "repeat_kv indexes the cache differently")
        n = gi.args[0]
    _need(n.op == "placeholder", "keys are not the static cache tensor")
    return n


def _cache_write(cache: fx.Node, before: fx.Node) -> fx.Node:
    """The one ``cache.index_copy_(2, cache_position, new)`` of this cache before ``before``."""
    writes = [u for u in cache.users if _meth(u, "index_copy_")]
    _need(len(writes) == 1 and writes[0].args[1] == 2, "the cache is not written once by index_copy_ on axis 2")
    order = {n: i for i, n in enumerate(cache.graph.nodes)}
    _need(order[writes[0]] < order[before], "the cache is written after it is read")
    others = [u for u in cache.users if u is not writes[0] and order[u] < order[writes[0]]]
    _need(not others, "the cache is read before it is written")
    return writes[0]


def _conjuncts(n) -> list:
    """The terms of an ``a & b & ...`` tree, through device moves and ``new_ones`` (True)."""
    if _meth(n, "to") and all(isinstance(a, torch.device) for a in n.args[1:]) and set(n.kwargs) <= {"device"}:
        return _conjuncts(n.args[0])
    if _fn(n, operator.and_):
        return _conjuncts(n.args[0]) + _conjuncts(n.args[1])
    if _meth(n, "new_ones") and _ev(n) is not None and _ev(n).dim() == 0:
        return []
    return [n]


def _causal(term, capacity: int, rows=1) -> fx.Node:
    """The query-position node ``q`` [R] when ``term`` is ``arange(S)[kv] <= q``,
    ``q = arange(R) + offset``: row i sees the first ``offset + i + 1`` keys."""
    _need(_fn(term, operator.le), "a mask term that is neither causal nor per key")
    kv, q = (_strip(a, ()) for a in term.args)
    if _fn(kv, operator.add):
        _need(kv.args[1] == 0, "keys offset from 0")
        kv = kv.args[0]
    _need(_fn(kv, torch.arange) and kv.args[:1] == (capacity,) and len(kv.args) == 1,
          "the mask's key positions are not arange(cache length)")
    n = q.args[0].args[0] if _fn(q, operator.add) and _fn(q.args[0], torch.arange) and len(q.args[0].args) == 1 \
        else None
    _need(n is not None and _same(_ev(n) if isinstance(n, fx.Node) else n, rows),
          f"the mask's query positions are not arange({rows}) + offset")
    return q


def match_mask(mask, capacity: int, batch: int = 1, rows=1) -> tuple[Optional[fx.Node], list]:
    """(q, key_terms) when ``mask`` is ``(arange(S)[kv] <= q) & key_terms...`` expanded,
    each key term a bool tensor of one query row per sequence ([1 or B, 1, 1, S], e.g.
    transformers' padding mask): the admitted rows are then exactly ``j < q[i] + 1`` with
    every key term set. (None, [mask]) when the mask is such a row alone, one query a
    sequence (``generate`` builds it before the compiled step and passes it in): every
    row of the cache, hidden where it says."""
    _need(mask is not None, "no mask (is_causal or no cache)")
    if _meth(mask, "expand"):
        mask = mask.args[0]
    causal, keys = [], []
    for term in _conjuncts(mask):
        tv = _ev(term)
        if _fn(term, operator.le):
            causal.append(term)
        else:
            _need(tv is not None and tv.dtype == torch.bool and tv.dim() == 4 and tv.shape[0] in (1, batch)
                  and tuple(tv.shape[1:]) == (1, 1, capacity), "a mask term that is neither causal nor per key")
            keys.append(term)
    _need(len(causal) <= 1, "the mask has several causal terms")
    _need(causal or keys, "an empty mask")
    _need(causal or _same(rows, 1), f"{rows} queries a sequence under a mask built outside the graph: "
                                    "the kernel's causal rows cannot be checked against it")
    return (_causal(causal[0], capacity, rows) if causal else None), keys


def _new_rows(r) -> bool:
    """Whether ``r`` new tokens a sequence are a decode or verify step's, not a prefill's.
    A symbolic count (dynamo made it dynamic after seeing several) is bounded by a guard:
    a longer call recompiles, and that graph's attention stays as traced."""
    if isinstance(r, torch.SymInt):
        return guard_bool(r <= gqa_attention.MAX_ROWS)
    return r <= gqa_attention.MAX_ROWS


def match_row_mask(mask, capacity: int, batch: int, rows) -> Optional[fx.Node]:
    """The mask when it is a bool graph input [1 or B, 1, R, S] for R > 1 new tokens
    (``generate`` builds the verify step's mask before the compiled call): its last row
    is the key mask and the kernel's causal rows the rest, which the rewrite asserts."""
    if mask is None or _same(rows, 1):
        return None
    if _meth(mask, "expand"):
        mask = mask.args[0]
    mv = _ev(mask)
    if not (_placeholder(mask) and mv is not None and mv.dtype == torch.bool and mv.dim() == 4):
        return None
    ok = mv.shape[0] in (1, batch) and mv.shape[1] == 1 and _same(mv.shape[2], rows) and mv.shape[3] == capacity
    return mask if ok else None


def match_attention(sdpa: fx.Node) -> dict:
    q, key, value = sdpa.args[:3]
    mask = _arg(sdpa, 3, "attn_mask")
    _need(_arg(sdpa, 4, "dropout_p", 0.0) == 0.0, "dropout")
    _need(not _arg(sdpa, 5, "is_causal", False), "is_causal with a cache")
    qv, kv = _ev(q), _ev(key)
    _need(qv is not None and qv.dim() == 4, "queries are not [batch, heads, tokens, head_dim]")
    b, nh, r, dh = qv.shape
    _need(all(isinstance(d, int) for d in (b, nh, dh)), "a symbolic batch or head size")
    _need(_new_rows(r), f"{r} queries a sequence: more than a verify step's {gqa_attention.MAX_ROWS} "
                        "(a prefill keeps its attention)")
    rows = (b, r)
    xq, cos_u, sin_u = match_rope(q, dh)
    xn, wq, bq = _heads(xq, rows)
    k_cache = _cache_read(key)
    v_cache = _cache_read(value)
    kcv = _ev(k_cache)
    _need(kcv is not None and kcv.dim() == 4 and kcv.shape[0] == b and kcv.shape[3] == dh
          and nh % kcv.shape[1] == 0, "cache shape")
    nkv, capacity = kcv.shape[1], kcv.shape[2]
    _need(tuple(kv.shape) in ((b, nh, capacity, dh), (b, nkv, capacity, dh)), "keys are not the whole cache")
    wk_, wv_ = _cache_write(k_cache, sdpa), _cache_write(v_cache, sdpa)
    _need(wk_.args[2] is wv_.args[2], "K and V written at different positions")
    xk, cos_k, sin_k = match_rope(wk_.args[3], dh)
    _need(cos_k is cos_u and sin_k is sin_u, "q and k rotated by different tables")
    xk_in, wk, bk = _heads(xk, rows)
    xv_in, wv, bv = _heads(wv_.args[3], rows)
    _need(xn is xk_in is xv_in, "q, k, v projections of different inputs")
    _need((bq is None) == (bk is None) == (bv is None), "some projections have biases, some not")
    pos, inv_freq = match_cos_sin(cos_u, sin_u, dh)
    pv = _ev(pos)
    _need(pv.shape[0] in (1, b) and _same(pv.shape[1], r), "position_ids are not [batch or 1, new tokens]")
    row_mask = match_row_mask(mask, capacity, b, r)
    qpos, key_terms = (None, [row_mask]) if row_mask is not None else match_mask(mask, capacity, b, r)
    x, ln_w, eps = match_rms_norm(xn)
    _step_rows(x, rows)
    dtypes = {_ev(t).dtype for t in (x, wq, wk, wv, k_cache, v_cache)}
    _need(len(dtypes) == 1, f"mixed dtypes {sorted(map(str, dtypes))}")
    scale = _arg(sdpa, 6, "scale")
    _need(scale is None or isinstance(scale, float), "the scale is not a constant")
    cache_pos = wk_.args[2]
    cv = _ev(cache_pos)
    # one cache row a token for every sequence of the batch, as StaticLayer writes them
    _need(cv is not None and cv.dtype == torch.int64 and cv.dim() == 1 and _same(cv.shape[0], r),
          "cache positions are not one int64 row a new token")
    reads = [x, ln_w, wq, wk, wv, bq, bk, bv, pos, inv_freq, cache_pos, k_cache, v_cache, qpos, *key_terms]
    _no_writes_inside([sdpa, wk_, wv_], reads, sdpa, allowed=(wk_, wv_))
    return dict(x=x, ln_w=ln_w, eps=eps, wq=wq, wk=wk, wv=wv, bq=bq, bk=bk, bv=bv, pos=pos, inv_freq=inv_freq,
                cache_pos=cache_pos, k_cache=k_cache, v_cache=v_cache, writes=(wk_, wv_), qpos=qpos, key_terms=key_terms,
                scale=dh ** -0.5 if scale is None else scale, nh=nh, dh=dh, batch=b, rows=r,
                row_mask=row_mask)


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    return graph.call_function(target, tuple(args))


def _rows(graph, x: fx.Node) -> fx.Node:
    """``x`` [..., D] as the fused ops' [M, D] rows (batch-major, then token)."""
    return graph.call_method("reshape", (x, (-1, _ev(x).shape[-1])))


def _per_row(graph, t: fx.Node, batch: int, shared: bool) -> fx.Node:
    """A [tokens] (``shared``: one for all sequences) or [1 or B, tokens] tensor as the
    fused op's [B * tokens] per-row values."""
    if shared:
        t = graph.call_method("reshape", (t, (1, -1)))
    if batch > 1 and (shared or _ev(t).shape[0] == 1):
        t = graph.call_method("expand", (t, (batch, -1)))
    return graph.call_method("reshape", (t, (-1,)))


def _rewrite_attention(graph: fx.Graph, sdpa: fx.Node, m: dict, lengths_of: dict) -> None:
    """``lengths_of`` keeps each query position's ``q + 1`` across layers: computed per
    layer it was a one-element inductor kernel in every layer (AOT's CSE did not merge
    them), breaking the layer's chain of dependent launches."""
    tf = torch.ops.tileflow
    b, one = m["batch"], isinstance(m["rows"], int) and m["rows"] == 1
    first = next(n for n in graph.nodes if n in m["writes"])
    with graph.inserting_before(first):
        x2 = _rows(graph, m["x"])
        pos = _per_row(graph, m["pos"], b, shared=False)
        # StaticLayer writes token i of every sequence at the same cache row
        cpos = _per_row(graph, m["cache_pos"], b, shared=True)
        inv = graph.call_method("to", (m["inv_freq"], torch.float32))
        q = _call(graph, tf.qkv_rope_cache.default, x2, m["ln_w"], m["eps"], m["wq"], m["wk"], m["wv"], m["bq"],
                  m["bk"], m["bv"], pos, cpos, inv, m["k_cache"], m["v_cache"])
    with graph.inserting_before(sdpa):
        kc = _ev(m["k_cache"])
        if m["row_mask"] is not None:
            # the cache holds lengths rows after this step's writes: the last new row sees them all
            last = _call(graph, operator.getitem, m["cache_pos"], slice(-1, None))
            lengths = _call(graph, operator.add, last, 1)
            if b > 1:
                lengths = graph.call_method("expand", (lengths, (b,)))
        elif m["qpos"] is not None:
            key = (m["qpos"], b)
            lengths = lengths_of.get(key)
            if lengths is None:
                # the last new row sees keys j <= its position; the kernel's row i sees lengths - R + 1 + i
                last = m["qpos"] if one else _call(graph, operator.getitem, m["qpos"], slice(-1, None))
                lengths = _call(graph, operator.add, last, 1)
                if b > 1:
                    lengths = graph.call_method("expand", (lengths, (b,)))
                lengths_of[key] = lengths
        else:  # a mask from outside the graph: every row, the key mask decides
            key = ("every row", b, kc.shape[2], kc.device)
            lengths = lengths_of.get(key)
            if lengths is None:
                lengths = lengths_of[key] = graph.call_function(torch.full, ((b,), kc.shape[2]),
                                                                {"dtype": torch.int64, "device": kc.device})
        key_mask = None
        if m["row_mask"] is not None:
            # the kernel's causal rows over the last row, checked against the mask in the step
            key_mask = _call(graph, tf.row_mask_keys.default, m["row_mask"], lengths)
        for term in ([] if m["row_mask"] is not None else m["key_terms"]):
            key_mask = term if key_mask is None else _call(graph, operator.and_, key_mask, term)
        if key_mask is not None and m["row_mask"] is None:
            key_mask = graph.call_method("reshape", (key_mask, (-1, kc.shape[2])))
            if b > 1 and all(_ev(t).shape[0] == 1 for t in m["key_terms"]):
                key_mask = graph.call_method("expand", (key_mask, (b, -1)))
            key_mask = graph.call_method("to", (key_mask, torch.int32))
        if one:
            o = _call(graph, tf.gqa_attention.default, q, m["k_cache"], m["v_cache"], lengths, m["scale"], key_mask)
            out = graph.call_method("view", (o, (b, m["nh"], 1, m["dh"])))
        else:  # q [B, R, NH, DH]: the kernel's R causal rows; SDPA's layout is [B, NH, R, DH]
            q4 = graph.call_method("view", (q, (b, -1, m["nh"], m["dh"])))
            o = _call(graph, tf.gqa_attention.default, q4, m["k_cache"], m["v_cache"], lengths, m["scale"], key_mask)
            out = graph.call_method("transpose", (o, 1, 2))
    sdpa.replace_all_uses_with(out)
    graph.erase_node(sdpa)
    for w in m["writes"]:
        graph.erase_node(w)


# ------------------------------------------------------------------ MLP, head
def match_gate_up(mul: fx.Node, rows: tuple = ()) -> dict:
    _need(_fn(mul, operator.mul), "not a product")
    gu = _pair(mul, lambda s: _fn(s, torch.nn.functional.silu) and _fn(s.args[0], *_LINEARS),
               lambda u: _fn(u, *_LINEARS))
    _need(gu, "not silu(gate(x)) * up(x)")
    gate, up = gu[0].args[0], gu[1]
    _need(len(gu[0].users) == 1 and not _arg(gu[0], 1, "inplace", False), "silu reused")
    _need(gate.args[0] is up.args[0], "gate and up of different inputs")
    _need(all(_arg(n, 2, "bias") is None and _placeholder(n.args[1]) for n in (gate, up)), "biases or non-weights")
    x, ln_w, eps = match_rms_norm(gate.args[0])
    _step_rows(x, rows)
    _no_writes_inside([mul], [x, ln_w, gate.args[1], up.args[1]], mul)
    return dict(x=x, ln_w=ln_w, eps=eps, wg=gate.args[1], wu=up.args[1])


def match_head(lin: fx.Node, rows: tuple = ()) -> dict:
    _need(_fn(lin, *_LINEARS) and _arg(lin, 2, "bias") is None and _placeholder(lin.args[1]), "not a bias-free linear")
    n, keep = lin.args[0], None
    if _fn(n, operator.getitem):  # logits_to_keep's slice of the token axis
        keep = n.args[1]
        same = all(_same(a, b) for a, b in zip(_ev(n).shape, _ev(n.args[0]).shape))
        tokens_only = (isinstance(keep, tuple) and len(keep) == 3 and keep[0] == keep[2] == slice(None)
                       and isinstance(keep[1], slice))
        _need(same or (rows and tokens_only), "a slice that drops rows")
        keep = None if same else keep  # the norm is per row: slicing its input slices its output
        n = n.args[0]
    x, ln_w, eps = match_rms_norm(n)
    _step_rows(x, rows)
    _no_writes_inside([lin], [x, ln_w, lin.args[1]], lin)
    return dict(x=x, ln_w=ln_w, eps=eps, w=lin.args[1], keep=keep)


def _replace_norm_fused(graph: fx.Graph, node: fx.Node, target, m: dict, weights: tuple) -> None:
    """``node`` -> ``target(x rows, norm weight, eps, *weights)`` viewed to ``node``'s shape."""
    shape = tuple(_ev(node).shape)
    if not all(isinstance(d, int) for d in shape):  # [B, tokens, N], the tokens symbolic
        shape = (shape[0], -1, shape[2])
    with graph.inserting_before(node):
        x = m["x"]
        if m.get("keep") is not None:
            x = _call(graph, operator.getitem, x, m["keep"])
        rows = graph.call_method("reshape", (x, (-1, _ev(m["x"]).shape[-1])))
        y = _call(graph, target, rows, m["ln_w"], m["eps"], *weights)
        out = graph.call_method("view", (y, shape))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def rewrite_decode_graph(gm: fx.GraphModule, report: Report, architectures=()) -> tuple:
    """Apply the dynamo-level decode patterns to ``gm`` in place; record what happened.
    Returns the step's (batch, new tokens) when its attention matched with more than one
    row (the linears the post-grad pass may then take), else ().

    ``architectures``: passes of other decoder layouts, built on this module's matchers
    (``deepseek_graph``), each with ``takes_attention(sdpa)``, ``rewrite_attention(graph,
    sdpa, report, lengths_of)`` (the step's (batch, rows) or None) and ``rewrite_mlp(graph,
    report, rows, attentions)``, run before the gate_up patterns."""
    graph, tf = gm.graph, torch.ops.tileflow
    lengths_of: dict = {}
    steps = []  # (batch, new tokens) of each matched attention: the step's rows
    taken = {a: 0 for a in architectures}  # each architecture's attentions matched
    for node in list(graph.nodes):
        if not _fn(node, *_SDPA):
            continue
        arch = next((a for a in architectures if a.takes_attention(node)), None)
        if arch is not None:
            step = arch.rewrite_attention(graph, node, report, lengths_of)
            if step is not None:
                steps.append(step)
                taken[arch] += 1
            continue
        try:
            m = match_attention(node)
        except NoMatch as e:
            report.fallback(gqa_attention.NAME, where(node), str(e))
            continue
        _rewrite_attention(graph, node, m, lengths_of)
        steps.append((m["batch"], m["rows"]))
        for name, n in ((rms_norm.NAME, 1), (rope.NAME, 1), (gqa_attention.NAME, 1), ("matvec", 3)):
            report.match(name, n)
    # more than one row a step only where every matched attention agrees on them
    rows = steps[0] if steps and all(_same(s[0], steps[0][0]) and _same(s[1], steps[0][1]) for s in steps) else ()
    for arch in architectures:
        arch.rewrite_mlp(graph, report, rows, taken[arch])
    _drop_dead(graph)  # the replaced experts' silu * up is gone before the gate_up patterns look
    for node in list(graph.nodes):
        if _fn(node, operator.mul) and any(_fn(a, torch.nn.functional.silu) for a in node.args):
            try:
                m = match_gate_up(node, rows)
            except NoMatch as e:
                report.fallback("gate_up_silu", where(node), str(e))
                continue
            _replace_norm_fused(graph, node, tf.rms_norm_gate_up_silu.default, m, (m["wg"], m["wu"]))
            report.match(rms_norm.NAME)
            report.match("gate_up_silu")
    outputs = [n for n in graph.nodes if n.op == "output"]
    for node in list(graph.nodes):
        if _fn(node, *_LINEARS) and _ev(node) is not None and any(node in o.all_input_nodes for o in outputs):
            try:
                m = match_head(node, rows)
            except NoMatch as e:
                report.fallback(rms_norm.NAME, where(node), f"final norm + lm_head: {e}")
                continue
            _replace_norm_fused(graph, node, tf.rms_norm_matvec.default, m, (m["w"],))
            report.match(rms_norm.NAME)
            report.match("matvec")
    _batch_cache_counters(graph, report)
    _drop_dead(graph)
    gm.recompile()
    return rows


def _counter_increment(c: fx.Node) -> Optional[fx.Node]:
    """The one ``c.add_(n)`` (int ``n``, result unused) of a 0-d int64 graph input ``c``,
    as ``StaticLayer.update`` counts tokens, or None."""
    ev = _ev(c)
    if c.op != "placeholder" or not isinstance(ev, torch.Tensor) or ev.dim() != 0 or ev.dtype != torch.int64:
        return None
    adds = [u for u in c.users if _meth(u, "add_")]
    if len(adds) != 1:
        return None
    a = adds[0]
    ok = a.args[0] is c and len(a.args) == 2 and type(a.args[1]) is int and not a.kwargs and not a.users
    return a if ok else None


def _reads(c: fx.Node, increment: fx.Node) -> list:
    """Every use of ``c`` but ``increment``, directly or through views of it (``c.to(..)``
    may return ``c`` itself)."""
    key, uses, todo = effects.storage(c), [], [c]
    while todo:
        for u in todo.pop().users:
            if u is not increment and u not in uses:
                uses.append(u)
                if u.op != "output" and key is not None and effects.storage(u) == key:
                    todo.append(u)
    return uses


def _batch_cache_counters(graph: fx.Graph, report: Report) -> None:
    """Every layer's cache counter read and advanced by one op at the top of the step.

    Traced, each layer computes its write row ``arange(1) + counter`` and then
    ``counter.add_(1)``: one small inductor kernel a layer, which breaks the chain of
    dependent launches between that layer's kernels. When every read of every counter
    comes before its increment and all increments are equal, ``cache_rows_advance``
    returns the counters' values before the step (one [layers] tensor) and advances
    them; each ``arange(1) + counter`` becomes a one-row slice of that tensor and any
    other read its element: the same values, as the reads happened before the adds."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    counters = [(c, a) for c in nodes for a in [_counter_increment(c)] if a is not None]
    if len(counters) < 2:
        return
    steps = {a.args[1] for _, a in counters}
    devices = {_ev(c).device for c, _ in counters}
    for c, a in counters:
        uses = _reads(c, a)
        late = [u for u in uses if order[u] > order[a]]
        mutating = [u for u in uses if u.op == "output" or not effects.is_functional(u)]
        if late or mutating or len(steps) != 1 or len(devices) != 1:
            why = ("a read after the increment" if late else "another use that mutates or returns it" if mutating
                   else "increments or devices differ")
            report.fallback("cache_counters", where(a), f"counters kept per layer: {why}")
            return
    # the rows of the caches the step writes: a step past them raises before writing
    caches = [_ev(n.args[12]) for n in nodes if n.target is torch.ops.tileflow.qkv_rope_cache.default]
    caches += [_ev(n.args[2]) for n in nodes if n.target is torch.ops.tileflow.mla_attention.default]
    capacity = min((t.shape[2] for t in caches if isinstance(t, torch.Tensor)), default=-1)
    last_input = [n for n in nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        rows = graph.call_function(torch.ops.tileflow.cache_rows_advance.default,
                                   ([c for c, _ in counters], steps.pop(), capacity))
    for i, (c, a) in enumerate(counters):
        graph.erase_node(a)
        for u in list(c.users):
            if u is rows:
                continue
            other = (u.args[1] if u.args[0] is c else u.args[0]) if len(u.args) == 2 else None
            if (_fn(u, operator.add) and not u.kwargs and _fn(other, torch.arange) and other.args == (1,)
                    and _ev(u) is not None and _ev(u).dtype == torch.int64):
                with graph.inserting_before(u):
                    row = graph.call_function(operator.getitem, (rows, slice(i, i + 1)))
                u.replace_all_uses_with(row)
                graph.erase_node(u)
            else:
                with graph.inserting_before(u):
                    elem = graph.call_function(operator.getitem, (rows, i))
                u.replace_input_with(c, elem)
    report.match("cache_counters", len(counters))


def _drop_dead(graph: fx.Graph) -> None:
    """Remove what the rewrite left unused: only functional calls (``effects``), never an
    in-place op, an ``out=`` call or one whose effects are unknown. Not FX's
    ``eliminate_dead_code``: it counts every torch-level call as pure."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.users or node.op not in ("call_function", "call_method") or not effects.is_functional(node):
                continue
            graph.erase_node(node)
            changed = True
