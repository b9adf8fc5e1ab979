"""gqa_attention: one new query token per sequence attends over the static KV
cache, grouped-query (``G = NH / NKV`` query heads share each K/V head).

- Reads the cache only up to each row's filled length ``lengths[b]`` (an int tensor,
  so a captured CUDA graph stays right as the cache fills); no cap on the context.
- One program per (KV head, split): the ``G`` query heads of a group are the rows of
  one ``[GROUP_BLOCK, DH]`` tile, so each K/V block is read once for the whole
  group, and scores / outputs are tile matmuls (``tl.dot`` wants 16 rows: the group is
  padded to ``GROUP_BLOCK >= 16``; padded rows are zero queries, never stored).
- Online softmax in fp32 over ``BLOCK_N`` positions at a time. With ``SPLITS > 1`` the
  context is cut into chunks (flash-decoding) written as (max, sum, acc) partials,
  then a second stage combines them; with ``SPLITS == 1`` the first stage finishes.
  (The combine inside the first launch, by its last program or behind a grid barrier,
  measured slower: docs/decisions.md.)
- With ``EARLY_INPUTS`` the lengths load before the dependent-launch wait (the caller
  vouches that the kernel just before does not write them).
- With ``HAS_MASK`` a key mask ``key_mask[b, j]`` (int, 0 = hidden) further hides cache
  rows, e.g. transformers' padding mask; a block hidden entirely adds nothing (its
  running max stays -inf and is read as 0), a row hidden entirely is NaN, as in SDPA.
- With ``ROWS = R > 1`` (speculative decoding's verify step: R consecutive new tokens of
  one sequence) ``q`` and ``out`` are [B, R, NH, DH]; ``lengths[b]`` counts the filled
  rows including all R new ones, and new row ``i`` sees cache rows
  ``j < lengths[b] - R + 1 + i`` (causal among the new rows; ``lengths[b] >= R``). The
  R x G query rows of a group are one tile: a [ROWS_BLOCK, HEADS_BLOCK, DH] load reshaped
  to [GROUP_BLOCK, DH] (row ``t`` is new row ``t // HEADS_BLOCK``), so each K/V block is
  still read once per group, each tile row masked at its own limit.
"""

from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


def attention_inputs(k, p) -> dict:
    """Declares the attention inputs (``q``, the caches, ``lengths``, ``key_mask`` with
    ``HAS_MASK``), shared with the kernels that fuse this attention."""
    q_shape = ("B", "ROWS", "NH", "DH") if p.get("ROWS", 1) > 1 else ("B", "NH", "DH")
    views = {"q": k.input("q", q_shape), "k_cache": k.input("k_cache", ("B", "NKV", "S", "DH")),
             "v_cache": k.input("v_cache", ("B", "NKV", "S", "DH")),
             "lengths": k.input("lengths", ("B",), dtype="i64")}
    if p.get("HAS_MASK", 0):
        views["key_mask"] = k.input("key_mask", ("B", "S"), dtype="i32")
    return views


