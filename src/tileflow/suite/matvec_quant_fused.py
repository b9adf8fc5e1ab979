"""The fused forms of the low-precision matvecs (issue 35): the decode layer's launches of the
model-dtype program, over int4 (``matvec_int4``) or fp8 (``matvec_fp8``) weights. Each is the
same tile definition as its plain kernel (``define_int4`` / ``define_fp8`` with a matvec_family
:class:`~tileflow.suite.matvec_family.MatvecForm`), its reference the plain one's after the
norm (int4: dequantize, then the model-dtype computation; fp8: ``x * gamma`` quantized per 128
columns as ``matvec_fp8`` quantizes x, the sums times the norm's rstd: ``normed_fp8``):

- ``rms_norm_gate_up_silu_{int4,fp8}``: RMSNorm of x (gamma ``ln_w``), the gate and up
  projections, ``silu(gate) * up``: one launch for the MLP's first half. The norm's rstd
  scales the sums (sum(w * x * g) * rstd); fp8 quantizes ``x * g`` per group (the normed
  row's xq but for fp32 rounding; a group's scale a_s takes rstd's factor);
- ``matvec_residual_{int4,fp8}``: ``x @ W.T + r``: o_proj and down_proj with the residual add;
- ``rms_norm_qkv_rope_cache_{int4,fp8}``: qkv_rope_cache over quantized weights: RMSNorm of
  x, q, k and v (+ biases), RoPE of q and k at the row's position, q written out, K and V
  written into the static caches. As there, a program owns one head of the stacked [q | k |
  v] heads and BLOCK_N rotation pairs (j, j + DH/2) of it (both halves of a pair are its
  own sums, rotated in registers) and reads its own weight through one pointer picked by
  its head's kind (``load_pick``): the three stay as quantized, unconcatenated. One row of
  x a program (qkv_rope_cache's several-row programs and its frequency table have no form
  here); with ``ROWS`` = R, R consecutive tokens of each sequence (a verify step).
"""

from dataclasses import replace

from tileflow.suite import gate_up_silu, matvec_fp8, matvec_int4, rms_norm
from tileflow.suite.matvec_family import RESIDUAL_FORM, grouped_candidates, grouped_split, rsqrt_mean
from tileflow.suite.matvec_fp8 import check_block_n, fp8_params, fp8_views, group_sums, quantize_groups, x_groups
from tileflow.suite.matvec_int4 import THREE, dequant_round, int4_params, int4_views, x_round
from tileflow.suite.qkv_rope_cache import cache_views, head_kinds, rope_cache_reference
from tileflow.suite.quantize import GROUP
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register
from tileflow.suite.rope import LLAMA3, TABLE, inv_freq_tile

GATE_UP = replace(gate_up_silu.FORM, weights=("_g", "_u"), norm=True)
RESIDUAL = replace(RESIDUAL_FORM, weights=("",))
KINDS = (("_q", "NQ", "q"), ("_k", "NKD", "k"), ("_v", "NKD", "v"))  # weight suffix, rows, output


# --- references: the norm, then the plain kernels' references ---------------------------


def _silu_mul(xp, g, u):
    return g / (1 + xp.exp(-g)) * u


def gate_up_int4_reference(xp, x, ln_w, qw_g, scales_g, zeros_g, qw_u, scales_u, zeros_u, eps):
    h = rms_norm.reference(xp, x, ln_w, eps)["out"]
    return gate_up_silu.reference(xp, h, matvec_int4.dequantize(xp, qw_g, scales_g, zeros_g, x.dtype),
                                  matvec_int4.dequantize(xp, qw_u, scales_u, zeros_u, x.dtype))


