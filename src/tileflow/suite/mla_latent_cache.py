"""mla_latent_cache: the cache-write side of DeepSeek-V2 / V3 multi-head latent attention.
For each row ``m`` (one new token of sequence ``m``) of the layer's normed input ``x``::

    y            = kv_a_proj_with_mqa(x[m])            # [R + DR]: w_kva [RA = R + DR, D]
    kv_cache[m, pos[m]] = kv_a_layernorm(y[:R])         # RMSNorm, weight ln_w, eps
    pe_cache[m, pos[m]] = rope(y[R:], pos[m])           # rotated rope key

``w_kva`` is the projection's weight as it lies (the caller's sizes must have
``RA == R + DR``). The rope reads the model's ``rotary_emb.inv_freq`` table (``inv_freq``,
``HALF = DR / 2`` entries: default and YaRN frequencies alike) and multiplies cos and sin
by ``rope_scale`` (the rotary embedding's ``attention_scaling``: YaRN's attention factor,
1 otherwise), as transformers does. ``ROPE_LAYOUT`` picks the model's pair layout:

- 0: rotate-half pairs ``(i, i + HALF)`` in and out (DeepseekV3 with ``rope_interleave=False``);
- 1: interleaved pairs ``(2i, 2i + 1)`` in, halves out: ``[rotated evens | rotated odds]``
  (DeepseekV3's default ``rope_interleave=True``);
- 2: interleaved pairs in and out (DeepseekV2's complex rotation).

Two launches: ``project`` is a matvec over ``cdiv(RA, BLOCK_O)`` row blocks per token (the
weight stream spread over many programs), writing ``y`` to an fp32 workspace; ``write``
(one program per token) needs all ``R`` outputs at once for the norm's sum of squares and
both members of each rope pair, which no single row block of the projection holds.

With ``NORM`` ``x`` is the layer's input before its RMSNorm (``x_ln``, ``x_eps``): each
``project`` program gathers the row's sum of squares on its way through ``x`` and scales its
sums by the rstd afterwards (as the matvec family's norm forms), so the step needs no
separate norm launch for the latent write.

With ``CACHE_POS`` the row written comes from its own ``cache_pos`` input (int64 [M]), the
rope still at ``pos``: transformers' static cache writes at its own count, which equals the
position only for an unpadded sequence; a row outside ``[0, S)`` is then not written.
"""

from tileflow.suite.inputs import linear_weight, positions, rope_frequencies
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register

LAYOUTS = {"halves": 0, "interleaved": 1, "interleaved_out": 2}


def define(k, p):
    layout = p["ROPE_LAYOUT"]
    x = k.input("x", ("M", "D"))
    w_kva = k.input("w_kva", ("RA", "D"))
    ln_w = k.input("ln_w", ("R",))
    norm = p.get("NORM", 0)
    if norm:
        x_ln = k.input("x_ln", ("D",))
    pos = k.input("pos", ("M",), dtype="i64")
    if p.get("CACHE_POS", 0):
        cache_pos = k.input("cache_pos", ("M",), dtype="i64")
    inv_freq = k.input("inv_freq", ("HALF",), dtype="f32")
    kv_cache = k.inout("kv_cache", ("M", "S", "R"))
    pe_cache = k.inout("pe_cache", ("M", "S", "DR"))
    eps = k.scalar("eps")
    rope_scale = k.scalar("rope_scale")
    # the layout as a launch argument too, unused by the code (specialised on ROPE_LAYOUT):
    # the reference sees arguments, never parameters, and every caller binds both from one value
    k.scalar("rope_layout")
    x_eps = k.scalar("x_eps") if norm else None
    ws_y = k.workspace("y", ("M", "RA"))

    with k.stage("project", grid=("cdiv(RA, BLOCK_O)", "M")):
        m = k.program_id(1)
        rows = k.range(k.program_id(0) * k.param("BLOCK_O"), "BLOCK_O", aligned=True)
        d = k.dim("D")
        carry = (k.full(("BLOCK_O", "BLOCK_K"), 0.0),) + ((k.full(("BLOCK_K",), 0.0),) if norm else ())
        with k.loop(0, d, "BLOCK_K", carry=carry) as lp:
            acc = lp.carry[0]
            cols = k.range(lp.index, "BLOCK_K", aligned=True)
            if norm:  # sum(w * x * g) * rstd: the sums wait for no reduction of x
                wt, xv = k.load(w_kva, (rows, cols)), k.load(x, (m, cols))
                lp.next(acc + wt * (xv * k.load(x_ln, (cols,)))[None, :], lp.carry[1] + xv * xv)
            else:
                lp.next(acc + k.load(w_kva, (rows, cols)) * k.load(x, (m, cols))[None, :])
        y = k.sum(lp.results[0], axis=1)
        if norm:
            y = y * k.rsqrt(k.sum(lp.results[1], axis=0) / k.cast(d, "f32") + x_eps)
        k.store(ws_y, (m, rows), y)

    with k.stage("write", grid=("M",)):
        m = k.program_id(0)
        nr, half, dr = k.dim("R"), k.dim("HALF"), k.dim("DR")
        p_int = k.load(pos, (m,))
        # the row written (p_row) and the rotation's position (p_int) are one value unless CACHE_POS
        p_row, inside = p_int, None
        if p.get("CACHE_POS", 0):
            p_row = k.load(cache_pos, (m,))
            inside = k.binary("and", k.binary("ge", p_row, 0), k.binary("lt", p_row, k.dim("S")))
        guard = {} if inside is None else {"when": inside}
        r = k.range(0, "BLOCK_R", aligned=True)
        y = k.load(ws_y, (m, r), limits={1: nr})
        rstd = k.rsqrt(k.sum(y * y, axis=0) / k.cast(nr, "f32") + eps)
        k.store(kv_cache, (m, p_row, r), y * rstd * k.load(ln_w, (r,)), **guard)

        i = k.range(0, "BLOCK_HALF", aligned=True)
        ang = k.cast(p_int, "f32") * k.load(inv_freq, (i,))
        c, s = k.cos(ang) * rope_scale, k.sin(ang) * rope_scale
        rotate_into(k, layout, (c, s, i, half, dr), (ws_y, (m,), nr), (pe_cache, (m, p_row)), "BLOCK_DR", guard)


