"""moe_router: DeepSeekMoE's gate for the decode tokens: ``topk_idx [M, K]`` (the chosen
experts, best first) and ``topk_weight [M, K]`` (fp32) from the normed hidden ``x`` and
the router weight ``w [E, D]``, as transformers' ``DeepseekV2TopkRouter`` /
``DeepseekV3TopkRouter`` compute them (fp32 logits: the model keeps ``gate.weight`` in
fp32 and upcasts x).

``METHOD`` (a structural size) picks the scores:

- 0, softmax (DeepSeek-V2 ``greedy`` / ``group_limited_greedy``): ``s = softmax(logits)``;
  a group's score is its best ``s``; experts of groups not kept score 0;
- 1, sigmoid (DeepSeek-V3 ``noaux_tc``): ``s = sigmoid(logits)``, chosen by
  ``s + bias`` (``e_score_correction_bias``); a group's score is the sum of its best two;
  experts of groups not kept score -inf.

The runtime scalar ``top_k`` is K; ``n_group`` / ``topk_group`` keep the best ``topk_group`` of
``n_group`` equal groups (1 / 1 is plain greedy); the weights are the chosen experts'
``s``, divided by their sum (+1e-20) where ``norm_topk`` is nonzero, times ``scale``
(``routed_scaling_factor``). They are scalars, not parameters, because the reference
sees only inputs and scalars.

Two launches: the logits as a split-K matvec (``BLOCK_N`` experts a program, partial
sums per split), then one program per token sums the partials over one ``BLOCK_E`` tile
(E <= 256) and picks groups and experts by rounds of arg-max and mask; ties go to the
lower index, as torch.topk's sorted order does.
"""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import block_m, products_body, stream_k
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register

NEG = float("-inf")