def normed_fp8(xp, x, ln_w, eps, weights) -> list:
    """The fused fp8 forms' projections of the normed row, in the kernel's order: ``x * gamma``
    quantized per group in fp32 (as the kernel rounds it: which e4m3 value an element takes
    is discontinuous, so the oracle decides it on the kernel's own fp32 values), the sums
    times the norm's rstd (float64). Equal to quantizing the normed row but for the fp32
    rounding of x * gamma * rstd: transformers (norm in x's dtype, then ``FP8Linear``) may
    round an element to the neighbouring e4m3 value where that rounding crosses a midpoint."""
    xq, a_s = matvec_fp8.act_quant(xp, xp.astype(x, xp.float32) * xp.astype(ln_w, xp.float32))
    rstd = 1 / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) / x.shape[-1] + eps)
    return [matvec_fp8.quantized_sums(xp, xq, a_s, w, ws, x.dtype) * rstd + (b if b is not None else 0)
            for w, ws, b in weights]


def gate_up_fp8_reference(xp, x, ln_w, w_g, ws_g, w_u, ws_u, eps):
    return {"out": _silu_mul(xp, *normed_fp8(xp, x, ln_w, eps, ((w_g, ws_g, None), (w_u, ws_u, None))))}


def residual_int4_reference(xp, x, qw, scales, zeros, r):
    return {"out": matvec_int4.reference(xp, x, qw, scales, zeros)["out"] + r}


def residual_fp8_reference(xp, x, w, ws, r):
    return {"out": matvec_fp8.reference(xp, x, w, ws)["out"] + r}


def qkv_int4_reference(xp, x, ln_w, qw_q, scales_q, zeros_q, qw_k, scales_k, zeros_k, qw_v, scales_v, zeros_v,
                       eps, b_q=None, b_k=None, b_v=None):
    h = rms_norm.reference(xp, x, ln_w, eps)["out"]
    weights = ((qw_q, scales_q, zeros_q, b_q), (qw_k, scales_k, zeros_k, b_k), (qw_v, scales_v, zeros_v, b_v))
    return {name: matvec_int4.reference(xp, h, *w)["out"] for (_, _, name), w in zip(KINDS, weights)}


def qkv_fp8_reference(xp, x, ln_w, w_q, ws_q, w_k, ws_k, w_v, ws_v, eps, b_q=None, b_k=None, b_v=None):
    ys = normed_fp8(xp, x, ln_w, eps, ((w_q, ws_q, b_q), (w_k, ws_k, b_k), (w_v, ws_v, b_v)))
    return {name: y for (_, _, name), y in zip(KINDS, ys)}


# --- rms_norm_qkv_rope_cache: three weights of two row counts, RoPE and the cache write ------