def split_pass(k, p, views: dict, scale):
    """Inside a stage over grid (NKV, SPLITS, B): program (kvh, sp, b) runs the online
    softmax of KV head ``kvh``'s query group over split ``sp`` of the filled cache.
    Returns (b, kvh, sp, heads, heads_end, d, m, l, acc): the group's query-head range
    (over HEADS_BLOCK with ROWS > 1, GROUP_BLOCK else) and its end, the head-dim range,
    and the split's running max, sum and fp32 output ([GROUP_BLOCK] rows)."""
    q, k_cache, v_cache, lengths = (views[n] for n in ("q", "k_cache", "v_cache", "lengths"))
    masked = p.get("HAS_MASK", 0)
    rows = p.get("ROWS", 1)
    kvh, sp, b = k.program_id(0), k.program_id(1), k.program_id(2)
    g = k.dim("NH") // k.dim("NKV")
    heads, heads_end = k.range(kvh * g, "HEADS_BLOCK" if rows > 1 else "GROUP_BLOCK"), kvh * g + g
    d = k.range(0, "BLOCK_DH", aligned=True)
    if p.get("EARLY_INPUTS", 0):  # the caller vouches: lengths is not the previous kernel's output
        with k.before_wait():
            length = k.cast(k.load(lengths, (b,)), "i32")
    if rows > 1:  # the R new rows x G heads, one dot operand: K/V blocks read once for all
        r = k.range(0, "ROWS_BLOCK", aligned=True)
        q3 = k.load(q, (b, r, heads, d), limits={2: heads_end}, for_dot=True)
        qt = k.reshape(q3, ("GROUP_BLOCK", "BLOCK_DH"))
    else:
        qt = k.load(q, (b, heads, d), limits={1: heads_end}, for_dot=True)
    if not p.get("EARLY_INPUTS", 0):
        length = k.cast(k.load(lengths, (b,)), "i32")
    bn = k.param("BLOCK_N")
    chunk = k.cdiv(k.cdiv(length, k.param("SPLITS")), bn) * bn
    lo = sp * chunk
    hi = k.minimum(lo + chunk, length)
    if rows > 1:  # tile row t is new row t // HEADS_BLOCK: it sees length - R + 1 + that row
        t = k.range(0, "GROUP_BLOCK", aligned=True)
        row_hi = k.minimum(length - (rows - 1) + t.index // k.param("HEADS_BLOCK"), hi)
    m0 = k.full(("GROUP_BLOCK",), float("-inf"))
    l0 = k.full(("GROUP_BLOCK",), 0.0)
    a0 = k.full(("GROUP_BLOCK", "BLOCK_DH"), 0.0)
    with k.loop(lo, hi, "BLOCK_N", carry=(m0, l0, a0)) as lp:
        m, l, acc = lp.carry
        n = k.range(lp.index, "BLOCK_N", aligned=True)
        kt = k.load(k_cache, (b, kvh, n, d), limits={2: hi}, for_dot=True)
        vt = k.load(v_cache, (b, kvh, n, d), limits={2: hi}, for_dot=True)
        s = k.dot(qt, k.trans(kt)) * scale
        if rows > 1:
            live = n.index[None, :] < row_hi[:, None]
            if masked:
                live = live & (k.load(views["key_mask"], (b, n), limits={1: hi}) > 0)[None, :]
        else:
            live = n.index < hi
            if masked:
                live = live & (k.load(views["key_mask"], (b, n), limits={1: hi}) > 0)
            live = live[None, :]
        s = k.where(live, s, float("-inf"))
        m_new = k.maximum(m, k.max(s, axis=1))
        if masked or rows > 1:  # rows with nothing live yet: exp(-inf - -inf) would be NaN
            m_use = k.where(m_new > float("-inf"), m_new, 0.0)
        else:
            m_use = m_new
        alpha = k.exp(m - m_use)
        pr = k.exp(s - m_use[:, None])
        lp.next(m_new, l * alpha + k.sum(pr, axis=1), acc * alpha[:, None] + k.dot(pr, vt))
    m, l, acc = lp.results
    return b, kvh, sp, heads, heads_end, d, m, l, acc


def define(k, p):
    if p.get("ROWS", 1) > 1:
        return define_rows(k, p)
    views = attention_inputs(k, p)
    out = k.output("out", ("B", "NH", "DH"))
    scale = k.scalar("scale")
    split = p["SPLITS"] > 1
    if split:
        ws_m = k.workspace("part_m", ("B", "NKV", "SPLITS", "GROUP_BLOCK"))
        ws_l = k.workspace("part_l", ("B", "NKV", "SPLITS", "GROUP_BLOCK"))
        ws_acc = k.workspace("part_acc", ("B", "NKV", "SPLITS", "GROUP_BLOCK", "BLOCK_DH"))

    with k.stage("partial", grid=("NKV", "SPLITS", "B")):
        b, kvh, sp, heads, heads_end, d, m, l, acc = split_pass(k, p, views, scale)
        if split:  # only the group's real rows: padded rows would be pure write traffic
            rows = k.range(0, "GROUP_BLOCK", aligned=True)
            g = k.dim("NH") // k.dim("NKV")
            k.store(ws_m, (b, kvh, sp, rows), m, limits={3: g})
            k.store(ws_l, (b, kvh, sp, rows), l, limits={3: g})
            k.store(ws_acc, (b, kvh, sp, rows, d), acc, limits={3: g})
        else:
            k.store(out, (b, heads, d), acc / l[:, None], limits={1: heads_end})

    if split:
        combine(k, (ws_m, ws_l, ws_acc), out, rows=1)


def combine(k, parts, out, rows: int) -> None:
    """The second stage with SPLITS > 1: each query head's (and with ``rows`` > 1 each new
    row's) split partials combined. One program per query head loads every split of its
    partials at once: a loop over splits would serialise SPLITS round trips to L2."""
    ws_m, ws_l, ws_acc = parts
    with k.stage("combine", grid=("NH", "B" if rows == 1 else "B * ROWS", "cdiv(DH, BLOCK_DC)")):
        h, b = k.program_id(0), k.program_id(1)
        row = ()
        if rows > 1:  # the grid's second axis runs over (sequence, new row) pairs
            br = b
            b = br // k.param("ROWS")
            row = (br - b * k.param("ROWS"),)
        g = k.dim("NH") // k.dim("NKV")
        kvh = h // g
        j = h - kvh * g
        sp = k.range(0, "SPLITS_BLOCK", aligned=True)
        d = k.range(k.program_id(2) * k.param("BLOCK_DC"), "BLOCK_DC", aligned=True)
        nsp = k.param("SPLITS")
        m = k.load(ws_m, (b, kvh, sp, *row, j), limits={2: nsp}, other=float("-inf"))
        wgt = k.exp(m - k.max(m, axis=0))  # splits with nothing live (for this row) hold m = -inf: weight 0
        l = k.sum(wgt * k.load(ws_l, (b, kvh, sp, *row, j), limits={2: nsp}), axis=0)
        acc = k.sum(wgt[:, None] * k.load(ws_acc, (b, kvh, sp, *row, j, d), limits={2: nsp}), axis=0)
        k.store(out, (b, *row, h, d), acc / l)


def define_rows(k, p):
    """ROWS = R > 1: as ``define``, with the R new rows of each sequence in one tile."""
    views = attention_inputs(k, p)
    out = k.output("out", ("B", "ROWS", "NH", "DH"))
    scale = k.scalar("scale")
    split = p["SPLITS"] > 1
    if split:  # partials per (new row, head of the group)
        ws_m = k.workspace("part_m", ("B", "NKV", "SPLITS", "ROWS", "HEADS_BLOCK"))
        ws_l = k.workspace("part_l", ("B", "NKV", "SPLITS", "ROWS", "HEADS_BLOCK"))
        ws_acc = k.workspace("part_acc", ("B", "NKV", "SPLITS", "ROWS", "HEADS_BLOCK", "BLOCK_DH"))

    with k.stage("partial", grid=("NKV", "SPLITS", "B")):
        b, kvh, sp, heads, heads_end, d, m, l, acc = split_pass(k, p, views, scale)
        r = k.range(0, "ROWS_BLOCK", aligned=True)
        rows3, rows2 = ("ROWS_BLOCK", "HEADS_BLOCK", "BLOCK_DH"), ("ROWS_BLOCK", "HEADS_BLOCK")
        if split:  # only the real (row, head) pairs: padded ones would be pure write traffic
            hs = k.range(0, "HEADS_BLOCK", aligned=True)
            g = k.dim("NH") // k.dim("NKV")
            k.store(ws_m, (b, kvh, sp, r, hs), k.reshape(m, rows2), limits={4: g})
            k.store(ws_l, (b, kvh, sp, r, hs), k.reshape(l, rows2), limits={4: g})
            k.store(ws_acc, (b, kvh, sp, r, hs, d), k.reshape(acc, rows3), limits={4: g})
        else:
            k.store(out, (b, r, heads, d), k.reshape(acc / l[:, None], rows3), limits={2: heads_end})

    if split:
        combine(k, (ws_m, ws_l, ws_acc), out, rows=p["ROWS"])


def reference(xp, q, k_cache, v_cache, lengths, scale, key_mask=None):
    if q.ndim == 4:
        return rows_reference(xp, q, k_cache, v_cache, lengths, scale, key_mask)
    bsz, nh, dh = q.shape
    nkv, s = k_cache.shape[1], k_cache.shape[2]
    g = nh // nkv
    qg = xp.reshape(q, (bsz, nkv, g, dh))
    scores = (qg @ xp.matrix_transpose(k_cache)) * scale  # [B, NKV, G, S]
    valid = xp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    if key_mask is not None:
        valid = valid & (key_mask > 0)
    scores = xp.where(valid[:, None, None, :], scores, -xp.inf)
    scores = scores - xp.max(scores, axis=-1, keepdims=True)
    pr = xp.exp(scores)
    pr = pr / xp.sum(pr, axis=-1, keepdims=True)
    return {"out": xp.reshape(pr @ v_cache, (bsz, nh, dh))}


def rows_reference(xp, q, k_cache, v_cache, lengths, scale, key_mask=None):
    """ROWS > 1: q [B, R, NH, DH]; new row i sees cache rows j < lengths[b] - R + 1 + i."""
    bsz, nr, nh, dh = q.shape
    nkv, s = k_cache.shape[1], k_cache.shape[2]
    g = nh // nkv
    qg = xp.reshape(xp.permute_dims(xp.reshape(q, (bsz, nr, nkv, g, dh)), (0, 2, 1, 3, 4)), (bsz, nkv, nr * g, dh))
    scores = xp.reshape((qg @ xp.matrix_transpose(k_cache)) * scale, (bsz, nkv, nr, g, s))
    limit = lengths[:, None] - nr + 1 + xp.arange(nr)[None, :]  # [B, R]
    valid = xp.arange(s)[None, None, :] < limit[:, :, None]  # [B, R, S]
    if key_mask is not None:
        valid = valid & (key_mask > 0)[:, None, :]
    scores = xp.where(valid[:, None, :, None, :], scores, -xp.inf)
    scores = scores - xp.max(scores, axis=-1, keepdims=True)
    pr = xp.exp(scores)
    pr = xp.reshape(pr / xp.sum(pr, axis=-1, keepdims=True), (bsz, nkv, nr * g, s))
    o = xp.reshape(pr @ v_cache, (bsz, nkv, nr, g, dh))
    return {"out": xp.reshape(xp.permute_dims(o, (0, 2, 1, 3, 4)), (bsz, nr, nh, dh))}


# (KV head, split) programs that fill two waves of an H100 / H200's 132 multiprocessors
TWO_WAVES = 2 * 132


def two_waves(s) -> int:
    """Splits a (batch, KV head) pair for two waves of programs."""
    return TWO_WAVES // (s.get("B", 1) * s["NKV"])


def attention_params(s, block_n: int = 64, splits: int = 0, num_warps: int = 4) -> dict:
    """Parameters for cache capacity ``S`` (the filled length is a runtime value: the
    chunk per split grows with it). By default SPLITS fills about two waves of 132
    multiprocessors with (KV head, split) programs, never more than S / BLOCK_N."""
    g = s["NH"] // s["NKV"]
    if not splits:
        splits = 1 if s["S"] <= 256 else max(1, min(two_waves(s), -(-s["S"] // block_n)))
    params = {"HAS_MASK": s.get("HAS_MASK", 0), "EARLY_INPUTS": s.get("EARLY_INPUTS", 0),
              "BLOCK_N": block_n, "GROUP_BLOCK": max(16, next_pow2(g)), "BLOCK_DH": max(16, next_pow2(s["DH"])),
              "SPLITS": splits, "SPLITS_BLOCK": next_pow2(splits), "BLOCK_DC": min(32, max(16, next_pow2(s["DH"]))),
              "num_warps": num_warps, "num_stages": 2}
    rows = s.get("ROWS", 1)
    if rows > 1:  # the tile is ROWS_BLOCK x HEADS_BLOCK rows, at least the 16 a dot wants
        heads = next_pow2(g)
        params.update(ROWS=rows, HEADS_BLOCK=heads, ROWS_BLOCK=max(next_pow2(rows), -(-16 // heads)))
        params["GROUP_BLOCK"] = params["ROWS_BLOCK"] * heads
    return params


def default_params(s):
    return attention_params(s)


def candidates(s):
    out = []
    # the default fills two waves; at a long capacity fewer splits measured far slower (an
    # H100 tune at prompt 32768: 132 -> 64 splits +10% a step), so four and eight waves too
    two = two_waves(s)
    for bn in (16, 32, 64, 128):
        for splits in sorted({1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 2 * two, 4 * two}):  # a set: 2 * two may be listed
            if splits > 1 and splits * bn > 2 * s["S"]:
                continue
            for nw in (2, 4, 8):
                out.append(attention_params(s, bn, splits, nw))
    return out


def _lengths(gen, shape, sizes):
    import torch

    if "L" in sizes:
        return torch.full(shape, sizes["L"], dtype=torch.int64)
    # with ROWS new rows the filled length counts them all
    return torch.randint(sizes.get("ROWS", 1), sizes["S"] + 1, shape, generator=gen, dtype=torch.int64)


def _key_mask(gen, shape, sizes):
    """Left padding (the first rows hidden, whole blocks of them) and scattered holes."""
    import torch

    m = (torch.rand(shape, generator=gen) > 0.3).to(torch.int32)
    m[:, : min(shape[1] - 1, 20)] = 0
    m[:, -1] = 1
    return m


KERNEL = register(SuiteKernel(
    name="gqa_attention",
    summary="GQA decode attention over the filled part of a static KV cache (split-KV)",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("tiny", dict(B=1, NH=2, NKV=1, DH=16, S=16), dict(scale=0.25)),
        Case("mha", dict(B=1, NH=3, NKV=3, DH=32, S=40, L=33), dict(scale=0.18)),
        Case("gqa6", dict(B=1, NH=12, NKV=2, DH=24, S=70, L=65), dict(scale=0.2)),
        Case("gqa8", dict(B=2, NH=16, NKV=2, DH=16, S=50), dict(scale=0.25)),
        Case("edge", dict(B=1, NH=4, NKV=1, DH=16, S=64, L=17), dict(scale=0.25), params=dict(BLOCK_N=16)),
        Case("split", dict(B=1, NH=6, NKV=2, DH=32, S=300, L=259), dict(scale=0.17),
             params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("split_odd", dict(B=2, NH=10, NKV=2, DH=16, S=200, L=150), dict(scale=0.25),
             params=dict(SPLITS=3, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("split_empty", dict(B=1, NH=4, NKV=2, DH=16, S=100, L=20), dict(scale=0.25),
             params=dict(SPLITS=8, SPLITS_BLOCK=8, BLOCK_N=16)),
        Case("mask", dict(B=2, NH=4, NKV=2, DH=16, S=70, L=61, HAS_MASK=1), dict(scale=0.25),
             params=dict(BLOCK_N=16)),
        Case("mask_split", dict(B=1, NH=6, NKV=2, DH=32, S=300, L=259, HAS_MASK=1), dict(scale=0.17),
             params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("early", dict(B=1, NH=6, NKV=2, DH=32, S=300, L=259, EARLY_INPUTS=1), dict(scale=0.17),
             params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16)),
        # ROWS new rows of one sequence (speculative verify): G 1, 2, 6; split; masked
        Case("rows2_mha", dict(B=2, NH=2, NKV=2, DH=16, S=40, ROWS=2), dict(scale=0.25), params=dict(BLOCK_N=16)),
        Case("rows5_gqa6", dict(B=1, NH=12, NKV=2, DH=16, S=48, L=37, ROWS=5), dict(scale=0.25),
             params=dict(BLOCK_N=16)),
        Case("rows8_gqa2", dict(B=2, NH=4, NKV=2, DH=32, S=64, ROWS=8), dict(scale=0.18), params=dict(BLOCK_N=16)),
        Case("rows5_split", dict(B=2, NH=3, NKV=1, DH=16, S=100, L=70, ROWS=5), dict(scale=0.25),
             params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("rows8_mask_split", dict(B=1, NH=4, NKV=2, DH=16, S=90, L=75, ROWS=8, HAS_MASK=1), dict(scale=0.25),
             params=dict(SPLITS=3, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("rows2_mask", dict(B=2, NH=6, NKV=1, DH=16, S=50, L=41, ROWS=2, HAS_MASK=1), dict(scale=0.25),
             params=dict(BLOCK_N=16)),
    ],
    # decode looks parameters up by the cache capacity bucketed to a power of two
    # (ops.attention_decode), never by the filled length: cases are (capacity bucket,
    # a fill) of the benchmark's prompts (128 + 256 new, 4096 + 256 new)
    decode_cases=lambda c: [
        Case(f"ctx{fill}", dict(B=1, NH=c["NH"], NKV=c["NKV"], DH=c["DH"], S=cap, L=fill),
             dict(scale=c["DH"] ** -0.5)) for cap, fill in ((512, 384), (8192, 4352))],
    # not HAS_MASK: the key mask adds S int32 reads and no work, so a masked step
    # (generate passes its attention mask) runs the tiles measured for the unmasked one
    # ROWS (absent at 1, so the R == 1 keys stay as shipped): its tiles fit R rows
    tune_keys=("B", "NH", "NKV", "DH", "S", "ROWS"),
    candidates=candidates,
    input_makers={"lengths": _lengths, "key_mask": _key_mask},
    min_bytes=lambda s, b: (2 * s["B"] * s["NKV"] * s.get("L", s["S"]) * s["DH"]
                            + 2 * s["B"] * s.get("ROWS", 1) * s["NH"] * s["DH"]) * b,
    module=__name__,
))
