"""The DeepSeek-V2 / V3 parts of a dynamo decode graph -> the suite's MLA and MoE kernels.

Under transformers 5.25 dynamo traces a DeepSeek one-token decode step (static cache,
``experts_implementation="grouped_mm"``, the default) as one graph: no graph break, no
data-dependent shape (the grouped experts sort the K choices and run every expert's
group, sized by ``histc``). Per layer, this pass replaces

- MLA attention: ``expand_kv`` (``kv_b_proj`` over the whole latent cache, split into
  per-head ``k_nope`` / values, the rope key broadcast, both copied into a new key
  buffer) + SDPA with the causal mask -> ``tileflow::mla_attention`` (absorbed, over
  the first ``q_position + 1`` latent rows, the mask's per-key terms as its key mask);
  where the query's rope part is rotated in one of the latent write's three rope forms
  (below) at ``position_ids``, mla_attention takes it unrotated and rotates it itself
  (``ROPE_Q``, reported as ``mla_query_rope``) and the traced rotation is dropped as dead,
- the latent cache write: ``kv_a_proj_with_mqa``, split into the latent (``kv_a_layernorm``)
  and the rope key (rotated in one of three forms: DeepSeek-V2's complex product with
  ``freqs_cis``, V3's rotate-half (``rope_interleave=False``) and interleaved pairs), each
  ``index_copy_``'d at the cache's count -> ``tileflow::mla_latent_cache`` (``CACHE_POS``:
  rotated at ``position_ids`` from the graph's ``inv_freq`` and attention factor, written
  at the graph's row),
- (q_lora_rank) ``q_a_layernorm`` + ``q_b_proj`` -> ``tileflow::rms_norm_matvec``,
- the router (V2 ``greedy`` / ``group_limited_greedy`` softmax, V3 ``noaux_tc`` sigmoid
  with its correction bias, groups, normalisation, scaling) -> ``tileflow::moe_router``,
- the grouped experts (sort, ``grouped_mm`` of ``gate_up_proj``, ``silu(gate) * up``,
  ``grouped_mm`` of ``down_proj``, routing weights, unsort, sum over the K choices)
  -> ``tileflow::moe_experts``;

the dense MLP / shared experts, the final norm + lm_head (``decode_graph``) and the
linears and residual adds (``rewrite.py``) are the existing patterns. Kept as traced, with
the reason in the report: a query rope or a latent write of another form (a rope the three
forms do not cover, a bias on ``kv_a_proj_with_mqa``) and an experts form other than
grouped_mm (the eager loop breaks the graph at ``nonzero``; ``batched_mm``).

Every condition is checked on the graph, as in ``decode_graph``; a subgraph that does
not match exactly stays as traced and the reason goes to the report.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from tileflow.integrations.torch import decode_graph as dg
from tileflow.integrations.torch.rewrite import where
from tileflow.report import Report
from tileflow.runtime import ops
from tileflow.suite.mla_latent_cache import LAYOUTS

_fn, _meth, _ev, _need, _arg, _same = dg._fn, dg._meth, dg._ev, dg._need, dg._arg, dg._same
NoMatch = dg.NoMatch
MLA, ROUTER, EXPERTS, LATENT = "mla_attention", "moe_router", "moe_experts", "mla_latent_cache"
# the report's name for a query rope that mla_attention applies itself (ROPE_Q)
QUERY_ROPE = "mla_query_rope"
# the reason a rope key rotated in none of the three forms gives (each form's own reason follows)
LATENT_REASON = "the rope key's rotation is none of mla_latent_cache's three forms"
# the same for the query's rope part (mla_attention's ROPE_Q takes the same three forms)
QUERY_REASON = "the query's rope rotation is none of mla_attention's three forms"


# ------------------------------------------------------------------ helpers
def _param(n) -> bool:
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")


def _getitem(n, i) -> Optional[fx.Node]:
    """``src`` when ``n`` is ``src[i]`` (a multi-output call's i-th result)."""
    if _fn(n, operator.getitem) and n.args[1] == i:
        return n.args[0]
    return None


def _only_users(n: fx.Node, allowed) -> bool:
    return all(u in allowed for u in n.users)


def _token_rows(x: fx.Node, rows: tuple) -> None:
    """NoMatch unless ``x`` [M, D] holds one decode row, or the B x R rows of the step's
    matched attention: a prefill keeps the traced router and experts."""
    m = _shape(x)[0]
    _need(_same(m, 1) or (rows and _same(m, rows[0] * rows[1])),
          f"{m} rows: not one decode row, nor the rows of a decode step's matched attention")


def _shape(n) -> tuple:
    v = _ev(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


# ------------------------------------------------------------------ MLA
def is_mla(sdpa: fx.Node) -> bool:
    """Whether the SDPA's keys are transformers' DeepSeek ``expand_kv`` buffer (``new_empty``)."""
    return _meth(sdpa.args[1] if len(sdpa.args) > 1 else sdpa.kwargs.get("key"), "new_empty")


def _key_copy(buf: fx.Node, sl: slice) -> fx.Node:
    """The source of the one ``buf[..., sl].copy_(src)``."""
    views = [u for u in buf.users if _fn(u, operator.getitem) and u.args[1] == (Ellipsis, sl)]
    _need(len(views) == 1, f"the key buffer's [..., {sl.start}:{sl.stop}] is not written once")
    copies = [u for u in views[0].users if _meth(u, "copy_")]
    _need(len(copies) == 1 and len(views[0].users) == 1 and len(copies[0].args) == 2 and not copies[0].kwargs,
          "the key buffer's half is not one copy_")
    return copies[0]


def match_mla(sdpa: fx.Node) -> dict:
    q, key, value = sdpa.args[:3]
    mask = _arg(sdpa, 3, "attn_mask")
    _need(_arg(sdpa, 4, "dropout_p", 0.0) == 0.0, "dropout")
    _need(not _arg(sdpa, 5, "is_causal", False), "is_causal with a cache")
    _need(not _arg(sdpa, 7, "enable_gqa", False), "enable_gqa")
    scale = _arg(sdpa, 6, "scale")
    _need(isinstance(scale, float), "the scale is not a constant")
    qv = _ev(q)
    _need(qv is not None and qv.dim() == 4, "queries are not [batch, heads, tokens, head_dim]")
    b, nh, r, dqk = qv.shape
    _need(all(isinstance(d, int) for d in (b, nh, r, dqk)), "a symbolic batch, head or token count")
    _need(r == 1, f"{r} queries a sequence: mla_attention takes one new token a sequence")
    # q = cat((q_nope, q_rot), -1): any computation of the two halves pairs with k's halves
    _need(_fn(q, torch.cat) and len(q.args[0]) == 2 and _arg(q, 1, "dim", 0) in (-1, 3),
          "queries are not cat(nope, rope)")
    q_nope, q_pe = q.args[0]
    dn, dr = _shape(q_nope)[-1], _shape(q_pe)[-1]
    # keys: new_empty [B, NH, S, DN + DR], [..., :DN] <- k_nope, [..., DN:] <- the rope cache broadcast
    _need(_shape(key)[:2] == (b, nh) and _shape(key)[-1] == dn + dr, "the key buffer is not [B, NH, S, DN + DR]")
    c_nope = _key_copy(key, slice(None, dn, None))
    c_rope = _key_copy(key, slice(dn, None, None))
    _need(set(key.users) == {c_nope.args[0], c_rope.args[0], sdpa}, "the key buffer has other uses")
    k_nope, k_rot = c_nope.args[1], c_rope.args[1]
    split = _getitem(k_nope, 0)
    _need(_fn(split, torch.functional.split, torch.split) and _getitem(value, 1) is split,
          "k_nope and the values are not the two parts of one split")
    kvt, sizes = split.args[0], _arg(split, 1, "split_size_or_sections")
    _need(list(sizes) == [dn, _shape(value)[-1]] and _arg(split, 2, "dim", 0) in (-1, 3), "split sizes")
    dv = _shape(value)[-1]
    _need(_meth(kvt, "transpose") and sorted(kvt.args[1:3]) == [1, 2], "kv_b_proj's heads are not transposed")
    view = kvt.args[0]
    _need(_meth(view, "view", "reshape"), "kv_b_proj's output is not viewed as heads")
    lin = view.args[0]
    _need(_fn(lin, *dg._LINEARS) and _arg(lin, 2, "bias") is None and _param(lin.args[1]),
          "kv_b_proj is not a bias-free linear of a parameter")
    keys, w_kvb = lin.args[0], lin.args[1]
    _need(_meth(k_rot, "expand") and list(k_rot.args[1:]) in ([-1, nh, -1, -1], [b, nh, -1, -1]),
          "the rope key is not the cache broadcast over heads")
    values = k_rot.args[0]
    _need(keys.op == "placeholder" and values.op == "placeholder", "the latent caches are not graph inputs")
    kc, pc, wv = _ev(keys), _ev(values), _ev(w_kvb)
    _need(kc.dim() == 4 and kc.shape[0] == b and kc.shape[1] == 1, "the latent cache is not [B, 1, S, R]")
    s, rank = kc.shape[2], kc.shape[3]
    _need(tuple(pc.shape) == (b, 1, s, dr), "the rope cache is not [B, 1, S, DR]")
    _need(tuple(wv.shape) == (nh * (dn + dv), rank), "kv_b_proj's weight is not [NH * (DN + DV), R]")
    _need(_shape(view)[1:] == (s, nh, dn + dv) and _shape(kvt) == (b, nh, s, dn + dv),
          "kv_b_proj's output is not [B, S, NH, DN + DV] per head")
    _need(_shape(q_nope) == (b, nh, 1, dn) and _shape(q_pe) == (b, nh, 1, dr), "query halves' shapes")
    qpos, key_terms = dg.match_mask(mask, s, b, 1)
    dtypes = {_ev(t).dtype for t in (q_nope, q_pe, keys, values, w_kvb)}
    _need(len(dtypes) == 1 and next(iter(dtypes)) in dg._DTYPES, f"mixed dtypes {sorted(map(str, dtypes))}")
    copies = (c_nope, c_rope)
    # from the first read of the caches (after the traced latent write) to the SDPA: the mask is built earlier
    dg._no_writes_inside([sdpa], [q_nope, q_pe, keys, values, w_kvb, mask, qpos, *key_terms], sdpa, allowed=copies)
    return dict(q_nope=q_nope, q_pe=q_pe, keys=keys, values=values, w_kvb=w_kvb, dn=dn, scale=scale, qpos=qpos,
                key_terms=key_terms, batch=b, nh=nh, dv=dv, capacity=s, copies=copies)


def rewrite_mla(graph: fx.Graph, sdpa: fx.Node, m: dict, lengths_of: dict, rope: Optional[dict] = None) -> None:
    """With ``rope`` (``match_query_rope``) mla_attention rotates the unrotated rope part
    itself; the traced rotation is left to the dead-code pass."""
    b, nh = m["batch"], m["nh"]
    with graph.inserting_before(sdpa):
        if m["qpos"] is not None:
            key = (m["qpos"], b)
            lengths = lengths_of.get(key)
            if lengths is None:
                lengths = graph.call_function(operator.add, (m["qpos"], 1))
                if b > 1:
                    lengths = graph.call_method("expand", (lengths, (b,)))
                lengths_of[key] = lengths
        else:  # a mask from outside the graph: every row, the key mask decides
            lengths = graph.call_function(torch.full, ((b,), m["capacity"]),
                                          {"dtype": torch.int64, "device": _ev(m["keys"]).device})
        key_mask = None
        for term in m["key_terms"]:
            key_mask = term if key_mask is None else graph.call_function(operator.and_, (key_mask, term))
        if key_mask is not None:
            key_mask = graph.call_method("reshape", (key_mask, (-1, m["capacity"])))
            if b > 1 and all(_ev(t).shape[0] == 1 for t in m["key_terms"]):
                key_mask = graph.call_method("expand", (key_mask, (b, -1)))
            key_mask = graph.call_method("to", (key_mask, torch.int32))
        qn = graph.call_method("reshape", (m["q_nope"], (b, nh, -1)))
        qp = graph.call_method("reshape", ((rope or m)["q_pe"], (b, nh, -1)))
        args = (qn, qp, m["keys"], m["values"], lengths, m["w_kvb"], m["dn"], m["scale"], key_mask)
        if rope is not None:
            pos = dg._per_row(graph, rope["pos"], b, shared=False)
            inv = graph.call_method("to", (rope["inv_freq"], torch.float32))
            args += (pos, inv, rope["scale"], rope["layout"])
        o = graph.call_function(torch.ops.tileflow.mla_attention.default, args)
        out = graph.call_method("view", (o, (b, nh, 1, m["dv"])))
    sdpa.replace_all_uses_with(out)
    graph.erase_node(sdpa)
    for c in m["copies"]:  # in place into the dropped key buffer: the dead-code pass keeps in-place ops
        graph.erase_node(c)


# ------------------------------------------------------------- the latent cache write
_EVENS = ((Ellipsis, slice(0, None, 2)), (Ellipsis, slice(None, None, 2)))
_ODDS = ((Ellipsis, slice(1, None, 2)),)


def _through_moves(n):
    """Through ``.to(device)`` calls (no dtype)."""
    while _meth(n, "to") and all(isinstance(a, torch.device) for a in n.args[1:]) and set(n.kwargs) <= {"device"}:
        n = n.args[0]
    return n


def _scale_of(n, base, what: str) -> tuple:
    """(``base`` node, scale) of ``base(..) * scale`` (a constant: the rotary embedding's
    ``attention_scaling``) or of ``base(..)`` alone (scale 1)."""
    if not _fn(n, operator.mul):
        return n, 1.0
    _need(not dg._pair(n, base, dg._symbolic_float), f"{what}'s scale (attention_scaling) {dg._SYMBOLIC}")
    ts = dg._pair(n, base, lambda s: isinstance(s, (int, float)))
    _need(ts, f"{what} is scaled by a tensor")
    return ts[0], float(ts[1])


def _angles(freqs: fx.Node, half: int) -> tuple[fx.Node, fx.Node]:
    """(position_ids, inv_freq) of the rotary embedding's ``position_ids[..., None].float() * inv_freq``."""
    _need(_fn(freqs, operator.mul) and len(freqs.args) == 2, "the angles are not positions * inv_freq")
    _need(_ev(freqs) is not None and _ev(freqs).dtype == torch.float32, "the angles are not fp32")
    a, b = (dg._strip(x) for x in freqs.args)
    inv, pos = (a, b) if _ev(a) is not None and _ev(a).is_floating_point() else (b, a)
    iv, pv = _ev(inv), _ev(pos)
    _need(_param(inv) and iv is not None and iv.is_floating_point() and tuple(iv.shape) == (half,),
          "inv_freq is not a buffer of qk_rope_head_dim / 2 frequencies")
    _need(pos.op == "placeholder" and pv is not None and pv.dtype == torch.int64 and pv.dim() == 2,
          "positions are not an int64 position_ids input [batch, tokens]")
    return pos, inv


def _v3_table(n, fn: str, half: int, first_half: bool, dtype) -> tuple[fx.Node, float]:
    """(``cat(f, f)``, scale) of DeepSeek-V3's ``cos`` / ``sin`` table as the attention reads it:
    ``(cos(cat(f, f)) * scale).to(dtype)``, its first half for the interleaved layout,
    unsqueezed over the heads."""
    _need(_meth(n, "unsqueeze") and n.args[1:] == (1,), f"the {fn} table is not broadcast over the heads")
    n = n.args[0]
    if first_half:
        _need(_fn(n, operator.getitem) and n.args[1] == (Ellipsis, slice(None, half, None)),
              f"the {fn} table is not its first half")
        n = n.args[0]
    if _meth(n, "to"):
        casts = [a for a in (*n.args[1:], n.kwargs.get("dtype")) if isinstance(a, torch.dtype)]
        _need(set(n.kwargs) <= {"dtype", "device"} and len(casts) <= 1
              and all(isinstance(a, (torch.dtype, torch.device)) for a in n.args[1:])
              and set(casts) <= {torch.float32, dtype}, f"the {fn} table is cast to another dtype than the cache's")
        n = n.args[0]
    n, scale = _scale_of(n, lambda t: _meth(t, fn), f"the {fn} table")
    _need(_meth(n, fn), f"no {fn} table")
    emb = n.args[0]
    _need(_fn(emb, torch.cat) and len(emb.args[0]) == 2 and emb.args[0][0] is emb.args[0][1]
          and _arg(emb, 1, "dim", 0) in (-1, 2), "the angles are not cat(freqs, freqs)")
    return emb, scale


def _v3_tables(cos_u, sin_u, half: int, first_half: bool, dtype) -> tuple[fx.Node, float]:
    emb, scale = _v3_table(cos_u, "cos", half, first_half, dtype)
    emb_s, scale_s = _v3_table(sin_u, "sin", half, first_half, dtype)
    _need(emb_s is emb and scale_s == scale, "cos and sin of different angles or scales")
    return emb.args[0][0], scale


def _rope_halves(out: fx.Node, dr: int, dtype) -> tuple:
    """DeepSeek-V3, ``rope_interleave=False``: ``k * cos + rotate_half(k) * sin``."""
    k, cos_u, sin_u = dg.match_rope(out, dr)
    freqs, scale = _v3_tables(cos_u, sin_u, dr // 2, False, dtype)
    return k, freqs, scale


def _rope_interleaved(out: fx.Node, dr: int, dtype) -> tuple:
    """DeepSeek-V3, ``rope_interleave=True``: ``cat([k1 * c - k2 * s, k2 * c + k1 * s], -1)``,
    ``k1, k2 = k[..., 0::2], k[..., 1::2]``, ``c`` / ``s`` the tables' first halves."""
    _need(_fn(out, torch.cat) and len(out.args[0]) == 2 and _arg(out, 1, "dim", 0) in (-1, 3),
          "not cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1)")
    lo, hi = out.args[0]
    _need(_fn(lo, operator.sub) and _fn(hi, operator.add) and all(_fn(t, operator.mul) for t in (*lo.args, *hi.args)),
          "not cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1)")
    x1c = dg._pair(lo.args[0], lambda t: _fn(t, operator.getitem) and t.args[1] in _EVENS, lambda c: True)
    x2s = dg._pair(lo.args[1], lambda t: _fn(t, operator.getitem) and t.args[1] in _ODDS, lambda s: True)
    _need(x1c and x2s and x1c[0].args[0] is x2s[0].args[0], "the pairs are not k[..., 0::2] and k[..., 1::2]")
    (x1, c), (x2, s) = x1c, x2s
    k = x1.args[0]

    def product(t, x, f) -> bool:  # t = x * f, x being k1 / k2 or the same slice of k again
        return dg._pair(t, lambda a: a is x or (_fn(a, operator.getitem) and a.args[0] is k and a.args[1] == x.args[1]),
                        lambda b: b is f) is not None

    _need(any(product(u, x2, c) and product(v, x1, s) for u, v in (hi.args, hi.args[::-1])),
          "the second half is not k2 * cos + k1 * sin")
    freqs, scale = _v3_tables(c, s, dr // 2, True, dtype)
    return k, freqs, scale


def _rope_complex(out: fx.Node, dr: int, dtype) -> tuple:
    """DeepSeek-V2: ``view_as_real(view_as_complex(k.float().reshape(.., -1, 2)) * freqs_cis).flatten(3)
    .type_as(k)``, ``freqs_cis = polar(ones_like(f), f) * scale`` unsqueezed over the heads."""
    _need(_meth(out, "type_as") and len(out.args) == 2, "not view_as_real(k * freqs_cis).flatten(3).type_as(k)")
    k = out.args[1]
    flat = out.args[0]
    _need(_meth(flat, "flatten") and flat.args[1:] in ((3,), (-2,)) and not flat.kwargs,
          "not view_as_real(k * freqs_cis).flatten(3)")
    vr = flat.args[0]
    _need(_fn(vr, torch.view_as_real) and _fn(vr.args[0], operator.mul), "not view_as_real(k * freqs_cis)")
    kf = dg._pair(vr.args[0], lambda t: _fn(t, torch.view_as_complex), lambda f: True)
    _need(kf, "the rope key is not view_as_complex of its pairs")
    kc, fc = kf
    rs = kc.args[0]
    _need(_meth(rs, "reshape", "view") and rs.args[-1] == 2 and _shape(rs)[-2:] == (dr // 2, 2),
          "the rope key is not reshaped into [..., DR / 2, 2] pairs")
    fl = rs.args[0]
    _need(_meth(fl, "float") or (_meth(fl, "to") and fl.args[1:] == (torch.float32,) and not fl.kwargs),
          "the rope key is not rotated in fp32")
    _need(fl.args[0] is k, "the rotation is cast back to another tensor's dtype than the rotated key's")
    f = _through_moves(fc)
    _need(_meth(f, "unsqueeze") and f.args[1:] == (1,), "freqs_cis is not broadcast over the heads")
    f, scale = _scale_of(_through_moves(f.args[0]), lambda t: _fn(t, torch.polar), "freqs_cis")
    _need(_fn(f, torch.polar) and len(f.args) == 2 and not f.kwargs, "freqs_cis is not polar(ones, angles)")
    ones, freqs = f.args
    _need(_fn(ones, torch.ones_like) and ones.args == (freqs,) and not ones.kwargs,
          "freqs_cis's magnitude is not ones_like(angles)")
    return k, freqs, scale


# the three rope forms of transformers' DeepSeek attention -> mla_latent_cache's ROPE_LAYOUT
_ROPE_FORMS = (("V2's complex product", _rope_complex, LAYOUTS["interleaved_out"]),
               ("V3's rotate-half", _rope_halves, LAYOUTS["halves"]),
               ("V3's interleaved pairs", _rope_interleaved, LAYOUTS["interleaved"]))


def _rope_of(out: fx.Node, dr: int, dtype, rope_part, not_part: str, reason: str) -> tuple:
    """(position_ids, inv_freq, scale, layout) of the rotation ``out``, one of
    ``_ROPE_FORMS``, rotating ``rope_part`` itself (not a permutation of it); else NoMatch
    with ``reason`` and each form's own (``not_part`` where the form rotates another tensor)."""
    why = []
    for name, form, layout in _ROPE_FORMS:
        try:
            k, freqs, scale = form(out, dr, dtype)
            _need(k is rope_part, not_part)
        except NoMatch as e:
            why.append(f"{name}: {e}")
            continue
        return (*_angles(freqs, dr // 2), scale, layout)
    raise NoMatch(f"{reason} ({'; '.join(why)})")


def _rope_key(out: fx.Node, dr: int, dtype, rope_part) -> tuple:
    return _rope_of(out, dr, dtype, rope_part,
                    "the rotated key is not kv_a_proj_with_mqa's rope part as split and viewed [B, 1, 1, DR]",
                    LATENT_REASON)


def match_query_rope(m: dict, sdpa: fx.Node) -> dict:
    """The rotation of the matched MLA's ``q_pe`` (``match_mla``'s ``m``): one of the three
    forms, at ``position_ids`` [batch or 1, 1], of the second part of the split of the
    queries whose first part is ``q_nope``; the rope part unrotated and the rope for ROPE_Q."""
    q_nope, q_pe, b, nh = m["q_nope"], m["q_pe"], m["batch"], m["nh"]
    dn, dr = _shape(q_nope)[-1], _shape(q_pe)[-1]
    split = _getitem(q_nope, 0)
    sizes = _arg(split, 1, "split_size_or_sections") if split is not None else None
    _need(_fn(split, torch.functional.split, torch.split) and isinstance(sizes, (list, tuple))
          and list(sizes) == [dn, dr] and _arg(split, 2, "dim", 0) in (-1, 3),
          "q_nope is not the first part of a split [DN, DR] of the queries' last axis")
    parts = [g for g in split.users if _getitem(g, 1) is split]
    _need(len(parts) == 1 and _shape(parts[0]) == (b, nh, 1, dr), "the split's rope part is not one [B, NH, 1, DR]")
    part = parts[0]
    dtype = _ev(part).dtype
    pos, inv, scale, layout = _rope_of(q_pe, dr, dtype, part, "the rotated query is not the query's rope part "
                                                              "as split [B, NH, 1, DR]", QUERY_REASON)
    pv = _ev(pos)
    _need(pv.shape[0] in (1, b) and pv.shape[1] == 1, "position_ids are not [batch or 1, 1]")
    # the kernel reads the unrotated part, the positions and inv_freq where the SDPA was
    dg._no_writes_inside([q_pe], [part, pos, inv], sdpa, allowed=m["copies"])
    return dict(q_pe=part, pos=pos, inv_freq=inv, scale=scale, layout=layout)


def match_latent(keys: fx.Node, values: fx.Node, sdpa: fx.Node, b: int) -> dict:
    """The latent cache write of the MLA at ``sdpa`` (its caches ``keys`` [B, 1, S, R] and
    ``values`` [B, 1, S, DR]): ``kv_a_proj_with_mqa`` of the layer's normed input, split
    into the latent (``kv_a_layernorm``) and the rope key (rotated at ``position_ids``),
    each ``index_copy_``'d into its cache at one row, for one new token a sequence."""
    w_k, w_v = dg._cache_write(keys, sdpa), dg._cache_write(values, sdpa)
    cpos = w_k.args[2]
    _need(w_v.args[2] is cpos, "the latent and the rope key are written at different rows")
    cv = _ev(cpos)
    _need(isinstance(cv, torch.Tensor) and cv.dtype == torch.int64 and tuple(cv.shape) == (1,),
          "the cache rows are not one int64 row (one new token a sequence)")
    r, dr = _shape(keys)[3], _shape(values)[3]
    kv4, pe = w_k.args[3], w_v.args[3]
    _need(_meth(kv4, "view", "reshape") and _shape(kv4) == (b, 1, 1, r),
          "the latent written is not viewed [B, 1, 1, R]")
    x_nope, ln_w, eps = dg.match_rms_norm(kv4.args[0])
    split = _getitem(x_nope, 0)
    sizes = _arg(split, 1, "split_size_or_sections")
    _need(_fn(split, torch.functional.split, torch.split) and isinstance(sizes, (list, tuple))
          and list(sizes) == [r, dr] and _arg(split, 2, "dim", 0) in (-1, 2),
          "the latent is not the first part of a split [R, DR] of the last axis")
    # the rope key's views: the split's second part viewed [B, 1, 1, DR], the form the rotations start from
    parts = [v for g in split.users if _getitem(g, 1) is split for v in g.users
             if _meth(v, "view", "reshape") and _shape(v) == (b, 1, 1, dr)]
    _need(len(parts) == 1, "the split's rope part is not viewed [B, 1, 1, DR] once")
    dtype = _ev(keys).dtype
    pos, inv, scale, layout = _rope_key(pe, dr, dtype, parts[0])
    lin = split.args[0]
    _need(_fn(lin, *dg._LINEARS) and _param(lin.args[1]), "kv_a_proj_with_mqa is not a linear of a parameter")
    _need(_arg(lin, 2, "bias") is None, "kv_a_proj_with_mqa has a bias (mla_latent_cache has none)")
    x, w = lin.args[:2]
    d = _shape(x)[-1] if _shape(x) else None
    _need(_shape(x) == (b, 1, d), "the projected rows are not [B, 1, D]: one new token a sequence")
    _need(_shape(w) == (r + dr, d), "kv_a_proj_with_mqa's weight is not [R + DR, D]")
    pv = _ev(pos)
    _need(pv.shape[0] in (1, b) and pv.shape[1] == 1, "position_ids are not [batch or 1, 1]")
    dtypes = {_ev(t).dtype for t in (x, w, ln_w, keys, values)}
    _need(dtypes == {dtype}, f"mixed dtypes {sorted(map(str, dtypes))}")
    _need(dtype in dg._DTYPES, f"dtype {dtype}")
    writes = (w_k, w_v)
    order = {n: i for i, n in enumerate(sdpa.graph.nodes)}
    first, last = sorted(writes, key=order.__getitem__)
    # the kernel writes both rows where the first traced write was: nothing the pattern reads changes in between
    dg._no_writes_inside(list(writes), [x, w, ln_w, pos, inv, cpos, keys, values], last, allowed=writes)
    return dict(x=x, w=w, ln_w=ln_w, eps=eps, pos=pos, cache_pos=cpos, inv_freq=inv, scale=scale, layout=layout,
                keys=keys, values=values, writes=writes, first=first, batch=b)


def rewrite_latent(graph: fx.Graph, m: dict) -> None:
    b = m["batch"]
    with graph.inserting_before(m["first"]):
        x = graph.call_method("reshape", (m["x"], (-1, _shape(m["x"])[-1])))
        pos = dg._per_row(graph, m["pos"], b, shared=False)
        # StaticLayer writes every sequence's token at the same row
        cpos = dg._per_row(graph, m["cache_pos"], b, shared=True)
        inv = graph.call_method("to", (m["inv_freq"], torch.float32))
        graph.call_function(torch.ops.tileflow.mla_latent_cache.default,
                            (x, m["w"], m["ln_w"], m["eps"], pos, cpos, inv, m["scale"], m["layout"], m["keys"],
                             m["values"]))
    for n in m["writes"]:
        graph.erase_node(n)


# ------------------------------------------------------------- q_a_layernorm + q_b_proj
def match_q_b(lin: fx.Node) -> dict:
    """``q_b_proj(q_a_layernorm(q_a_proj(x)))``'s last two: a bias-free linear of a
    parameter whose input is an RMSNorm used by nothing else, on one decode row."""
    _need(_fn(lin, *dg._LINEARS) and _arg(lin, 2, "bias") is None and _param(lin.args[1]), "not a bias-free linear")
    n = lin.args[0]
    _need(len(n.users) == 1, "the norm has other uses")
    x, ln_w, eps = dg.match_rms_norm(n)
    dg._step_rows(x, ())
    dg._no_writes_inside([lin], [x, ln_w, lin.args[1]], lin)
    return dict(x=x, ln_w=ln_w, eps=eps, w=lin.args[1])


# ------------------------------------------------------------------ router
def _group_mask(inv: fx.Node, n_exp: int) -> tuple[fx.Node, int, int, list]:
    """(group scores, n_group, topk_group, in-place nodes) of transformers'
    ``~zeros_like(gs).scatter_(1, topk(gs, topk_group)[1], 1)[..., None].expand(..).reshape(-1, E).bool()``."""
    _need(_fn(inv, operator.invert), "the expert mask is not ~group_mask")
    bl = inv.args[0]
    _need(_meth(bl, "bool"), "the expert mask is not a bool")
    rs = bl.args[0]
    _need(_meth(rs, "reshape", "view") and list(rs.args[1:]) == [-1, n_exp], "the expert mask is not [M, E]")
    ex = rs.args[0]
    _need(_meth(ex, "expand"), "the group mask is not expanded over the group's experts")
    un = ex.args[0]
    _need(_meth(un, "unsqueeze") and un.args[1] == -1, "the group mask is not unsqueezed")
    gm = un.args[0]
    _need(_fn(gm, torch.zeros_like), "the group mask is not zeros_like(group scores)")
    gs = gm.args[0]
    sc = [u for u in gm.users if _meth(u, "scatter_")]
    _need(len(sc) == 1 and set(gm.users) == {sc[0], un}, "the group mask is not written by one scatter_")
    sc = sc[0]
    _need(sc.args[1] == 1 and sc.args[3] == 1 and not sc.kwargs and not sc.users, "scatter_ of another form")
    gtop = _getitem(sc.args[2], 1)
    _need(gtop is not None, "the kept groups are not a topk's indices")
    src, topk_group = _topk(gtop)
    _need(src is gs, "the groups are not the top-k group scores")
    n_group = _shape(gs)[-1]
    _need(list(ex.args[1:]) == [-1, n_group, n_exp // n_group], "the group mask's expansion")
    return gs, n_group, topk_group, [sc]


def _topk(n, k_name="k"):
    _need(_fn(n, torch.topk) or _meth(n, "topk"), "not a topk")
    _need(_arg(n, 2, "dim", -1) == -1 and _arg(n, 3, "largest", True) is True, "topk of another form")
    return n.args[0], _arg(n, 1, k_name)


def _scores_of(n, method: str) -> fx.Node:
    """The fp32 router logits ``linear(h.view(-1, D).type(f32), W.type(f32))`` under
    ``softmax(dim=-1, dtype=f32)`` or ``sigmoid()``; returns the linear."""
    if method == "softmax":
        _need(_meth(n, "softmax") and _arg(n, 1, "dim") == -1, "scores are not softmax over the experts")
        _need(_arg(n, 2, "dtype", torch.float32) == torch.float32, "softmax in another dtype")
    else:
        _need(_meth(n, "sigmoid"), "scores are not the logits' sigmoid")
    lin = n.args[0]
    _need(_fn(lin, *dg._LINEARS) and _arg(lin, 2, "bias") is None, "the logits are not a bias-free linear")
    return lin


def match_router(idx: fx.Node, wt_final: fx.Node, rows: tuple = ()) -> dict:
    """The router whose outputs are ``topk_indices`` (``idx``) and the scaled
    ``topk_weights`` (``wt_final``), one of transformers' three methods."""
    _need(_fn(wt_final, operator.mul), "the weights are not scaled")
    pair = dg._pair(wt_final, lambda a: isinstance(a, fx.Node), lambda c: isinstance(c, (int, float)))
    _need(pair is not None, "the weights' scale is not a constant")
    wts, scale = pair
    inplace: list = []
    bias, n_group, topk_group, norm = None, 1, 1, False
    top = _getitem(idx, 1)
    _need(top is not None, "the indices are not a topk's")
    choice, k = _topk(top)
    if _meth(wts, "gather") or _fn(wts, operator.itruediv):  # V3: sigmoid scores gathered at the choice
        if _fn(wts, operator.itruediv):
            g, den = wts.args
            _need(_fn(den, operator.add) and den.args[1] == 1e-20, "the normalisation is not sum + 1e-20")
            sm = den.args[0]
            _need(_meth(sm, "sum") and sm.args[0] is g and _arg(sm, 1, "dim") == -1 and sm.kwargs.get("keepdim"),
                  "the normalisation is not the weights' sum")
            _need(set(g.users) == {sm, wts}, "the gathered weights have other uses")
            inplace.append(wts)
            norm, wts = True, g
        _need(_meth(wts, "gather") and wts.args[1] == 1 and wts.args[2] is idx,
              "the weights are not gathered at the choice")
        scores = wts.args[0]
        _need(_meth(choice, "masked_fill") and choice.args[2] == float("-inf"), "the choice is not masked with -inf")
        sfc = choice.args[0]
        _need(_fn(sfc, operator.add) and sfc.args[0] is scores and _param(sfc.args[1]),
              "the choice is not scores + e_score_correction_bias")
        bias = sfc.args[1]
        n_exp = _shape(scores)[-1]
        gs, n_group, topk_group, more = _group_mask(choice.args[1], n_exp)
        inplace += more
        _need(_meth(gs, "sum") and _arg(gs, 1, "dim") == -1 and not gs.kwargs.get("keepdim"),
              "group scores are not sums")
        g2 = _getitem(gs.args[0], 0)
        src, k2 = _topk(g2)
        _need(k2 == 2 and _meth(src, "view") and src.args[0] is sfc
              and list(src.args[1:]) == [-1, n_group, n_exp // n_group],
              "a group's score is not the sum of its best two")
        lin = _scores_of(scores, "sigmoid")
        method = "noaux_tc"
    else:  # V2: softmax scores, the topk's values
        _need(_getitem(wts, 0) is top, "the weights are not the topk's values")
        if _meth(choice, "masked_fill"):
            _need(choice.args[2] == 0.0, "the choice is not masked with 0")
            scores = choice.args[0]
            n_exp = _shape(scores)[-1]
            gs, n_group, topk_group, more = _group_mask(choice.args[1], n_exp)
            inplace += more
            mx = _getitem(gs, 0)
            _need(_meth(mx, "max") and _arg(mx, 1, "dim") == -1 and not _arg(mx, 2, "keepdim", False),
                  "group scores are not their best expert's")
            src = mx.args[0]
            _need(_meth(src, "view") and src.args[0] is scores
                  and list(src.args[1:]) == [-1, n_group, n_exp // n_group],
                  "the groups are not the scores viewed [M, groups, experts a group]")
            method = "group_limited_greedy"
        else:
            scores, method = choice, "greedy"
        lin = _scores_of(scores, "softmax")
    x32, w32 = lin.args[:2]
    _need(_meth(x32, "type", "float", "to") and _meth(w32, "type", "float", "to"), "the logits are not fp32 casts")
    for c in (x32, w32):
        _need(c.target == "float" or torch.float32 in c.args[1:] or c.kwargs.get("dtype") == torch.float32,
              "a cast to another dtype than fp32")
    h2, w = x32.args[0], w32.args[0]
    _need(_param(w) and _meth(h2, "view", "reshape"), "the router weight is not a parameter of hidden rows")
    e, d = _shape(w)
    _need(_shape(h2) == (_shape(h2)[0], d) and _shape(lin)[-1] == e, "router shapes")
    _need(isinstance(k, int) and isinstance(topk_group, int) and e % n_group == 0, "non-constant top-k")
    _need(e <= 256, f"{e} routed experts (moe_router scores at most 256)")
    if method == "noaux_tc":
        _need(e // n_group >= 2, "groups of one expert")
        _need(_ev(bias).dtype == torch.float32 and _shape(bias) == (e,), "the correction bias is not fp32 [E]")
    # transformers 5.25 keeps gate.weight in fp32, 5.17 in the model's dtype: moe_router reads either
    _need(_ev(w).dtype in (torch.float32, _ev(h2).dtype),
          f"router weight {_ev(w).dtype}: moe_router reads an fp32 weight or one in the hidden rows' dtype")
    _token_rows(h2, rows)
    inputs = [h2, w] + ([bias] if bias is not None else [])
    dg._no_writes_inside([idx, wt_final], inputs, wt_final, allowed=inplace)
    return dict(x=h2, w=w, bias=bias, top_k=k, scale=float(scale), n_group=n_group, topk_group=topk_group,
                norm=norm, method=method, inplace=inplace)


def routers(graph: fx.Graph) -> list:
    """(topk_indices, scaled topk_weights) pairs: a topk whose [1] feeds a reshape(-1)
    and a ``* constant`` weight that feeds another, the experts' inputs."""
    found = []
    for n in graph.nodes:
        if not (_fn(n, torch.topk) or _meth(n, "topk")):
            continue
        for idx in [u for u in n.users if _getitem(u, 1) is n]:
            # the weights: topk's values (V2) or gathered at idx (V3), then scaled
            cands = [u for u in n.users if _getitem(u, 0) is n] + [u for u in idx.users if _meth(u, "gather")]
            for c in list(cands):
                cands += [u for u in c.users if _fn(u, operator.itruediv)]
            scaled = [u for c in cands for u in c.users if _fn(u, operator.mul)
                      and any(isinstance(a, (int, float)) for a in u.args)]
            if len(scaled) == 1:
                found.append((idx, scaled[0]))
    return found


# ------------------------------------------------------------------ experts
_GROUPED = ("grouped_mm_fallback",)


def _grouped_mm(n) -> Optional[tuple]:
    """(input, weight [E, in, out], offs) of a grouped matmul call: transformers' fallback
    op, ``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``."""
    if not (isinstance(n, fx.Node) and n.op == "call_function"):
        return None
    t = n.target
    name = getattr(t, "__name__", "") or str(t)
    ok = (t is getattr(torch.nn.functional, "grouped_mm", None) or t is getattr(torch, "_grouped_mm", None)
          or any(g in str(t) for g in _GROUPED) or name in _GROUPED)
    if not ok:
        return None
    offs = n.kwargs.get("offs", n.args[2] if len(n.args) > 2 else None)
    return n.args[0], n.args[1], offs


def _expert_weight(n, name) -> fx.Node:
    _need(_meth(n, "transpose") and sorted(n.args[1:3]) in ([-2, -1],), f"{name} is not transposed for grouped_mm")
    w = n.args[0]
    _need(_param(w) and _ev(w).dim() == 3, f"{name} is not an [E, out, in] parameter")
    return w


def match_experts(idx: fx.Node, wt_final: fx.Node, rows: tuple = ()) -> tuple[dict, fx.Node]:
    """transformers' ``grouped_mm_experts_forward`` on (``idx``, ``wt_final``); returns
    the match and the node it computes (``sum`` over the K choices, [M, D])."""
    ids = [u for u in idx.users if _meth(u, "reshape", "view") and list(u.args[1:]) == [-1]]
    sws = [u for u in wt_final.users if _meth(u, "reshape", "view") and list(u.args[1:]) == [-1]]
    if not ids or not sws:
        outs = [u for u in (*idx.users, *wt_final.users) if u.op == "output"]
        _need(not outs, "the router's choices leave the graph: the experts run outside it (transformers' eager "
                        "expert loop breaks the graph at nonzero(); experts_implementation='grouped_mm' keeps "
                        "them in it)")
        raise NoMatch("the experts are not transformers' grouped_mm form")
    ids, sws = ids[0], sws[0]
    srt = [u for u in ids.users if _fn(u, torch.sort)]
    _need(len(srt) == 1, "the experts are not transformers' grouped_mm form (no sort of the choices)")
    srt = srt[0]
    _need(len(srt.args) == 1 and not srt.kwargs, "the sort is not ascending over the choices")
    e_sorted = [u for u in srt.users if _getitem(u, 0) is srt]
    perm = [u for u in srt.users if _getitem(u, 1) is srt]
    _need(len(e_sorted) == 1 and len(perm) == 1, "sort results")
    e_sorted, perm = e_sorted[0], perm[0]
    k = _shape(idx)[-1]
    m = _shape(idx)[0]
    # weighted_out = out_1 * sample_weights[perm][:, None]; final = weighted_out[inv_perm].view(M, K, D).sum(1)
    fin = None
    for u in perm.users:
        if _fn(u, torch.empty_like):
            fin = u
    _need(fin is not None, "no inverse permutation")
    inv = fin
    sets = [u for u in inv.users if _fn(u, operator.setitem)]
    _need(len(sets) == 1 and sets[0].args[0] is inv and sets[0].args[1] is perm, "the inverse permutation")
    ar = sets[0].args[2]
    _need(_fn(ar, torch.arange) and ar.args[:1] == (m * k,) and len(ar.args) == 1, "the inverse permutation's arange")
    gets = [u for u in inv.users if _fn(u, operator.getitem) and u.args[1] is inv]
    _need(len(gets) == 1 and len(inv.users) == 2, "the unsort")
    unsorted = gets[0]
    weighted = unsorted.args[0]
    vs = list(unsorted.users)
    _need(len(vs) == 1 and _meth(vs[0], "view", "reshape") and _shape(vs[0]) == (m, k, _shape(unsorted)[-1]),
          "the unsorted rows are not viewed [M, K, D]")
    sums = list(vs[0].users)
    _need(len(sums) == 1 and _meth(sums[0], "sum") and _arg(sums[0], 1, "dim") == 1
          and not _arg(sums[0], 2, "keepdim", False) and "dtype" not in sums[0].kwargs, "not a sum over the choices")
    total = sums[0]
    _need(_fn(weighted, operator.mul), "the expert outputs are not weighted")
    pr = dg._pair(weighted, lambda a: _grouped_mm(a) is not None, lambda s: _meth(s, "unsqueeze") and s.args[1] == -1)
    _need(pr, "the expert outputs are not grouped_mm * routing weights")
    down_mm, sw_u = pr
    swg = sw_u.args[0]
    _need(_fn(swg, operator.getitem) and swg.args[0] is sws and swg.args[1] is perm,
          "the routing weights are not sorted")
    x_mid, w_down_t, offs = _grouped_mm(down_mm)
    w_down = _expert_weight(w_down_t, "down_proj")
    mid = x_mid.args[0] if _meth(x_mid, "to") and x_mid.args[1:] == (_ev(w_down).dtype,) else x_mid
    _need(_fn(mid, operator.mul), "the experts' intermediate is not silu(gate) * up")
    gu = dg._pair(mid, lambda s: _fn(s, torch.nn.functional.silu), lambda u: _getitem(u, 1) is not None)
    _need(gu, "the experts' intermediate is not silu(gate) * up")
    silu, up = gu
    _need(not _arg(silu, 1, "inplace", False), "in-place silu")
    gate = silu.args[0]
    ch = _getitem(gate, 0)
    _need(ch is not None and _getitem(up, 1) is ch and _meth(ch, "chunk") and ch.args[1] == 2
          and _arg(ch, 2, "dim", 0) == -1, "gate and up are not the two halves of gate_up_proj's output")
    up_mm = ch.args[0]
    g = _grouped_mm(up_mm)
    _need(g is not None, "gate_up is not a grouped_mm")
    x_sel, w_gu_t, offs2 = g
    _need(offs2 is offs, "the two grouped_mms have different offsets")
    w_gu = _expert_weight(w_gu_t, "gate_up_proj")
    xs = x_sel.args[0] if _meth(x_sel, "to") and x_sel.args[1:] == (_ev(w_gu).dtype,) else x_sel
    _need(_fn(xs, operator.getitem) and _fn(xs.args[1], operator.floordiv) and xs.args[1].args == (perm, k),
          "the experts' rows are not the tokens of the sorted choices")
    x = xs.args[0]
    # offsets: cumsum(histc(sorted ids, bins=E, min=0, max=E-1), dtype=int32)
    _need(_fn(offs, torch.cumsum) and _arg(offs, 1, "dim") == 0 and offs.kwargs.get("dtype") == torch.int32,
          "the groups' offsets are not an int32 cumsum")
    hc = offs.args[0]
    e = _ev(w_gu).shape[0]
    _need(_fn(hc, torch.histc) and hc.kwargs == {"bins": e, "min": 0, "max": e - 1}, "the groups' sizes are not histc")
    hin = hc.args[0]
    _need(_meth(hin, "float", "int") and hin.args[0] is e_sorted, "histc of something other than the sorted ids")
    _need(set(e_sorted.users) == {hin}, "the sorted ids have other uses (expert parallelism's clamp)")
    ex_, two_i, d = _ev(w_gu).shape
    _need(tuple(_ev(w_down).shape) == (e, d, two_i // 2) and two_i % 2 == 0, "gate_up_proj / down_proj shapes")
    _need(_shape(x) == (m, d), "the experts' input is not [M, D]")
    dtypes = {_ev(t).dtype for t in (x, w_gu, w_down)}
    _need(len(dtypes) == 1 and next(iter(dtypes)) in dg._DTYPES, f"mixed dtypes {sorted(map(str, dtypes))}")
    _token_rows(x, rows)
    dg._no_writes_inside([total], [x, idx, wt_final, w_gu, w_down], total, allowed=tuple(sets))
    return dict(x=x, gate_up=w_gu, down=w_down, setitem=sets[0]), total


# ------------------------------------------------------------------ the pass
def takes_attention(sdpa: fx.Node) -> bool:
    """``decode_graph``'s architecture hook: this SDPA is an MLA attention (``is_mla``)."""
    return is_mla(sdpa)


def rewrite_attention(graph: fx.Graph, sdpa: fx.Node, report: Report, lengths_of: dict) -> Optional[tuple]:
    """``decode_graph``'s architecture hook: the MLA attention at ``sdpa`` -> ``mla_attention``
    where it matches (the step's (batch, 1)); else kept, the reason reported, None."""
    try:
        m = match_mla(sdpa)
    except NoMatch as e:
        report.fallback(MLA, where(sdpa), str(e))
        return None
    try:
        rope = match_query_rope(m, sdpa)
    except NoMatch as e:
        rope = None
        report.fallback(QUERY_ROPE, where(sdpa), str(e))
    try:  # on the graph as traced: the MLA's rewrite erases the SDPA the writes are ordered against
        lat = match_latent(m["keys"], m["values"], sdpa, m["batch"])
    except NoMatch as e:
        lat, why = None, str(e)
    rewrite_mla(graph, sdpa, m, lengths_of, rope)
    report.match(MLA)
    if rope is not None:
        report.match(QUERY_ROPE)
    if lat is None:
        report.fallback(LATENT, where(sdpa), why)
    else:
        rewrite_latent(graph, lat)
        report.match(LATENT)
    return (m["batch"], 1)


def rewrite_mlp(graph: fx.Graph, report: Report, rows: tuple, attentions: int) -> None:
    """``decode_graph``'s architecture hook, before its gate_up patterns: the router and
    experts, and (where MLA attentions matched) q_a_layernorm + q_b_proj."""
    rewrite_moe(graph, report, rows)
    if attentions:
        rewrite_q_b(graph, report)


def rewrite_moe(graph: fx.Graph, report: Report, rows: tuple = ()) -> None:
    """Every router -> moe_router, and its grouped experts -> moe_experts where they match."""
    tf = torch.ops.tileflow
    for idx, wt_final in routers(graph):
        try:
            r = match_router(idx, wt_final, rows)
        except NoMatch as e:
            report.fallback(ROUTER, where(idx), str(e))
            continue
        try:
            x_m, total = match_experts(idx, wt_final, rows)
        except NoMatch as e:
            report.fallback(EXPERTS, where(idx), str(e))
            x_m = total = None
        with graph.inserting_before(wt_final):
            routed = graph.call_function(tf.moe_router.default, (r["x"], r["w"], r["top_k"], r["scale"], r["n_group"],
                                                                 r["topk_group"], r["norm"], r["bias"]))
            new_idx = graph.call_function(operator.getitem, (routed, 0))
            new_wt = graph.call_function(operator.getitem, (routed, 1))
        idx.replace_all_uses_with(new_idx)
        wt_final.replace_all_uses_with(new_wt)
        graph.erase_node(wt_final)  # before the in-place division it reads
        for n in r["inplace"]:  # in place into the dropped router's temporaries
            graph.erase_node(n)
        report.match(ROUTER)
        if total is None:
            continue
        with graph.inserting_before(total):
            y = graph.call_function(tf.moe_experts.default, (x_m["x"], new_idx, new_wt, x_m["gate_up"], x_m["down"]))
        total.replace_all_uses_with(y)
        graph.erase_node(total)
        graph.erase_node(x_m["setitem"])
        report.match(EXPERTS)


def rewrite_q_b(graph: fx.Graph, report: Report) -> None:
    """``q_a_layernorm`` + ``q_b_proj`` -> rms_norm_matvec (called where an MLA matched):
    a linear of the RMSNorm of another linear's output (``q_a_proj``)."""
    for node in list(graph.nodes):
        if not (_fn(node, *dg._LINEARS) and isinstance(node.args[0], fx.Node)):
            continue
        try:
            x = dg.match_rms_norm(node.args[0])[0]
        except NoMatch:
            continue
        if not _fn(x, *dg._LINEARS):  # the layer's input norm (of the residual) is not the q path's
            continue
        try:
            m = match_q_b(node)
        except NoMatch as e:
            report.fallback("rms_norm", where(node), f"q_a_layernorm + q_b_proj: {e}")
            continue
        dg._replace_norm_fused(graph, node, torch.ops.tileflow.rms_norm_matvec.default, m, (m["w"],))
        report.match("rms_norm")
        report.match("matvec")
