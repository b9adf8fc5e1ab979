"""qkv_rope_cache (fused): the whole attention input of a decode layer in one launch:
RMSNorm of ``x`` (``input_layernorm``), the q, k and v projections (+ biases), RoPE of
q and k at the row's position, q written out, K and V written into row ``pos`` of the
static caches. Replaces rms_norm, matvec, matvec_pair, rope_q and rope_k.

With ``CACHE_POS`` the cache row comes from its own ``cache_pos`` input (a compiled
transformers graph rotates at ``position_ids`` but writes at the cache's own count, two
tensors that need not agree); with ``ROPE_KIND`` 3 the frequencies come from ``inv_freq``.

A program owns one head of the stacked [q heads | k heads | v heads] and ``BLOCK_J``
rotation pairs ``(j, j + DH/2)`` of it, so both halves of every rotated pair are summed
by the same program and RoPE happens in registers. Each program reads only its own
weight, through one pointer picked by its head kind (``load_pick``; its stores are
``when`` the kind matches), so the three weights stay where transformers keeps them,
unconcatenated.
"""

from tileflow.suite import rms_norm
from tileflow.suite.inputs import linear_weight, positions, rope_frequencies
from tileflow.suite.matvec_family import rsqrt_mean, stream_k
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register
from tileflow.suite.rope import LLAMA3, ROPE_SCALARS, TABLE, inv_freq_tile, rope_reference