def rotate_into(k, layout, rope, src, dst, block_dr: str, guard: dict) -> None:
    """The DR values of ``src`` (view, index prefix, first column) rotated by ``rope`` (cos,
    sin [BLOCK_HALF], the range ``i`` over them, HALF, DR) in pair layout ``layout`` (see the
    module docstring), stored at ``dst`` (view, index prefix) under ``guard``; ``block_dr``
    names the parameter of a whole row's tile. The key's rotation here and the query's in
    mla_attention."""
    c, s, i, half, dr = rope
    view, prefix, start = src
    at = len(prefix)
    if layout == 0:
        x1 = k.load(view, prefix + (k.range(start, "BLOCK_HALF"),), limits={at: start + half})
        x2 = k.load(view, prefix + (k.range(start + half, "BLOCK_HALF"),))
    else:  # pairs (2i, 2i + 1): the [DR] tile as [HALF, 2], each column picked by a masked sum
        pairs = k.reshape(k.load(view, prefix + (k.range(start, block_dr),)), ("BLOCK_HALF", "TWO"))
        first = (k.range(0, "TWO", aligned=True).index < 1)[None, :]
        x1 = k.sum(k.where(first, pairs, 0.0), axis=1)
        x2 = k.sum(k.where(first, 0.0, pairs), axis=1)
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    out, prefix = dst
    at = len(prefix)
    if layout == 2:  # back to pairs: column 0 takes o1, column 1 o2
        both = k.where(first, o1[:, None], o2[:, None])
        k.store(out, prefix + (k.range(0, block_dr, aligned=True),), k.reshape(both, (block_dr,)), **guard)
    else:
        k.store(out, prefix + (i,), o1, limits={at: half}, **guard)
        k.store(out, prefix + (k.range(half, "BLOCK_HALF"),), o2, limits={at: dr}, **guard)


