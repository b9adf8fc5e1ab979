"""mla_attention: DeepSeek-V2 / V3 multi-head latent attention (MLA) for one new token
per sequence, in the absorbed form over the latent cache.

The cache holds, per token ``t``, one shared latent row: the normalized compressed kv
``kv_cache[b, t]`` (``R = kv_lora_rank``) and the rotated rope key ``pe_cache[b, t]``
(``DR = qk_rope_head_dim``), as transformers' cache keeps them (two tensors; a fused
[B, S, R + DR] cache passes as two strided views). ``kv_b_proj.weight`` viewed
[NH, DN + DV, R] gives per head ``w_uk = [:, :DN]`` and ``w_uv = [:, DN:]`` (strided
views, no copies). Then for head ``h``::

    q_lat[h]  = q_nope[h] @ w_uk[h]                                  # [R]
    s[h, t]   = scale * (q_lat[h] . kv_cache[t] + q_pe[h] . pe_cache[t])
    out[h]    = (softmax(s[h]) @ kv_cache) @ w_uv[h]^T               # [DV]

which equals attention with per-head keys [kv @ w_uk[h]^T | pe] and values
kv @ w_uv[h]^T (the reference expands them, so the test checks the algebra). ``q_pe`` is
rotated already (the rope of the q path: mla_latent_cache's rotation on the k side);
``scale`` is the model's ``self.scaling`` (qk_head_dim**-0.5 times YaRN's mscale^2).

With ``ROPE_Q`` the kernel rotates ``q_pe`` itself, as mla_latent_cache rotates the key
(``pos`` [B], the rotary table ``inv_freq`` [HALF], cos / sin times ``rope_scale``, pairs in
``ROPE_LAYOUT``): the absorb stage's first latent block writes the rotated rows to a
workspace the partial stage reads (the torch rotation was ~9 launches a layer).

Three launches:

- ``absorb``: q_lat = q_nope @ w_uk, one program per (head, latent block, sequence). The
  absorption is a per-head matvec, a weight stream of NH * DN * R: as its own launch each
  weight tile is read once, where inside the attention every split would read it again.
- ``partial``: all NH heads share the one latent "KV head", so they are the rows of the
  query tile (``HEADS_BLOCK >= 16`` rows for ``tl.dot``): each cache block is read once
  per head block, scores are two dots (latent part + rope part), the value is the latent
  row itself. Online softmax in fp32; the context is cut into ``SPLITS`` chunks
  (flash-decoding) written as (max, sum, acc[R]) partials.
- ``combine``: one program per (head, sequence, DV block) merges the splits' partials
  and applies w_uv[h] in ``BLOCK_RC``-wide latent chunks. w_uv is again a per-head
  matvec that a dot over the head rows cannot do, and the merge is needed anyway with
  splits; with ``SPLITS == 1`` it is a divide.

With ``HAS_MASK`` a key mask ``key_mask[b, t]`` (int, 0 = hidden) further hides cache
rows as in gqa_attention; a row hidden entirely is NaN, as in SDPA.
"""

from tileflow.suite.gqa_attention import _key_mask, _lengths, two_waves
from tileflow.suite.inputs import linear_weight, positions, rope_frequencies
from tileflow.suite.mla_latent_cache import rope_reference, rotate_into
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