def define(k, p):
    kind = p["ROPE_KIND"]
    x = k.input("x", ("M", "K"))
    ln_w = k.input("ln_w", ("K",))
    wq, wk, wv = (k.input(n, (rows, "K")) for n, rows in (("wq", "NQ"), ("wk", "NKD"), ("wv", "NKD")))
    if p["HAS_BIAS"]:
        bq, bk, bv = (k.input(n, (rows,)) for n, rows in (("bq", "NQ"), ("bk", "NKD"), ("bv", "NKD")))
    pos = k.input("pos", ("M",), dtype="i64")
    if p.get("CACHE_POS", 0):
        cache_pos = k.input("cache_pos", ("M",), dtype="i64")
    if kind == TABLE:
        inv_freq = k.input("inv_freq", ("HALF",), dtype="f32")
    q_out = k.output("q", ("M", "NH", "DH"))
    k_cache = k.inout("k_cache", ("M", "NKV", "S", "DH"))
    v_cache = k.inout("v_cache", ("M", "NKV", "S", "DH"))
    eps = k.scalar("eps")
    for name in ROPE_SCALARS[kind]:
        k.scalar(name)
    with k.stage("main", grid=("NH + 2 * NKV", "cdiv(DH // 2, BLOCK_J)", "M")):
        head, row = k.program_id(0), k.program_id(2)
        nh, nkv, dh, kdim = k.dim("NH"), k.dim("NKV"), k.dim("DH"), k.dim("K")
        half = dh // 2
        j0 = k.program_id(1) * k.param("BLOCK_J")
        is_q, is_v = head < nh, head >= nh + nkv
        is_k = (head >= nh) & (head < nh + nkv)
        # per kind, the head index clamped into its view (reads/writes are predicated
        # on the kind, but an address must stay inside the view on every target)
        hq = k.minimum(head, nh - 1)
        hk = k.minimum(k.maximum(head - nh, 0), nkv - 1)
        hv = k.maximum(head - nh - nkv, 0)
        kinds = ((wq, hq, is_q), (wk, hk, is_k), (wv, hv, is_v))
        # the program's rows relative to its head: j0.. (first halves of the rotated
        # pairs) and DH/2 + j0..; each weight read through one pointer picked by kind
        j, jh = k.range(j0, "BLOCK_J"), k.range(half + j0, "BLOCK_J")
        w_pick = [(when, w, h * dh) for w, h, when in kinds]
        # what the epilogue reads besides the sums loads before the dependent-launch wait,
        # not as round trips after the K loop: the biases and the frequency table (weights)
        # and, where the caller vouches that the kernel just before does not write them
        # (EARLY_INPUTS), the positions
        with k.before_wait():
            if p["HAS_BIAS"]:
                b_pick = [(when, b, h * dh) for b, (_, h, when) in zip((bq, bk, bv), kinds)]
                bias = (k.load_pick(b_pick, (j,), limits={0: half}), k.load_pick(b_pick, (jh,), limits={0: dh}))
            inv = k.load(inv_freq, (j,), limits={0: half}) if kind == TABLE else None

        def positions():
            p_int = k.load(pos, (row,))
            return p_int, (k.load(cache_pos, (row,)) if p.get("CACHE_POS", 0) else p_int)

        if p.get("EARLY_INPUTS", 0):
            with k.before_wait():
                p_int, c_row = positions()

        # the norm's rstd scales the sums afterwards (sum(w * x * g) * rstd ==
        # sum(w * (x * rstd) * g)), its sum of squares gathered on the way: the weight
        # stream starts at once
        # weights are no earlier kernel's output: the first tile of this program's rows
        # (of each weight, as the kind is only known at run time) heads for L2 early
        first = k.range(0, "BLOCK_K", aligned=True)
        for w, h, _ in kinds:
            k.prefetch(w, (k.range(h * dh + j0, "BLOCK_J"), first))
            k.prefetch(w, (k.range(h * dh + half + j0, "BLOCK_J"), first))
        acc0 = [k.full(("BLOCK_J", "BLOCK_K"), 0.0) for _ in range(2)] + [k.full(("BLOCK_K",), 0.0)]

        def tiles(cols):
            return [k.load_pick(w_pick, (j, cols), limits={0: half, 1: kdim}),
                    k.load_pick(w_pick, (jh, cols), limits={0: dh, 1: kdim})]

        def body(cols, carry, round_tiles):
            acc_lo, acc_hi, ss = carry
            xraw = k.load(x, (row, cols))
            xv = xraw * k.load(ln_w, (cols,))
            w_lo, w_hi = round_tiles()
            return [acc_lo + w_lo * xv[None, :], acc_hi + w_hi * xv[None, :], ss + xraw * xraw]

        # PIPELINE (see stream_k): a grid of a few hundred programs cannot hide the round
        # trips, and the first tiles load before the PDL wait
        sum_lo, sum_hi, ss = stream_k(k, 0, kdim, acc0, tiles, body, p.get("PIPELINE", 0))
        scale = rsqrt_mean(k, ss, kdim, eps)
        y_lo, y_hi = (k.sum(a, axis=1) * scale for a in (sum_lo, sum_hi))
        if p["HAS_BIAS"]:
            y_lo, y_hi = y_lo + bias[0], y_hi + bias[1]
        if not p.get("EARLY_INPUTS", 0):
            p_int, c_row = positions()
        ang = k.cast(p_int, "f32") * (inv if kind == TABLE else inv_freq_tile(k, kind, j.index, dh))
        c, s = k.cos(ang), k.sin(ang)
        o_lo = k.where(is_v, y_lo, y_lo * c - y_hi * s)
        o_hi = k.where(is_v, y_hi, y_hi * c + y_lo * s)
        k.store(q_out, (row, hq, j), o_lo, limits={2: half}, when=is_q)
        k.store(q_out, (row, hq, jh), o_hi, when=is_q)
        # a row past the cache's end is never written (the integrations raise before such a step)
        inside = k.binary("and", k.binary("ge", c_row, 0), k.binary("lt", c_row, k.dim("S")))
        for cache, h, when in ((k_cache, hk, is_k), (v_cache, hv, is_v)):
            when = k.binary("and", when, inside)
            k.store(cache, (row, h, c_row, j), o_lo, limits={3: half}, when=when)
            k.store(cache, (row, h, c_row, jh), o_hi, when=when)


def reference(xp, x, ln_w, wq, wk, wv, pos, k_cache, v_cache, eps, bq=None, bk=None, bv=None, cache_pos=None,
              **rope):
    m, nkv, s, dh = k_cache.shape
    n = rms_norm.reference(xp, x, ln_w, eps)["out"]
    q, kk, v = (n @ xp.matrix_transpose(w) for w in (wq, wk, wv))
    if bq is not None:
        q, kk, v = q + bq, kk + bk, v + bv
    q = rope_reference(xp, xp.reshape(q, (m, -1, dh)), pos, **rope)
    kk = rope_reference(xp, xp.reshape(kk, (m, nkv, dh)), pos, **rope)
    v = xp.reshape(v, (m, nkv, dh))
    row = pos if cache_pos is None else cache_pos
    at = (xp.arange(s)[None, :] == row[:, None])[:, None, :, None]  # [M, 1, S, 1]
    return {"q": q, "k_cache": xp.where(at, kk[:, :, None, :], k_cache),
            "v_cache": xp.where(at, v[:, :, None, :], v_cache)}


