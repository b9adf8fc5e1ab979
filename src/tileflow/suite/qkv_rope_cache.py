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

With ``ROWS = R > 1`` (speculative decoding's verify step) the ``M = B * R`` rows are R
consecutive tokens of each of B sequences: the caches are [B, NKV, S, DH] and row ``m``
writes cache batch row ``m // R`` at its own position (``pos[m]``, or ``cache_pos[m]``).
A program serves ``PROGRAM_ROWS`` consecutive rows (R by default; for a batch of one
token a sequence, R = 1, the caller names it among the sizes: the caches are then [B, ...]
with B = M), so each weight tile is read once for all of them. With ``DOT`` a round's products are one tensor-core dot (tf32 on the fp32
tiles: bf16 weights exact, x rounded less than the model's bf16 matmul rounds it).
"""

from tileflow.suite import rms_norm
from tileflow.suite.inputs import linear_weight, positions, rope_frequencies
from tileflow.suite.matvec_family import rsqrt_mean, stream_k
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register
from tileflow.suite.rope import LLAMA3, ROPE_SCALARS, TABLE, inv_freq_tile, rope_reference


def cache_views(k, kind: int, seqs: str) -> tuple:
    """(k_cache, v_cache, eps): the K and V caches [seqs, NKV, S, DH] (written in place),
    then the runtime scalars, the norm's ``eps`` and the rotation's (``ROPE_SCALARS[kind]``)."""
    k_cache = k.inout("k_cache", (seqs, "NKV", "S", "DH"))
    v_cache = k.inout("v_cache", (seqs, "NKV", "S", "DH"))
    eps = k.scalar("eps")
    for name in ROPE_SCALARS[kind]:
        k.scalar(name)
    return k_cache, v_cache, eps


def head_kinds(k, head, nh, nkv) -> tuple:
    """((is_q, hq), (is_k, hk), (is_v, hv)): whether program ``head`` of the stacked [q | k |
    v] heads is of each kind, and its index clamped into that kind's view (reads and writes
    are predicated on the kind, but an address must stay inside the view on every target)."""
    is_q, is_v = head < nh, head >= nh + nkv
    is_k = (head >= nh) & (head < nh + nkv)
    hq = k.minimum(head, nh - 1)
    hk = k.minimum(k.maximum(head - nh, 0), nkv - 1)
    hv = k.maximum(head - nh - nkv, 0)
    return (is_q, hq), (is_k, hk), (is_v, hv)


def define(k, p):
    kind = p["ROPE_KIND"]
    # R tokens a sequence (structural); the rows a program serves (a launch parameter)
    per_seq, rows = p.get("ROWS", 1), p.get("PROGRAM_ROWS", p.get("ROWS", 1))
    dot = rows > 1 and bool(p.get("DOT", 0))
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
    seqs = "B" if rows > 1 else "M"
    grid_rows = "cdiv(M, PROGRAM_ROWS)" if rows > 1 else "M"
    k_cache, v_cache, eps = cache_views(k, kind, seqs)
    with k.stage("main", grid=("NH + 2 * NKV", "cdiv(DH // 2, BLOCK_J)", grid_rows)):
        head, row = k.program_id(0), k.program_id(2)
        if rows > 1:  # program `row` serves rows row * PROGRAM_ROWS .. (to M)
            first_row = row * k.param("PROGRAM_ROWS")
            rr = k.range(first_row, "ROWS_BLOCK")
            rows_end = k.minimum(first_row + k.param("PROGRAM_ROWS"), k.dim("M"))
        nh, nkv, dh, kdim = k.dim("NH"), k.dim("NKV"), k.dim("DH"), k.dim("K")
        half = dh // 2
        j0 = k.program_id(1) * k.param("BLOCK_J")
        (is_q, hq), (is_k, hk), (is_v, hv) = head_kinds(k, head, nh, nkv)
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
            if rows > 1:  # the rotation's positions as a tile, the cache rows one per row
                at = cache_pos if p.get("CACHE_POS", 0) else pos
                # a row past M (the last program's) reads row M - 1, and writes nothing
                last = k.dim("M") - 1
                return (k.load(pos, (rr,), limits={0: rows_end}),
                        [k.load(at, (k.minimum(first_row + i, last),)) for i in range(rows)])
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
        if rows > 1:
            acc0 = [k.full(("ROWS_BLOCK", "BLOCK_J"), 0.0) for _ in range(2)] + [k.full(("ROWS_BLOCK", "BLOCK_K"), 0.0)]
        else:
            acc0 = [k.full(("BLOCK_J", "BLOCK_K"), 0.0) for _ in range(2)] + [k.full(("BLOCK_K",), 0.0)]

        def tiles(cols):
            return [k.load_pick(w_pick, (j, cols), limits={0: half, 1: kdim}),
                    k.load_pick(w_pick, (jh, cols), limits={0: dh, 1: kdim})]

        def body_rows(cols, carry, round_tiles):
            # each weight tile meets all the program's rows; the products reduce over K
            # every round (a dot, or a sum: R [BLOCK_J, BLOCK_K] accumulators would not fit)
            acc_lo, acc_hi, ss = carry
            xraw = k.load(x, (rr, cols), limits={0: rows_end})
            xv = xraw * k.load(ln_w, (cols,))[None, :]
            w_lo, w_hi = round_tiles()
            if dot:
                return [acc_lo + k.dot(xv, k.trans(w_lo)), acc_hi + k.dot(xv, k.trans(w_hi)), ss + xraw * xraw]
            xv = xv[:, None, :]
            return [acc_lo + k.sum(w_lo[None, :, :] * xv, axis=2), acc_hi + k.sum(w_hi[None, :, :] * xv, axis=2),
                    ss + xraw * xraw]

        def body(cols, carry, round_tiles):
            acc_lo, acc_hi, ss = carry
            xraw = k.load(x, (row, cols))
            xv = xraw * k.load(ln_w, (cols,))
            w_lo, w_hi = round_tiles()
            return [acc_lo + w_lo * xv[None, :], acc_hi + w_hi * xv[None, :], ss + xraw * xraw]

        # PIPELINE (see stream_k): a grid of a few hundred programs cannot hide the round
        # trips, and the first tiles load before the PDL wait
        if rows > 1:
            sum_lo, sum_hi, ss = stream_k(k, 0, kdim, acc0, tiles, body_rows, p.get("PIPELINE", 0))
            scale = k.rsqrt(k.sum(ss, axis=1) / k.cast(kdim, "f32") + eps)[:, None]
            y_lo, y_hi = sum_lo * scale, sum_hi * scale
            if p["HAS_BIAS"]:
                y_lo, y_hi = y_lo + bias[0][None, :], y_hi + bias[1][None, :]
        else:
            sum_lo, sum_hi, ss = stream_k(k, 0, kdim, acc0, tiles, body, p.get("PIPELINE", 0))
            scale = rsqrt_mean(k, ss, kdim, eps)
            y_lo, y_hi = (k.sum(a, axis=1) * scale for a in (sum_lo, sum_hi))
            if p["HAS_BIAS"]:
                y_lo, y_hi = y_lo + bias[0], y_hi + bias[1]
        if not p.get("EARLY_INPUTS", 0):
            p_int, c_row = positions()
        if rows > 1:
            inv_j = inv if kind == TABLE else inv_freq_tile(k, kind, j.index, dh)
            ang = k.cast(p_int, "f32")[:, None] * inv_j[None, :]
        else:
            ang = k.cast(p_int, "f32") * (inv if kind == TABLE else inv_freq_tile(k, kind, j.index, dh))
        c, s = k.cos(ang), k.sin(ang)
        o_lo = k.where(is_v, y_lo, y_lo * c - y_hi * s)
        o_hi = k.where(is_v, y_hi, y_hi * c + y_lo * s)
        if rows > 1:
            store_rows(k, (q_out, k_cache, v_cache), (hq, hk, hv), (is_q, is_k, is_v), (j, jh), (rr, rows_end),
                       first_row, per_seq, c_row, o_lo, o_hi)
            return
        k.store(q_out, (row, hq, j), o_lo, limits={2: half}, when=is_q)
        k.store(q_out, (row, hq, jh), o_hi, when=is_q)
        # a row past the cache's end is never written (the integrations raise before such a step)
        inside = k.binary("and", k.binary("ge", c_row, 0), k.binary("lt", c_row, k.dim("S")))
        for cache, h, when in ((k_cache, hk, is_k), (v_cache, hv, is_v)):
            when = k.binary("and", when, inside)
            k.store(cache, (row, h, c_row, j), o_lo, limits={3: half}, when=when)
            k.store(cache, (row, h, c_row, jh), o_hi, when=when)


def store_rows(k, views, heads, kinds, js, rows_range, first_row, per_seq, c_rows, o_lo, o_hi):
    """Several rows a program: q of the rows as one block; K / V row by row, each at its
    own cache row of its sequence (row m's is m // ``per_seq``), none past M."""
    q_out, k_cache, v_cache = views
    hq, hk, hv = heads
    is_q, is_k, is_v = kinds
    j, jh = js
    rr, rows_end = rows_range
    half = k.dim("DH") // 2
    k.store(q_out, (rr, hq, j), o_lo, limits={0: rows_end, 2: half}, when=is_q)
    k.store(q_out, (rr, hq, jh), o_hi, limits={0: rows_end}, when=is_q)
    pick = k.range(0, "ROWS_BLOCK", aligned=True)
    for i, c_row in enumerate(c_rows):
        # row i out of the tile: a cache row index per tile row is no block access
        mine = k.eq(pick.index, i)[:, None]
        lo_i, hi_i = (k.sum(k.where(mine, o, 0.0), axis=0) for o in (o_lo, o_hi))
        inside = k.binary("and", k.binary("ge", c_row, 0), k.binary("lt", c_row, k.dim("S")))
        inside = k.binary("and", inside, k.binary("lt", first_row + i, rows_end))
        seq = (first_row + i) // per_seq if per_seq > 1 else first_row + i
        for cache, h, when in ((k_cache, hk, is_k), (v_cache, hv, is_v)):
            when = k.binary("and", when, inside)
            k.store(cache, (seq, h, c_row, j), lo_i, limits={3: half}, when=when)
            k.store(cache, (seq, h, c_row, jh), hi_i, when=when)


def reference(xp, x, ln_w, wq, wk, wv, pos, k_cache, v_cache, eps, bq=None, bk=None, bv=None, cache_pos=None,
              **rope):
    if x.shape[0] != k_cache.shape[0]:
        return rows_reference(xp, x, ln_w, wq, wk, wv, pos, k_cache, v_cache, eps, bq, bk, bv, cache_pos, **rope)
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


def rows_reference(xp, x, ln_w, wq, wk, wv, pos, k_cache, v_cache, eps, bq=None, bk=None, bv=None,
                   cache_pos=None, **rope):
    """ROWS > 1: M = B * R rows, caches [B, NKV, S, DH], row m written into batch row m // R."""
    n = rms_norm.reference(xp, x, ln_w, eps)["out"]
    q, kk, v = (n @ xp.matrix_transpose(w) for w in (wq, wk, wv))
    if bq is not None:
        q, kk, v = q + bq, kk + bk, v + bv
    return rope_cache_reference(xp, q, kk, v, pos, k_cache, v_cache, cache_pos, **rope)


def rope_cache_reference(xp, q, kk, v, pos, k_cache, v_cache, cache_pos=None, **rope) -> dict:
    """q rotated [M, NH, DH] and the caches with K (rotated) and V written at ``cache_pos`` (or
    ``pos``), from the projections q [M, NQ], k / v [M, NKD]; M = B * R rows, row m into batch
    row m // R (the quantized forms' reference too)."""
    bsz, nkv, s, dh = k_cache.shape
    m = q.shape[0]
    q = rope_reference(xp, xp.reshape(q, (m, -1, dh)), pos, **rope)
    kk = xp.reshape(rope_reference(xp, xp.reshape(kk, (m, nkv, dh)), pos, **rope), (bsz, -1, nkv, 1, dh))
    v = xp.reshape(v, (bsz, -1, nkv, 1, dh))
    row = pos if cache_pos is None else cache_pos
    at = xp.reshape(xp.arange(s)[None, :] == row[:, None], (bsz, -1, 1, s, 1))  # [B, R, 1, S, 1]
    hit = xp.any(at, axis=1)  # a sequence's rows are distinct: at most one writes a cache row

    def write(new, cache):
        return xp.where(hit, xp.sum(xp.where(at, new, 0.0), axis=1), cache)

    return {"q": q, "k_cache": write(kk, k_cache), "v_cache": write(v, v_cache)}


def default_params(s):
    # what both GH100 leaderboards chose at the 1.5B shape (H100 5.82 us, H200 5.50 us
    # against 6.29 for the earlier BLOCK_J=1, BLOCK_K=2048 on the H200)
    params = {"BLOCK_J": 4 if s["DH"] >= 8 else 1, "BLOCK_K": min(512, next_pow2(s["K"])),
              "HAS_BIAS": s.get("HAS_BIAS", 1), "ROPE_KIND": s.get("ROPE_KIND", 0), "CACHE_POS": s.get("CACHE_POS", 0),
              "EARLY_INPUTS": s.get("EARLY_INPUTS", 0), "num_warps": 4, "num_stages": 2}
    rows = s.get("ROWS", 1)
    if rows > 1 or s.get("PROGRAM_ROWS", 1) > 1:
        # several rows a program (a sequence's R tokens, or a batch's rows: PROGRAM_ROWS in
        # the sizes, as the caller chose it): each weight tile meets them all; a dot where
        # the tiles can be 16 wide (DH >= 32)
        program_rows = s.get("PROGRAM_ROWS", rows)
        if rows > 1:
            params["ROWS"] = rows
        if s["DH"] >= 32:
            params.update(PROGRAM_ROWS=program_rows, DOT=1, ROWS_BLOCK=max(16, next_pow2(program_rows)), BLOCK_J=16,
                          BLOCK_K=min(128, max(16, next_pow2(s["K"]))), num_stages=3)
        else:  # R rows share each [BLOCK_J, BLOCK_K] round: a narrower K round keeps the products small
            params.update(PROGRAM_ROWS=program_rows, ROWS_BLOCK=next_pow2(program_rows),
                          BLOCK_K=min(max(64, 1024 // next_pow2(program_rows)), next_pow2(s["K"])))
    return params


def candidates(s):
    base = default_params(s)
    if "PROGRAM_ROWS" in base:  # several rows a program: dot tiles (16 wide and more), or summed products
        dots = [{**base, "BLOCK_J": bj, "BLOCK_K": bk, "num_warps": nw, "num_stages": st}
                for bj in (16, 32) for bk in (64, 128, 256) for nw in (4, 8) for st in (2, 3, 4)
                if base.get("DOT") and bk <= max(16, next_pow2(s["K"])) and bj <= s["DH"] // 2]
        # the summed form: narrower tiles, so more programs (a dot needs 16 rotation pairs a program)
        summed = {k: v for k, v in base.items() if k != "DOT"}
        summed["ROWS_BLOCK"] = rb = next_pow2(base["PROGRAM_ROWS"])
        return dots + [{**summed, "BLOCK_J": bj, "BLOCK_K": bk, "num_warps": nw, "num_stages": 2,
                        **({"PIPELINE": 1} if piped else {})}
                       for bj in (1, 2, 4, 8) for bk in (64, 128, 256, 512, 1024) for nw in (2, 4, 8)
                       for piped in (0, 1)
                       if bk <= next_pow2(s["K"]) and 1024 <= 2 * rb * bj * bk <= 16384 and bj <= s["DH"] // 2]
    return [{**base, "BLOCK_J": bj, "BLOCK_K": bk, "num_warps": nw, **({"PIPELINE": 1} if piped else {})}
            for bj in (1, 2, 4, 8) for bk in (512, 1024, 2048, 4096) for nw in (2, 4, 8) for piped in (0, 1)
            if bk <= next_pow2(s["K"]) and 1024 <= 2 * bj * bk <= 16384 and bj <= s["DH"] // 2]


def _sizes(c, S=4096):
    return dict(M=1, K=c["D"], NH=c["NH"], NKV=c["NKV"], DH=c["DH"], NQ=c["NH"] * c["DH"],
                NKD=c["NKV"] * c["DH"], S=S, P=S, HAS_BIAS=c.get("BIAS", 1), ROPE_KIND=0)


def _positions(max_key: str):
    """Positions in [0, sizes[max_key]); with ROWS > 1 each sequence's R rows consecutive."""
    plain = positions(max_key)

    def draw(gen, shape, sizes):
        import torch

        rows = sizes.get("ROWS", 1)
        if rows == 1:
            return plain(gen, shape, sizes)
        start = torch.randint(0, sizes[max_key] - rows + 1, (shape[0] // rows, 1), generator=gen, dtype=torch.int64)
        return (start + torch.arange(rows)).reshape(shape)
    return draw


def _case(label, M, K, NH, NKV, DH, S, scalars, params=None, **extra):
    sizes = dict(M=M, K=K, NH=NH, NKV=NKV, DH=DH, NQ=NH * DH, NKD=NKV * DH, S=S, P=S, **extra)
    sizes.setdefault("B", M // sizes.get("ROWS", 1))  # the caches' sequences
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
        # ROWS consecutive tokens of each sequence (speculative verify): M = B * ROWS
        _case("rows2", 4, 40, 2, 1, 16, 12, dict(theta=10000.0), ROWS=2, B=2),
        _case("rows5-table-cachepos", 5, 48, 4, 2, 16, 16, {}, ROPE_KIND=3, CACHE_POS=1, HALF=8, ROWS=5, B=1),
        _case("rows8-loopk-pipeline", 8, 200, 2, 1, 16, 14, dict(theta=10000.0), dict(BLOCK_K=64, PIPELINE=1),
              ROWS=8, B=1),
        _case("rows3-early-nobias", 6, 130, 2, 2, 8, 10, dict(eps=1e-5, **LLAMA3), dict(BLOCK_K=64, PIPELINE=2),
              HAS_BIAS=0, ROPE_KIND=2, EARLY_INPUTS=1, ROWS=3, B=2),
        # heads of 32 and more: the rows' products as a dot (16-wide tiles); a batch of one
        # token a sequence in one program of rows, a last program past M, a verify step
        _case("batch20-dot", 20, 64, 2, 1, 32, 30, dict(theta=10000.0), PROGRAM_ROWS=16),
        _case("batch5-dot-table-cachepos", 5, 48, 2, 2, 32, 12, {}, ROPE_KIND=3, CACHE_POS=1, HALF=16,
              PROGRAM_ROWS=5),
        _case("batch3-sum", 3, 40, 2, 1, 16, 9, dict(theta=10000.0), PROGRAM_ROWS=3),
        _case("rows3-dot-nobias", 6, 100, 2, 1, 32, 10, dict(eps=1e-5, theta=1e6), HAS_BIAS=0, ROWS=3, B=2),
    ],
    decode_cases=lambda c: [Case("qkv", _sizes(c), dict(eps=1e-6, theta=10000.0))],
    candidates=candidates,
    input_makers={"wq": linear_weight, "wk": linear_weight, "wv": linear_weight, "pos": _positions("P"),
                  "cache_pos": _positions("S"), "inv_freq": rope_frequencies},
    min_bytes=lambda s, b: (((s["NQ"] + 2 * s["NKD"]) * (s["K"] + 1) + 2 * s["K"]) * b
                            + (s["NQ"] + 2 * s["NKD"]) * s["M"] * b + 8 * s["M"]),
    fused=True,
    tune_keys=("M", "K", "NH", "NKV", "DH", "HAS_BIAS", "ROWS"),  # ROWS absent at 1: R == 1 keys as shipped
    module=__name__,
))