def define(k, p):
    masked = p.get("HAS_MASK", 0)
    q_nope = k.input("q_nope", ("B", "NH", "DN"))
    q_pe = k.input("q_pe", ("B", "NH", "DR"))
    kv_cache = k.input("kv_cache", ("B", "S", "R"))
    pe_cache = k.input("pe_cache", ("B", "S", "DR"))
    lengths = k.input("lengths", ("B",), dtype="i64")
    if masked:
        key_mask = k.input("key_mask", ("B", "S"), dtype="i32")
    w_uk = k.input("w_uk", ("NH", "DN", "R"))
    w_uv = k.input("w_uv", ("NH", "DV", "R"))
    out = k.output("out", ("B", "NH", "DV"))
    scale = k.scalar("scale")
    rope_q = p.get("ROPE_Q", 0)
    if rope_q:
        pos = k.input("pos", ("B",), dtype="i64")
        inv_freq = k.input("inv_freq", ("HALF",), dtype="f32")
        rope_scale = k.scalar("rope_scale")
        k.scalar("rope_layout")  # the reference's copy of ROPE_LAYOUT (as in mla_latent_cache)
        ws_pe = k.workspace("q_rot", ("B", "NH", "DR"))
    ws_q = k.workspace("q_lat", ("B", "NH", "R"))
    ws_m = k.workspace("part_m", ("B", "SPLITS", "NH"))
    ws_l = k.workspace("part_l", ("B", "SPLITS", "NH"))
    ws_acc = k.workspace("part_acc", ("B", "SPLITS", "NH", "R"))

    with k.stage("absorb", grid=("NH", "cdiv(R, BLOCK_L)", "B")):
        h, b = k.program_id(0), k.program_id(2)
        lat = k.range(k.program_id(1) * k.param("BLOCK_L"), "BLOCK_L", aligned=True)
        with k.loop(0, k.dim("DN"), "BLOCK_DK", carry=(k.full(("BLOCK_DK", "BLOCK_L"), 0.0),)) as lp:
            (acc,) = lp.carry
            dk = k.range(lp.index, "BLOCK_DK", aligned=True)
            lp.next(acc + k.load(w_uk, (h, dk, lat)) * k.load(q_nope, (b, h, dk))[:, None])
        (acc,) = lp.results
        k.store(ws_q, (b, h, lat), k.sum(acc, axis=0))
        if rope_q:  # the first latent block's program also rotates the head's q_pe
            rotate_q_pe(k, p["ROPE_LAYOUT"], q_pe, ws_pe, pos, inv_freq, rope_scale, b, h,
                        k.eq(k.program_id(1), 0))

    with k.stage("partial", grid=("cdiv(NH, HEADS_BLOCK)", "SPLITS", "B")):
        sp, b = k.program_id(1), k.program_id(2)
        nh = k.dim("NH")
        heads = k.range(k.program_id(0) * k.param("HEADS_BLOCK"), "HEADS_BLOCK", aligned=True)
        r = k.range(0, "BLOCK_R", aligned=True)
        e = k.range(0, "BLOCK_DR", aligned=True)
        ql = k.load(ws_q, (b, heads, r), limits={1: nh})  # padded head rows are zero queries
        if rope_q:  # fp32 rows, rounded to the cache's dtype by the dot as the model's .to(dtype)
            qp = k.load(ws_pe, (b, heads, e), limits={1: nh})
        else:
            qp = k.load(q_pe, (b, heads, e), limits={1: nh}, for_dot=True)
        length = k.cast(k.load(lengths, (b,)), "i32")
        bn = k.param("BLOCK_N")
        chunk = k.cdiv(k.cdiv(length, k.param("SPLITS")), bn) * bn
        lo = sp * chunk
        hi = k.minimum(lo + chunk, length)
        m0 = k.full(("HEADS_BLOCK",), float("-inf"))
        l0 = k.full(("HEADS_BLOCK",), 0.0)
        a0 = k.full(("HEADS_BLOCK", "BLOCK_R"), 0.0)
        with k.loop(lo, hi, "BLOCK_N", carry=(m0, l0, a0)) as lp:
            m, l, acc = lp.carry
            n = k.range(lp.index, "BLOCK_N", aligned=True)
            kv = k.load(kv_cache, (b, n, r), limits={1: hi}, for_dot=True)
            pe = k.load(pe_cache, (b, n, e), limits={1: hi}, for_dot=True)
            s = (k.dot(ql, k.trans(kv)) + k.dot(qp, k.trans(pe))) * scale
            live = n.index < hi
            if masked:
                live = live & (k.load(key_mask, (b, n), limits={1: hi}) > 0)
            s = k.where(live[None, :], s, float("-inf"))
            m_new = k.maximum(m, k.max(s, axis=1))
            # with a mask a row may have nothing live yet: exp(-inf - -inf) would be NaN
            m_use = k.where(m_new > float("-inf"), m_new, 0.0) if masked else m_new
            alpha = k.exp(m - m_use)
            pr = k.exp(s - m_use[:, None])
            lp.next(m_new, l * alpha + k.sum(pr, axis=1), acc * alpha[:, None] + k.dot(pr, kv))
        m, l, acc = lp.results
        k.store(ws_m, (b, sp, heads), m, limits={2: nh})
        k.store(ws_l, (b, sp, heads), l, limits={2: nh})
        k.store(ws_acc, (b, sp, heads, r), acc, limits={2: nh})

    # one program per (head, sequence, DV block) loads every split at once: a loop over
    # splits would serialise SPLITS round trips to L2
    with k.stage("combine", grid=("NH", "B", "cdiv(DV, BLOCK_DV)")):
        h, b = k.program_id(0), k.program_id(1)
        dv = k.range(k.program_id(2) * k.param("BLOCK_DV"), "BLOCK_DV", aligned=True)
        sp = k.range(0, "SPLITS_BLOCK", aligned=True)
        nsp = k.param("SPLITS")
        m = k.load(ws_m, (b, sp, h), limits={1: nsp}, other=float("-inf"))
        wgt = k.exp(m - k.max(m, axis=0))  # empty splits hold m = -inf: weight 0
        wgt = wgt / k.sum(wgt * k.load(ws_l, (b, sp, h), limits={1: nsp}), axis=0)
        with k.loop(0, k.dim("R"), "BLOCK_RC", carry=(k.full(("BLOCK_DV", "BLOCK_RC"), 0.0),)) as lp:
            (acc,) = lp.carry
            rc = k.range(lp.index, "BLOCK_RC", aligned=True)
            o_lat = k.sum(wgt[:, None] * k.load(ws_acc, (b, sp, h, rc), limits={1: nsp}), axis=0)
            lp.next(acc + k.load(w_uv, (h, dv, rc)) * o_lat[None, :])
        (acc,) = lp.results
        k.store(out, (b, h, dv), k.sum(acc, axis=1))