def default_params(s):
    # what both GH100 leaderboards chose at the 1.5B shape (H100 5.82 us, H200 5.50 us
    # against 6.29 for the earlier BLOCK_J=1, BLOCK_K=2048 on the H200)
    return {"BLOCK_J": 4 if s["DH"] >= 8 else 1, "BLOCK_K": min(512, next_pow2(s["K"])), "HAS_BIAS": s.get("HAS_BIAS", 1),
            "ROPE_KIND": s.get("ROPE_KIND", 0), "CACHE_POS": s.get("CACHE_POS", 0),
            "EARLY_INPUTS": s.get("EARLY_INPUTS", 0), "num_warps": 4, "num_stages": 2}


def candidates(s):
    base = default_params(s)
    return [{**base, "BLOCK_J": bj, "BLOCK_K": bk, "num_warps": nw, **({"PIPELINE": 1} if piped else {})}
            for bj in (1, 2, 4, 8) for bk in (512, 1024, 2048, 4096) for nw in (2, 4, 8) for piped in (0, 1)
            if bk <= next_pow2(s["K"]) and 1024 <= 2 * bj * bk <= 16384 and bj <= s["DH"] // 2]


def _sizes(c, S=4096):
    return dict(M=1, K=c["D"], NH=c["NH"], NKV=c["NKV"], DH=c["DH"], NQ=c["NH"] * c["DH"],
                NKD=c["NKV"] * c["DH"], S=S, P=S, HAS_BIAS=c.get("BIAS", 1), ROPE_KIND=0)


def _case(label, M, K, NH, NKV, DH, S, scalars, params=None, **extra):
    sizes = dict(M=M, K=K, NH=NH, NKV=NKV, DH=DH, NQ=NH * DH, NKD=NKV * DH, S=S, P=S, **extra)
    return Case(label, sizes, {"eps": 1e-6, **scalars}, params=params or {})


KERNEL = register(SuiteKernel(
    name="qkv_rope_cache",
    summary="fused: RMSNorm, q/k/v projections (+bias), RoPE, K/V written into the static cache",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        _case("tiny", 1, 32, 2, 1, 16, 8, dict(theta=10000.0)),
        _case("odd", 2, 50, 3, 1, 24, 13, dict(theta=1e6)),
        _case("gqa4-loopk", 1, 300, 4, 1, 8, 9, dict(eps=1e-5, theta=10000.0), dict(BLOCK_K=128, BLOCK_J=2)),
        _case("llama3-nobias", 1, 64, 2, 2, 32, 20, dict(eps=1e-5, **LLAMA3), HAS_BIAS=0, ROPE_KIND=2),
        _case("table-cachepos", 1, 48, 4, 2, 16, 24, {}, dict(BLOCK_J=2), ROPE_KIND=3, CACHE_POS=1, HALF=8),
        _case("table-nobias", 2, 40, 2, 1, 32, 11, dict(eps=1e-5), HAS_BIAS=0, ROPE_KIND=3, CACHE_POS=1, HALF=16),
        _case("pipeline", 1, 300, 4, 2, 16, 9, dict(theta=10000.0), dict(BLOCK_K=128, BLOCK_J=4, PIPELINE=1)),
        _case("first-round", 1, 300, 4, 2, 16, 9, dict(theta=10000.0), dict(BLOCK_K=128, BLOCK_J=4, PIPELINE=2)),
        _case("first-round-early", 1, 300, 4, 2, 16, 9, dict(theta=10000.0), dict(BLOCK_K=128, PIPELINE=2),
              EARLY_INPUTS=1),
        _case("early", 1, 48, 4, 2, 16, 24, {}, dict(BLOCK_J=2), ROPE_KIND=3, CACHE_POS=1, HALF=8, EARLY_INPUTS=1),
        _case("early-pipeline", 1, 300, 4, 2, 16, 9, dict(theta=10000.0), dict(BLOCK_K=128, PIPELINE=1),
              EARLY_INPUTS=1),
    ],
    decode_cases=lambda c: [Case("qkv", _sizes(c), dict(eps=1e-6, theta=10000.0))],
    candidates=candidates,
    input_makers={"wq": linear_weight, "wk": linear_weight, "wv": linear_weight, "pos": positions("P"),
                  "cache_pos": positions("S"), "inv_freq": rope_frequencies},
    min_bytes=lambda s, b: (((s["NQ"] + 2 * s["NKD"]) * (s["K"] + 1) + 2 * s["K"]) * b
                            + (s["NQ"] + 2 * s["NKD"]) * s["M"] * b + 8 * s["M"]),
    fused=True,
    tune_keys=("M", "K", "NH", "NKV", "DH", "HAS_BIAS"),
    module=__name__,
))