def rope_reference(xp, x, pos, inv_freq, rope_scale, layout: int):
    """``x`` [..., DR] rotated at ``pos`` (one per leading row of ``x``'s first axis) in pair
    layout ``layout``, cos / sin times ``rope_scale``."""
    dr = x.shape[-1]
    p = xp.reshape(xp.astype(pos, x.dtype), pos.shape + (1,) * (x.ndim - pos.ndim))
    ang = p * xp.astype(inv_freq, x.dtype)
    c, sn = xp.cos(ang) * rope_scale, xp.sin(ang) * rope_scale
    if layout == 0:
        x1, x2 = x[..., : dr // 2], x[..., dr // 2:]
    else:
        pairs = xp.reshape(x, x.shape[:-1] + (dr // 2, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
    o1, o2 = x1 * c - x2 * sn, x2 * c + x1 * sn
    if layout == 2:
        return xp.reshape(xp.stack([o1, o2], axis=-1), x.shape)
    return xp.concat([o1, o2], axis=-1)


def reference(xp, x, w_kva, ln_w, pos, inv_freq, kv_cache, pe_cache, eps, rope_scale, rope_layout: int,
              cache_pos=None, x_ln=None, x_eps=None):
    """transformers' computation: kv_a_proj_with_mqa, split, RMSNorm of the compressed part,
    rope (cos / sin times ``rope_scale``) of the rope part in the model's pair layout.
    ``rope_layout`` is the case's ROPE_LAYOUT (the kernel's code is specialised on the
    parameter and takes the same value as an unused launch argument: ``_case`` sets both).
    With ``cache_pos`` the rows go there (none where it is outside the cache), rotated at ``pos``."""
    layout = int(rope_layout)
    if x_ln is not None:  # NORM: the layer's input norm first
        x = x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + x_eps) * x_ln
    _, s, nr = kv_cache.shape
    y = x @ xp.matrix_transpose(w_kva)  # [M, R + DR]
    kv, pe = y[:, :nr], y[:, nr:]
    kv = kv / xp.sqrt(xp.mean(kv * kv, axis=-1, keepdims=True) + eps) * ln_w
    rot = rope_reference(xp, pe, pos, inv_freq, rope_scale, layout)
    row = pos if cache_pos is None else cache_pos
    at = (xp.arange(s)[None, :] == row[:, None])[:, :, None]  # [M, S, 1]
    return {"kv_cache": xp.where(at, kv[:, None, :], kv_cache), "pe_cache": xp.where(at, rot[:, None, :], pe_cache)}


def default_params(s):
    return {"ROPE_LAYOUT": s.get("ROPE_LAYOUT", 1), "BLOCK_O": min(64, next_pow2(s["RA"])),
            "BLOCK_K": min(128, next_pow2(s["D"])), "BLOCK_R": next_pow2(s["R"]),
            "BLOCK_DR": next_pow2(s["DR"]), "BLOCK_HALF": next_pow2(s["DR"]) // 2, "TWO": 2,
            # absent when off: the parameters name the generated code, which stays as it was
            **({"CACHE_POS": 1} if s.get("CACHE_POS", 0) else {}),
            **({"NORM": 1} if s.get("NORM", 0) else {}),
            "num_warps": 4, "num_stages": 2}


def candidates(s):
    base = default_params(s)
    return [{**base, "BLOCK_O": bo, "BLOCK_K": bk, "num_warps": nw}
            for bo in (8, 16, 32, 64) for bk in (64, 128, 256, 512) for nw in (2, 4, 8)]


def _case(label, m, d, r, dr, s, layout, eps=1e-6, rope_scale=1.0, params=None, **extra):
    """A case: ROPE_LAYOUT both in the sizes (the kernel's parameter) and in the reference's
    scalars, from one value."""
    sizes = dict(M=m, D=d, R=r, DR=dr, RA=r + dr, HALF=dr // 2, S=s, ROPE_LAYOUT=layout, **extra)
    scalars = dict(eps=eps, rope_scale=rope_scale, rope_layout=layout, **({"x_eps": 1e-5} if extra.get("NORM") else {}))
    return Case(label, sizes, scalars, params=dict(params or {}))


# DeepSeek-V2-Lite (hidden 2048, rope_interleave as V2's complex rotation) and DeepSeek-V3
# (hidden 7168, interleaved pairs out as halves; YaRN's attention factor is 1 there)
def _decode_cases(_config):
    return [_case("v2lite", 1, 2048, 512, 64, 8192, 2), _case("v3", 1, 7168, 512, 64, 8192, 1)]


KERNEL = register(SuiteKernel(
    name="mla_latent_cache",
    summary="DeepSeek MLA cache write: kv_a_proj_with_mqa, kv_a_layernorm, rope of k_pe, into the latent cache",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        _case("halves", 1, 48, 32, 16, 40, 0, rope_scale=1.1),
        _case("interleaved", 2, 64, 32, 16, 50, 1, eps=1e-5, rope_scale=0.9, params=dict(BLOCK_O=16, BLOCK_K=32)),
        _case("interleaved_out", 2, 40, 64, 16, 60, 2, params=dict(BLOCK_O=32)),
        _case("odd", 1, 100, 48, 16, 45, 1, rope_scale=1.2, params=dict(BLOCK_O=16, BLOCK_K=32)),
        # written at cache_pos, rotated at pos (a left-padded batch: rows apart from positions)
        _case("cachepos-halves", 3, 48, 32, 16, 20, 0, rope_scale=1.1, CACHE_POS=1),
        _case("cachepos-interleaved_out", 2, 40, 32, 16, 24, 2, params=dict(BLOCK_O=16), CACHE_POS=1),
        # the layer's input norm inside the projection
        _case("norm-interleaved_out", 2, 72, 32, 16, 30, 2, params=dict(BLOCK_O=16, BLOCK_K=32), NORM=1),
        _case("norm-cachepos-halves", 3, 48, 32, 16, 20, 0, rope_scale=1.1, CACHE_POS=1, NORM=1),
    ],
    decode_cases=_decode_cases,
    tune_keys=("M", "D", "R", "DR"),
    candidates=candidates,
    input_makers={"w_kva": linear_weight, "pos": positions("S"), "cache_pos": positions("S"),
                  "inv_freq": rope_frequencies},
    min_bytes=lambda s, b: (s["RA"] * s["D"] + s["M"] * (s["D"] + s["RA"]) + s["R"]) * b + 8 * s["M"],
    module=__name__,
))