def define_qkv_rope_cache(k, p, fmt: str) -> None:
    """RMSNorm, q/k/v (+ biases) over ``fmt`` weights, RoPE of q and k at ``pos``, q written out,
    K and V written into the static caches at ``pos`` (or ``cache_pos``), in one launch.
    qkv_rope_cache's layout: a program owns one head of the stacked [q | k | v] heads and
    BLOCK_N rotation pairs (j, j + DH/2) of it, so both halves of a rotated pair are its own
    sums; its weight picked by its head's kind. One row of x a program; with ``ROWS`` = R the
    M rows are R consecutive tokens of each of M / R sequences (row m writes cache row m // R).
    fp8: BLOCK_N must divide DH/2 and 128 (a program's rows within one row of block scales)."""
    kind = p["ROPE_KIND"]
    if kind == TABLE:
        raise ValueError(f"{k.name}: ROPE_KIND 3 (a table of frequencies) is not a form of this kernel")
    if fmt == "fp8":
        check_block_n(k.name, p)
    per_seq = p.get("ROWS", 1)
    x = k.input("x", ("M", "K"))
    ln_w = k.input("ln_w", ("K",))
    if fmt == "int4":
        views = [int4_views(k, suffix, rows) for suffix, rows, _ in KINDS]
    else:
        views = [fp8_views(k, suffix, rows, "NBQ" if rows == "NQ" else "NBK") for suffix, rows, _ in KINDS]
    biases = [k.input(f"b{suffix}", (rows,)) for suffix, rows, _ in KINDS] if p["HAS_BIAS"] else None
    pos = k.input("pos", ("M",), dtype="i64")
    cache_pos = k.input("cache_pos", ("M",), dtype="i64") if p.get("CACHE_POS", 0) else pos
    q_out = k.output("q", ("M", "NH", "DH"))
    seqs = "B" if per_seq > 1 else "M"
    k_cache, v_cache, eps = cache_views(k, kind, seqs)
    with k.stage("main", grid=("NH + 2 * NKV", "cdiv(DH // 2, BLOCK_N)", "M")):
        head, row = k.program_id(0), k.program_id(2)
        nh, nkv, dh, kdim = k.dim("NH"), k.dim("NKV"), k.dim("DH"), k.dim("K")
        half = dh // 2
        j0 = k.program_id(1) * k.param("BLOCK_N")
        kinds = head_kinds(k, head, nh, nkv)
        (is_q, hq), (is_k, hk), (is_v, hv) = kinds
        # the program's rows of its head: j0.. (first halves of the rotated pairs) and DH/2 + j0..
        j, jh = k.range(j0, "BLOCK_N"), k.range(half + j0, "BLOCK_N")
        sets = ((j, half, j0), (jh, dh, half + j0))  # (rows, their limit, first row) relative to the head

        def pick(i, first=0, shift=None):
            return [(when, v[i], h * dh + first if shift is None else (h * dh + first) // shift)
                    for (when, h), v in zip(kinds, views)]

        acc0 = [k.full(THREE if fmt == "int4" else ("BLOCK_N",), 0.0) for _ in sets] + [k.full(("BLOCK_K",), 0.0)]
        if fmt == "int4":
            khalf = k.dim("KH")
            picks = [pick(i) for i in range(3)]

            def loader(rows, limit):
                def load(which, idx, col_limit):
                    got = k.load_pick(picks[which], (rows, idx), limits={0: limit, 1: col_limit})
                    return k.cast(got, "i32") if which == 0 else got  # (picked loads arrive as f32)
                return load

            with k.loop(0, khalf, "BLOCK_K", carry=acc0) as lp:
                jk = lp.index
                cols = k.range(jk, "BLOCK_K", aligned=True)
                new = []
                for acc, (rows, limit, _) in zip(lp.carry, sets):
                    w_lo, w_hi = dequant_round(k, loader(rows, limit), cols, jk, khalf, khalf)
                    new.append((w_lo, w_hi, acc))
                x_lo, x_hi, ss = x_round(k, x, row, cols, jk, khalf, khalf, ln_w, lp.carry[2])
                lp.next(*[acc + w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :] for w_lo, w_hi, acc in new], ss)
            *accs, ss = lp.results
            sums = [k.sum(k.sum(a, axis=2), axis=1) for a in accs]
        else:
            w_pick = pick(0)
            s_picks = [pick(1, first, k.param("GROUP")) for _, _, first in sets]
            with k.loop(0, kdim, "BLOCK_K", carry=acc0) as lp:
                cols = k.range(lp.index, "BLOCK_K", aligned=True)
                xg, ss = x_groups(k, x, row, cols, kdim, ln_w, lp.carry[2])
                xq, a_s = quantize_groups(k, xg)
                groups = k.range(lp.index // k.param("GROUP"), "BLOCK_G", aligned=True)
                new = []
                for acc, (rows, limit, _), s_pick in zip(lp.carry, sets, s_picks):
                    wt = k.load_pick(w_pick, (rows, cols), limits={0: limit, 1: kdim})
                    new.append(acc + group_sums(k, wt, xq, a_s, lambda s_pick=s_pick: k.load_pick(
                        s_pick, (0, groups), limits={0: 1})))
                lp.next(*new, ss)
            *sums, ss = lp.results
        scale = rsqrt_mean(k, ss, kdim, eps)
        y_lo, y_hi = (s * scale for s in sums)
        if biases is not None:
            b_pick = [(when, b, h * dh) for (when, h), b in zip(kinds, biases)]
            y_lo = y_lo + k.load_pick(b_pick, (j,), limits={0: half})
            y_hi = y_hi + k.load_pick(b_pick, (jh,), limits={0: dh})
        p_int, c_row = k.load(pos, (row,)), k.load(cache_pos, (row,))
        ang = k.cast(p_int, "f32") * inv_freq_tile(k, kind, j.index, dh)
        c, s = k.cos(ang), k.sin(ang)
        o_lo = k.where(is_v, y_lo, y_lo * c - y_hi * s)
        o_hi = k.where(is_v, y_hi, y_hi * c + y_lo * s)
        k.store(q_out, (row, hq, j), o_lo, limits={2: half}, when=is_q)
        k.store(q_out, (row, hq, jh), o_hi, when=is_q)
        # a row outside the cache is never written (the integrations raise before such a step)
        inside = k.binary("and", k.binary("ge", c_row, 0), k.binary("lt", c_row, k.dim("S")))
        seq = row // per_seq if per_seq > 1 else row
        for cache, h, when in ((k_cache, hk, is_k), (v_cache, hv, is_v)):
            when = k.binary("and", when, inside)
            k.store(cache, (seq, h, c_row, j), o_lo, limits={3: half}, when=when)
            k.store(cache, (seq, h, c_row, jh), o_hi, when=when)


def qkv_rope_cache_int4_reference(xp, x, ln_w, qw_q, scales_q, zeros_q, qw_k, scales_k, zeros_k, qw_v, scales_v,
                                  zeros_v, pos, k_cache, v_cache, eps, b_q=None, b_k=None, b_v=None, cache_pos=None,
                                  **rope):
    y = qkv_int4_reference(xp, x, ln_w, qw_q, scales_q, zeros_q, qw_k, scales_k, zeros_k, qw_v, scales_v, zeros_v,
                           eps, b_q, b_k, b_v)
    return rope_cache_reference(xp, y["q"], y["k"], y["v"], pos, k_cache, v_cache, cache_pos, **rope)


def qkv_rope_cache_fp8_reference(xp, x, ln_w, w_q, ws_q, w_k, ws_k, w_v, ws_v, pos, k_cache, v_cache, eps, b_q=None,
                                 b_k=None, b_v=None, cache_pos=None, **rope):
    y = qkv_fp8_reference(xp, x, ln_w, w_q, ws_q, w_k, ws_k, w_v, ws_v, eps, b_q, b_k, b_v)
    return rope_cache_reference(xp, y["q"], y["k"], y["v"], pos, k_cache, v_cache, cache_pos, **rope)


# --- parameters --------------------------------------------------------------------------


def _int4_sizes(m, k_, **sizes):
    return dict(M=m, K=k_, KH=k_ // 2, G=k_ // GROUP, **sizes)


def _fp8_sizes(m, k_, **sizes):
    n = {name: v for name, v in sizes.items() if name in ("N", "NQ", "NKD")}
    blocks = {"N": "NB", "NQ": "NBQ", "NKD": "NBK"}
    return dict(M=m, K=k_, KB=-(-k_ // GROUP), **sizes, **{blocks[name]: -(-v // GROUP) for name, v in n.items()})


def _int4_bytes(weights: int, rows_in: int, norm: bool):
    """Least bytes: each packed weight (N x K/2) and its scales and zeros once, x, the [M, N]
    inputs and output, gamma."""
    def f(s, b):
        m, n, k_ = s.get("M", 1), s["N"], s["K"]
        return weights * (n * k_ // 2 + 2 * b * n * k_ // GROUP) + b * (m * k_ + (rows_in + 1) * m * n + norm * k_)
    return f


def _fp8_bytes(weights: int, rows_in: int, norm: bool):
    def f(s, b):
        m, n, k_ = s.get("M", 1), s["N"], s["K"]
        weight = n * k_ + 4 * -(-n // GROUP) * -(-k_ // GROUP)  # fp8 bytes and fp32 block scales
        return weights * weight + b * (m * k_ + (rows_in + 1) * m * n + norm * k_)
    return f


def _qkv_bytes(fmt: str):
    def f(s, b):
        n, k_, m = s["NQ"] + 2 * s["NKD"], s["K"], s.get("M", 1)
        weight = n * k_ // 2 + 2 * b * n * k_ // GROUP if fmt == "int4" else \
            n * k_ + 4 * (-(-s["NQ"] // GROUP) + 2 * -(-s["NKD"] // GROUP)) * -(-k_ // GROUP)
        return weight + b * (m * k_ + k_ + m * n + s.get("HAS_BIAS", 1) * n)
    return f


def _int4_makers(*suffixes):
    return {name: maker for s in suffixes for name, maker in ((f"qw{s}", matvec_int4.draw_codes),
                                                               (f"scales{s}", matvec_int4.draw_scales),
                                                               (f"zeros{s}", matvec_int4.draw_zeros))}


def _fp8_makers(*suffixes):
    return {name: maker for s in suffixes for name, maker in ((f"w{s}", matvec_fp8.draw_weight),
                                                               (f"ws{s}", matvec_fp8.draw_scales))}


# the N x K matvec forms' tiles (the plain kernels' without HAS_BIAS: these take no bias)
def _int4_default(s):
    return int4_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"] // 2))


def _int4_candidates(s):
    return grouped_candidates(s["N"], s["K"] // 2, (4, 8, 16, 32, 64),
                              lambda bn, bg, sk, nw: int4_params(s["N"], s["K"], bn, bg, sk, nw))


def _fp8_default(s):
    return fp8_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"]))


def _fp8_candidates(s):
    return grouped_candidates(s["N"], s["K"], (4, 8, 16, 32, 64, 128),
                              lambda bn, bg, sk, nw: fp8_params(s["N"], s["K"], bn, bg, sk, nw))


EPS = dict(eps=1e-6)

# --- int4 ---------------------------------------------------------------------------------

register(SuiteKernel(
    name="rms_norm_gate_up_silu_int4",
    summary="fused: RMSNorm, the int4 gate and up projections, SiLU(gate) * up",
    define=lambda k, p: matvec_int4.define_int4(GATE_UP, k, p),
    reference=gate_up_int4_reference,
    default_params=_int4_default,
    test_cases=[
        Case("tiny", _int4_sizes(1, 256, N=32), EPS),
        # a ragged last round (K/2 = 384 bytes in 256-byte rounds), N not a block multiple
        Case("ragged", _int4_sizes(2, 768, N=37), dict(eps=1e-5), params=dict(BLOCK_G=2, BLOCK_K=256)),
        # split-K: the norm's scale from a pass of its own over x
        Case("splitk", _int4_sizes(2, 1024, N=24), EPS, params=dict(SPLIT_K=3, BLOCK_N=8)),
    ],
    decode_cases=lambda c: [Case("gate_up", _int4_sizes(1, c["D"], N=c["INTER"]), EPS)],
    candidates=_int4_candidates,
    tune_keys=("M", "N", "K"),
    input_makers=_int4_makers("_g", "_u"),
    min_bytes=_int4_bytes(2, 0, True),
    fused=True,
    module=__name__,
))

register(SuiteKernel(
    name="matvec_residual_int4",
    summary="fused: int4 projection + residual add (attention output, MLP down)",
    define=lambda k, p: matvec_int4.define_int4(RESIDUAL, k, p),
    reference=residual_int4_reference,
    default_params=_int4_default,
    test_cases=[
        Case("tiny", _int4_sizes(1, 256, N=32)),
        Case("ragged", _int4_sizes(3, 768, N=37), params=dict(BLOCK_G=2, BLOCK_K=256)),
        Case("splitk", _int4_sizes(2, 1536, N=24), params=dict(SPLIT_K=2, BLOCK_N=8, BLOCK_G=1, BLOCK_K=128)),
    ],
    decode_cases=lambda c: [Case("o", _int4_sizes(1, c["NH"] * c["DH"], N=c["D"])),
                            Case("down", _int4_sizes(1, c["INTER"], N=c["D"]))],
    candidates=_int4_candidates,
    tune_keys=("M", "N", "K"),
    input_makers=_int4_makers(""),
    min_bytes=_int4_bytes(1, 1, False),
    fused=True,
    module=__name__,
))

# --- fp8 ----------------------------------------------------------------------------------

register(SuiteKernel(
    name="rms_norm_gate_up_silu_fp8",
    summary="fused: RMSNorm, the fp8 gate and up projections (x quantized per 128 columns), SiLU(gate) * up",
    define=lambda k, p: matvec_fp8.define_fp8(GATE_UP, k, p),
    reference=gate_up_fp8_reference,
    default_params=_fp8_default,
    test_cases=[
        Case("tiny", _fp8_sizes(1, 256, N=32), EPS),
        # a ragged last group of x and of the weights; programs on both sides of row 128
        Case("ragged", _fp8_sizes(2, 200, N=150), dict(eps=1e-5), params=dict(BLOCK_N=32)),
        Case("splitk", _fp8_sizes(2, 1024, N=24), EPS, params=dict(SPLIT_K=3, BLOCK_N=8)),
    ],
    decode_cases=lambda c: [Case("gate_up", _fp8_sizes(1, c["D"], N=c["INTER"]), EPS)],
    candidates=_fp8_candidates,
    tune_keys=("M", "N", "K"),
    input_makers=_fp8_makers("_g", "_u"),
    min_bytes=_fp8_bytes(2, 0, True),
    fused=True,
    module=__name__,
))

register(SuiteKernel(
    name="matvec_residual_fp8",
    summary="fused: fp8 projection (x quantized per 128 columns) + residual add (attention output, MLP down)",
    define=lambda k, p: matvec_fp8.define_fp8(RESIDUAL, k, p),
    reference=residual_fp8_reference,
    default_params=_fp8_default,
    test_cases=[
        Case("tiny", _fp8_sizes(1, 256, N=32)),
        Case("ragged", _fp8_sizes(3, 200, N=150), params=dict(BLOCK_N=32)),
        Case("splitk", _fp8_sizes(2, 768, N=40), params=dict(SPLIT_K=2, BLOCK_G=1, BLOCK_K=128, BLOCK_N=8)),
    ],
    decode_cases=lambda c: [Case("o", _fp8_sizes(1, c["NH"] * c["DH"], N=c["D"])),
                            Case("down", _fp8_sizes(1, c["INTER"], N=c["D"]))],
    candidates=_fp8_candidates,
    tune_keys=("M", "N", "K"),
    input_makers=_fp8_makers(""),
    min_bytes=_fp8_bytes(1, 1, False),
    fused=True,
    module=__name__,
))

# --- rms_norm_qkv_rope_cache, int4 and fp8 ---------------------------------------------------


def qkv_rope_params(s: dict, make, block_n: int = 0, **extra) -> dict:
    """Parameters of an rms_norm_qkv_rope_cache form. Untuned default BLOCK_N (rotation pairs a
    program, a divisor of DH/2): the largest of 16, 8, 4 giving 256 programs a row or more
    (about two a multiprocessor: 4 at the 1.5B shape, qkv_rope_cache's measured BLOCK_J
    there), else the largest (heads too few to fill the GPU: the larger tile); 2 or 1 where
    DH/2 takes none of them."""
    if not block_n:
        heads, pairs = s["NH"] + 2 * s["NKV"], s["DH"] // 2
        fits = [bn for bn in (16, 8, 4) if pairs % bn == 0] or [2 if pairs % 2 == 0 else 1]
        block_n = next((bn for bn in fits if heads * (pairs // bn) >= 256), fits[0])
    flags = {"HAS_BIAS": s.get("HAS_BIAS", 1), "ROPE_KIND": s.get("ROPE_KIND", 0), "CACHE_POS": s.get("CACHE_POS", 0)}
    if s.get("ROWS", 1) > 1:
        flags["ROWS"] = s["ROWS"]
    p = make(s["NQ"], s["K"], block_n, **flags, **extra)
    for key in ("SPLIT_K", "BLOCK_R"):
        p.pop(key)
    return p


def qkv_rope_candidates(s: dict, make) -> list[dict]:
    """Rotation pairs a program dividing DH/2 (and 128), whole groups a round of up to 16K elements."""
    row = s["K"] // 2 if make is int4_params else s["K"]
    return [qkv_rope_params(s, make, bn, BLOCK_G=bg, BLOCK_K=bg * GROUP, num_warps=nw)
            for bn in (1, 2, 4, 8, 16) for bg in (1, 2, 4, 8) for nw in (4, 8)
            if (s["DH"] // 2) % bn == 0 and bg * GROUP <= max(GROUP, next_pow2(row)) and 2 * bn * bg * GROUP <= 16384]


def _positions(max_key: str):
    """Positions in [0, sizes[max_key]); with ROWS > 1 each sequence's R rows consecutive."""
    def draw(gen, shape, sizes):
        import torch

        rows = sizes.get("ROWS", 1)
        start = torch.randint(0, sizes[max_key] - rows + 1, (shape[0] // rows, 1), generator=gen, dtype=torch.int64)
        return (start + torch.arange(rows)).reshape(shape)
    return draw


def _rope_sizes(fmt: str, m, k_, nh, nkv, dh, s, **extra):
    base = dict(NH=nh, NKV=nkv, DH=dh, S=s, P=s, **extra)
    base.setdefault("B", m // extra.get("ROWS", 1))
    size = _int4_sizes if fmt == "int4" else _fp8_sizes
    return size(m, k_, NQ=nh * dh, NKD=nkv * dh, **base)


def _rope_cases(fmt: str, k_):
    return [
        Case("tiny", _rope_sizes(fmt, 1, k_, 2, 1, 16, 8, HAS_BIAS=1), dict(eps=1e-6, theta=10000.0)),
        # a batch of 3 rows, written at their own cache rows (CACHE_POS), llama3 frequencies, no bias
        Case("batch-llama3-cachepos", _rope_sizes(fmt, 3, k_, 4, 2, 16, 12, HAS_BIAS=0, ROPE_KIND=2, CACHE_POS=1),
             dict(eps=1e-5, **LLAMA3)),
        # 2 consecutive tokens of each of 2 sequences (a verify step), linear scaling
        Case("rows2-linear", _rope_sizes(fmt, 4, k_, 2, 1, 32, 10, HAS_BIAS=1, ROPE_KIND=1, ROWS=2),
             dict(eps=1e-6, theta=1e6, factor=2.0), params=dict(BLOCK_N=8)),
    ]


def _rope_decode(fmt: str):
    return lambda c: [Case("qkv", _rope_sizes(fmt, 1, c["D"], c["NH"], c["NKV"], c["DH"], 4096,
                                              HAS_BIAS=c.get("BIAS", 1)), dict(eps=1e-6, theta=10000.0))]


def _rope_bytes(fmt: str):
    qkv = _qkv_bytes(fmt)

    def f(s, b):  # the projections, and K / V written into the caches
        return qkv(s, b) + 2 * s["M"] * s["NKD"] * b + 8 * s["M"]
    return f


for _fmt, _make, _k in (("int4", int4_params, 512), ("fp8", fp8_params, 200)):
    register(SuiteKernel(
        name=f"rms_norm_qkv_rope_cache_{_fmt}",
        summary=f"fused: RMSNorm, the {_fmt} q, k and v projections (+ biases), RoPE, K/V written into the "
                f"static cache",
        define=lambda k, p, _fmt=_fmt: define_qkv_rope_cache(k, p, _fmt),
        reference=qkv_rope_cache_int4_reference if _fmt == "int4" else qkv_rope_cache_fp8_reference,
        default_params=lambda s, _make=_make: qkv_rope_params(s, _make),
        test_cases=_rope_cases(_fmt, _k),
        decode_cases=_rope_decode(_fmt),
        candidates=lambda s, _make=_make: qkv_rope_candidates(s, _make),
        tune_keys=("M", "K", "NH", "NKV", "DH", "HAS_BIAS", "ROWS"),
        input_makers={**(_int4_makers if _fmt == "int4" else _fp8_makers)("_q", "_k", "_v"),
                      "pos": _positions("P"), "cache_pos": _positions("S")},
        min_bytes=_rope_bytes(_fmt),
        fused=True,
        module=__name__,
    ))