def rotate_q_pe(k, layout, q_pe, ws_pe, pos, inv_freq, rope_scale, b, h, when) -> None:
    """``ws_pe[b, h] = rope(q_pe[b, h], pos[b])`` in pair layout ``layout`` (mla_latent_cache's
    rotation of the key), stored only ``when``."""
    half, dr = k.dim("HALF"), k.dim("DR")
    i = k.range(0, "BLOCK_HALF", aligned=True)
    ang = k.cast(k.load(pos, (b,)), "f32") * k.load(inv_freq, (i,))
    c, s = k.cos(ang) * rope_scale, k.sin(ang) * rope_scale
    rotate_into(k, layout, (c, s, i, half, dr), (q_pe, (b, h), 0), (ws_pe, (b, h)), "BLOCK_DR_ROT", {"when": when})


def reference(xp, q_nope, q_pe, kv_cache, pe_cache, lengths, w_uk, w_uv, scale, key_mask=None, pos=None,
              inv_freq=None, rope_scale=1.0, rope_layout=None):
    """The plain (non-absorbed) computation: the latent cache expanded through kv_b_proj
    to per-head keys and values, then softmax attention (``q_pe`` rotated first where
    ``pos`` is given: ROPE_Q)."""
    if pos is not None:
        q_pe = rope_reference(xp, q_pe, pos, inv_freq, rope_scale, int(rope_layout))
    bsz, nh, dn = q_nope.shape
    s = kv_cache.shape[1]
    kv = kv_cache[:, None, :, :]  # [B, 1, S, R]
    k_nope = kv @ xp.matrix_transpose(w_uk)[None, ...]  # [B, NH, S, DN]
    v = kv @ xp.matrix_transpose(w_uv)[None, ...]  # [B, NH, S, DV]
    scores = (q_nope[:, :, None, :] @ xp.matrix_transpose(k_nope))[:, :, 0, :]  # [B, NH, S]
    scores = scores + (q_pe @ xp.matrix_transpose(pe_cache))  # [B, NH, S]: one rope key for all heads
    scores = scores * scale
    valid = xp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    if key_mask is not None:
        valid = valid & (key_mask > 0)
    scores = xp.where(valid[:, None, :], scores, -xp.inf)
    scores = scores - xp.max(scores, axis=-1, keepdims=True)
    pr = xp.exp(scores)
    pr = pr / xp.sum(pr, axis=-1, keepdims=True)
    return {"out": (pr[:, :, None, :] @ v)[:, :, 0, :]}