def define(k, p):
    x = k.input("x", ("M", "D"))
    # gate.weight as transformers keeps it: fp32 (5.25), or the model's dtype (WEIGHT_T: 5.17), upcast here
    w = k.input("w", ("E", "D"), dtype="T" if p.get("WEIGHT_T", 0) else "f32")
    sigmoid = p["METHOD"] == 1
    bias = k.input("bias", ("E",), dtype="f32") if sigmoid else None
    idx_out = k.output("topk_idx", ("M", "K"), dtype="i64")
    wt_out = k.output("topk_weight", ("M", "K"), dtype="f32")
    scale = k.scalar("scale")
    top_k = k.scalar("top_k", "i32")  # = K, the outputs' width (the reference sees no outputs)
    n_group = k.scalar("n_group", "i32")
    topk_group = k.scalar("topk_group", "i32")
    norm_topk = k.scalar("norm_topk", "i32")
    part = k.workspace("part", ("SPLIT_K", "M", "E"))

    many = p.get("BLOCK_M", 1) > 1
    with k.stage("logits", grid=("cdiv(E, BLOCK_N)", "SPLIT_K", "cdiv(M, BLOCK_M)" if many else "M")):
        row = k.range(k.program_id(2) * k.param("BLOCK_M"), "BLOCK_M", aligned=True) if many else k.program_id(2)
        rows = k.range(k.program_id(0) * k.param("BLOCK_N"), "BLOCK_N", aligned=True)
        kdim = k.dim("D")
        chunk = k.cdiv(k.cdiv(kdim, k.param("SPLIT_K")), k.param("BLOCK_K")) * k.param("BLOCK_K")
        lo = k.program_id(1) * chunk
        hi = k.minimum(lo + chunk, kdim)
        acc0 = [k.full(("BLOCK_M", "BLOCK_N") if many else ("BLOCK_N", "BLOCK_K"), 0.0)]
        acc = stream_k(k, lo, hi, acc0, lambda cols: [k.load(w, (rows, cols), limits={1: hi})],
                       products_body(k, x, row, hi=hi), 0)[0]
        k.store(part, (k.program_id(1), row, rows), acc if many else k.sum(acc, axis=1))

    with k.stage("select", grid=("M",)):
        row = k.program_id(0)
        e = k.range(0, "BLOCK_E", aligned=True)
        ne = k.dim("E")
        valid = e.index < ne
        with k.loop(0, k.param("SPLIT_K"), 1, carry=[k.full(("BLOCK_E",), 0.0)]) as lp:
            lp.next(lp.carry[0] + k.load(part, (lp.index, row, e)))
        logits = lp.results[0]
        if sigmoid:
            s = k.sigmoid(logits)
            choice = k.where(valid, s + k.load(bias, (e,)), NEG)
        else:
            lg = k.where(valid, logits, NEG)
            ex = k.exp(lg - k.max(lg, axis=0))
            s = ex / k.sum(ex, axis=0)
            choice = k.where(valid, s, NEG)

        # each expert gets its group's score: the best choice score (softmax) or the
        # sum of the best two (sigmoid) among the group's E / n_group experts
        gid = e.index // (ne // n_group)
        with k.loop(0, n_group, 1, carry=[k.full(("BLOCK_E",), NEG)]) as lg_:
            inside = k.binary("and", k.eq(gid, lg_.index), valid)
            c = k.where(inside, choice, NEG)
            score = k.max(c, axis=0)
            if sigmoid:
                second = k.where(k.binary("ne", e.index, k.argmax(c, axis=0)), c, NEG)
                score = score + k.max(second, axis=0)
            lg_.next(k.where(inside, score, lg_.carry[0]))
        # the best topk_group groups, one a round: the arg-max expert names its group
        with k.loop(0, topk_group, 1, carry=[lg_.results[0], k.full(("BLOCK_E",), 0, dtype="i32")]) as lk:
            gscore, keep = lk.carry
            best = k.eq(gid, k.argmax(gscore, axis=0) // (ne // n_group))
            lk.next(k.where(best, NEG, gscore), k.where(best, 1, keep))
        kept = k.eq(lk.results[1], 1)
        # softmax: groups not kept score 0 (masked_fill 0.0), sigmoid: -inf
        choice = k.where(valid, k.where(kept, choice, NEG if sigmoid else 0.0), NEG)

        j = k.range(0, "BLOCK_TOPK", aligned=True)
        init = [choice, k.full(("BLOCK_TOPK",), 0, dtype="i32"), k.full(("BLOCK_TOPK",), 0.0)]
        with k.loop(0, top_k, 1, carry=init) as lt:
            ch, ids, wts = lt.carry
            pick = k.argmax(ch, axis=0)
            hit = k.eq(e.index, pick)
            here = k.eq(j.index, lt.index)
            lt.next(k.where(hit, NEG, ch), k.where(here, pick, ids),
                    k.where(here, k.sum(k.where(hit, s, 0.0), axis=0), wts))
        ids, wts = lt.results[1], lt.results[2]
        wts = k.where(k.binary("ne", norm_topk, 0), wts / (k.sum(wts, axis=0) + 1e-20), wts)
        k.store(idx_out, (row, j), k.cast(ids, "i64"))
        k.store(wt_out, (row, j), wts * scale)


def _argmax_rounds(xp, values, rounds):
    """``rounds`` arg-maxes of each row of ``values``, each taken out (-inf) for the next:
    the chosen columns best first, ties to the lower index."""
    cols = xp.arange(values.shape[-1])
    picked = []
    for _ in range(rounds):
        best = xp.argmax(values, axis=-1)
        picked.append(best)
        values = xp.where(cols == best[:, None], -xp.inf, values)
    return picked


def reference(xp, x, w, scale, top_k, n_group, topk_group, norm_topk, bias=None):
    logits = x @ xp.matrix_transpose(w)
    if bias is None:  # DeepSeek-V2: softmax, groups scored by their best expert
        ex = xp.exp(logits - xp.max(logits, axis=-1, keepdims=True))
        s = ex / xp.sum(ex, axis=-1, keepdims=True)
        choice = s
    else:  # DeepSeek-V3 noaux_tc: sigmoid, chosen with the correction bias
        s = 1 / (1 + xp.exp(-logits))
        choice = s + bias
    m, e = logits.shape
    size = e // n_group
    groups = xp.reshape(choice, (m, n_group, size))
    if bias is None:
        gscore = xp.max(groups, axis=-1)
    else:
        top2 = xp.flip(xp.sort(groups, axis=-1), axis=-1)[..., :2]
        gscore = xp.sum(top2, axis=-1)
    gid = xp.arange(e) // size
    kept = xp.zeros((m, e), dtype=xp.bool)
    for g in _argmax_rounds(xp, gscore, topk_group):
        kept = kept | (gid == g[:, None])
    choice = xp.where(kept, choice, -xp.inf if bias is not None else 0.0)
    ids = _argmax_rounds(xp, choice, top_k)
    cols = xp.arange(e)
    wts = xp.stack([xp.sum(xp.where(cols == i[:, None], s, 0.0), axis=-1) for i in ids], axis=1)
    if norm_topk:
        wts = wts / (xp.sum(wts, axis=-1, keepdims=True) + 1e-20)
    return {"topk_idx": xp.stack(ids, axis=1), "topk_weight": wts * scale}


def default_params(s):
    e, d, m = s["E"], s["D"], s.get("M", 1)
    p = {"BLOCK_N": 1 if e <= 128 else 2, "BLOCK_K": min(1024, next_pow2(d)), "SPLIT_K": 1,
         "BLOCK_E": next_pow2(e), "BLOCK_TOPK": next_pow2(s["K"]), "METHOD": s.get("METHOD", 0),
         "num_warps": 4, "num_stages": 2, **({"WEIGHT_T": 1} if s.get("WEIGHT_T", 0) else {})}
    if m > 1:  # a round's [BLOCK_M, BLOCK_N, BLOCK_K] products stay within 16k
        p["BLOCK_M"] = block_m(m)
        p["BLOCK_K"] = min(p["BLOCK_K"], max(32, 16384 // (p["BLOCK_N"] * p["BLOCK_M"])))
    return p


def candidates(s):
    base = default_params(s)
    out = []
    for bn in (1, 2, 4):
        for bk in (256, 512, 1024, 2048):
            for split in (1, 2, 4):
                if bk > next_pow2(s["D"]) or bn * bk * base.get("BLOCK_M", 1) > 16384:
                    continue
                for nw in (4, 8):
                    out.append({**base, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": nw})
    return out


def correction_bias(gen, shape, sizes):
    """An ``e_score_correction_bias``: small against the sigmoid scores, so both decide."""
    import torch

    return 0.05 * torch.randn(shape, generator=gen)


def _scalars(k, scale=1.0, n_group=1, topk_group=1, norm_topk=0):
    return dict(scale=scale, top_k=k, n_group=n_group, topk_group=topk_group, norm_topk=norm_topk)


# DeepSeek-V2-Lite (greedy softmax, 6 of 64) and DeepSeek-V3 (noaux_tc, 8 of 256 in 4 of 8 groups)
DEEPSEEK_V2_LITE = dict(E=64, K=6, D=2048, I=1408)
DEEPSEEK_V3 = dict(E=256, K=8, D=7168, I=2048)


def _decode_cases(_config):
    # MoE shapes come from DeepSeek's configs, not from the (dense) model config passed in
    v2, v3 = DEEPSEEK_V2_LITE, DEEPSEEK_V3
    return [Case("v2lite", dict(M=1, E=v2["E"], K=v2["K"], D=v2["D"], METHOD=0), _scalars(v2["K"])),
            Case("v3", dict(M=1, E=v3["E"], K=v3["K"], D=v3["D"], METHOD=1),
                 _scalars(v3["K"], 2.5, 8, 4, 1))]


KERNEL = register(SuiteKernel(
    name="moe_router",
    summary="DeepSeekMoE gate: fp32 logits, softmax / sigmoid+bias, group-limited top-k experts and weights",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("greedy", dict(M=1, E=16, K=4, D=32, METHOD=0), _scalars(4)),
        Case("greedy-rows", dict(M=3, E=64, K=6, D=96, METHOD=0), _scalars(6, 1.5, norm_topk=1),
             params=dict(BLOCK_K=32)),
        Case("group-limited", dict(M=2, E=32, K=3, D=40, METHOD=0), _scalars(3, 16.0, 4, 2),
             params=dict(BLOCK_N=4)),
        Case("noaux", dict(M=1, E=64, K=8, D=64, METHOD=1), _scalars(8, 2.5, 8, 4, 1)),
        Case("noaux-splitk", dict(M=4, E=48, K=4, D=96, METHOD=1), _scalars(4, 1.0, 4, 2),
             params=dict(SPLIT_K=2, BLOCK_K=32, BLOCK_N=4)),
        Case("noaux-odd", dict(M=3, E=8, K=2, D=33, METHOD=1), _scalars(2, 2.5, 2, 1, 1)),
        # the router weight in the activations' dtype (transformers 5.17 keeps it so)
        Case("greedy-weight-t", dict(M=2, E=16, K=4, D=48, METHOD=0, WEIGHT_T=1), _scalars(4)),
        Case("noaux-weight-t", dict(M=1, E=32, K=4, D=64, METHOD=1, WEIGHT_T=1), _scalars(4, 2.5, 4, 2, 1)),
    ],
    decode_cases=_decode_cases,
    candidates=candidates,
    input_makers={"w": linear_weight, "bias": correction_bias},
    min_bytes=lambda s, b: s["M"] * s["D"] * b + 4 * s["E"] * (s["D"] + 1) + 12 * s["M"] * s["K"],
    module=__name__,
))