def mla_params(s, block_n: int = 32, heads_block: int = 0, splits: int = 0, num_warps: int = 0) -> dict:
    """Parameters for cache capacity ``S``. By default SPLITS fills about two waves of 132
    multiprocessors with (head block, split) programs, never more than S / BLOCK_N, and a
    [HEADS_BLOCK, BLOCK_R] fp32 accumulator of 16K or more elements gets 8 warps (unmeasured)."""
    if not heads_block:
        heads_block = min(64, max(16, next_pow2(s["NH"])))
    if not num_warps:
        num_warps = 8 if heads_block * next_pow2(s["R"]) >= 16384 else 4
    hblocks = -(-s["NH"] // heads_block)
    if not splits:
        splits = 1 if s["S"] <= 256 else max(1, min(two_waves({**s, "NKV": hblocks}), -(-s["S"] // block_n)))
    return {"HAS_MASK": s.get("HAS_MASK", 0), "BLOCK_N": block_n, "HEADS_BLOCK": heads_block,
            "BLOCK_R": next_pow2(s["R"]), "BLOCK_DR": max(16, next_pow2(s["DR"])),
            "SPLITS": splits, "SPLITS_BLOCK": next_pow2(splits),
            "BLOCK_L": min(128, next_pow2(s["R"])), "BLOCK_DK": min(32, next_pow2(s["DN"])),
            "BLOCK_DV": min(32, next_pow2(s["DV"])), "BLOCK_RC": min(64, next_pow2(s["R"])),
            "num_warps": num_warps, "num_stages": 2,
            # absent when off: the parameters name the generated code, which stays as it was
            **({"ROPE_Q": 1, "ROPE_LAYOUT": s["ROPE_LAYOUT"], "BLOCK_HALF": next_pow2(s["DR"]) // 2,
                "BLOCK_DR_ROT": next_pow2(s["DR"]), "TWO": 2} if s.get("ROPE_Q", 0) else {})}


def default_params(s):
    return mla_params(s)


def candidates(s):
    out = []
    two = two_waves({**s, "NKV": -(-s["NH"] // 64)})
    for bn in (16, 32, 64):
        for hb in sorted({16, 32, 64, min(64, max(16, next_pow2(s["NH"])))}):
            if hb > max(16, next_pow2(s["NH"])):
                continue
            for splits in sorted({1, 2, 4, 8, 16, 32, 64, 128, two}):
                if splits > 1 and splits * bn > 2 * s["S"]:
                    continue
                for nw in (4, 8):
                    out.append(mla_params(s, bn, hb, splits, nw))
    return out


# DeepSeek-V2-Lite (16 heads, q_proj) and DeepSeek-V3 (128 heads, q_lora_rank 1536):
# kv_lora_rank 512, rope 64, nope 128, v 128
DEEPSEEK_V2_LITE = dict(NH=16, R=512, DR=64, DN=128, DV=128)
DEEPSEEK_V3 = dict(NH=128, R=512, DR=64, DN=128, DV=128)


def _decode_cases(_config):
    # MLA shapes come from DeepSeek's configs, not from the (GQA) model config passed in
    cases = []
    for label, shape in (("v2lite", DEEPSEEK_V2_LITE), ("v3", DEEPSEEK_V3)):
        for cap, fill in ((512, 384), (8192, 4352)):
            cases.append(Case(f"{label}_ctx{fill}", dict(B=1, **shape, S=cap, L=fill),
                              dict(scale=(shape["DN"] + shape["DR"]) ** -0.5)))
    return cases


KERNEL = register(SuiteKernel(
    name="mla_attention",
    summary="DeepSeek MLA decode attention, absorbed, over the latent cache (split-KV)",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("tiny", dict(B=1, NH=2, R=32, DR=16, DN=16, DV=16, S=40), dict(scale=0.18)),
        Case("heads8", dict(B=2, NH=8, R=64, DR=16, DN=32, DV=32, S=70, L=61), dict(scale=0.144),
             params=dict(BLOCK_N=16, BLOCK_L=32, BLOCK_DK=16, BLOCK_DV=16, BLOCK_RC=32)),
        Case("odd", dict(B=1, NH=5, R=48, DR=16, DN=24, DV=20, S=50, L=37), dict(scale=0.16),
             params=dict(BLOCK_N=16)),
        Case("split", dict(B=2, NH=4, R=32, DR=16, DN=16, DV=32, S=100, L=90), dict(scale=0.18),
             params=dict(SPLITS=3, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("split_empty", dict(B=1, NH=3, R=32, DR=16, DN=16, DV=16, S=100, L=20), dict(scale=0.18),
             params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("mask", dict(B=2, NH=4, R=32, DR=16, DN=16, DV=16, S=70, L=61, HAS_MASK=1), dict(scale=0.18),
             params=dict(BLOCK_N=16)),
        Case("mask_split", dict(B=1, NH=6, R=64, DR=16, DN=32, DV=16, S=90, L=85, HAS_MASK=1), dict(scale=0.15),
             params=dict(SPLITS=2, SPLITS_BLOCK=2, BLOCK_N=16)),
        # q_pe rotated in the kernel (ROPE_Q), each pair layout; ROPE_LAYOUT also the reference's scalar
        *[Case(f"rope_q{layout}", dict(B=2, NH=3, R=32, DR=16, DN=16, DV=16, S=50, L=41, HALF=8, ROPE_Q=1,
                                       ROPE_LAYOUT=layout, HAS_MASK=int(layout == 2)),
               dict(scale=0.18, rope_scale=1.1, rope_layout=layout), params=dict(BLOCK_N=16))
          for layout in (0, 1, 2)],
    ],
    decode_cases=_decode_cases,
    # the filled length is a runtime value: tiles are measured per capacity bucket
    tune_keys=("B", "NH", "R", "DR", "DN", "DV", "S"),
    candidates=candidates,
    input_makers={"lengths": _lengths, "key_mask": _key_mask, "w_uk": linear_weight, "w_uv": linear_weight,
                  "pos": positions("S"), "inv_freq": rope_frequencies},
    min_bytes=lambda s, b: (s["B"] * s.get("L", s["S"]) * (s["R"] + s["DR"])
                            + s["NH"] * (s["DN"] + s["DV"]) * s["R"]
                            + s["B"] * s["NH"] * (s["DN"] + s["DR"] + s["DV"])) * b,
    module=__name__,
))
