"""The fused forms of the low-precision matvecs (issue 35): the decode layer's launches of the
model-dtype program, over int4 (``matvec_int4``) or fp8 (``matvec_fp8``) weights. Each is the
same tile definition as its plain kernel (``define_int4`` / ``define_fp8`` with a matvec_family
:class:`~tileflow.suite.matvec_family.MatvecForm`), its reference the plain one's after the
norm (int4: dequantize, then the model-dtype computation; fp8: x quantized per 128 columns as
``matvec_fp8`` does, of the normed row):

- ``rms_norm_gate_up_silu_{int4,fp8}``: RMSNorm of x (gamma ``ln_w``), the gate and up
  projections, ``silu(gate) * up``: one launch for the MLP's first half. The norm's rstd
  scales the sums (sum(w * x * g) * rstd); fp8 quantizes ``x * g`` per group, whose xq is
  the normed row's (a group's scale a_s takes rstd's factor);
- ``matvec_residual_{int4,fp8}``: ``x @ W.T + r``: o_proj and down_proj with the residual add;
- ``rms_norm_qkv_{int4,fp8}``: RMSNorm of x, then q, k and v (+ biases) in one launch: the
  grid's row blocks run over q's blocks, then k's, then v's, and each program reads its own
  weight through one pointer picked by its kind (``load_pick``), so the three stay as
  quantized, unconcatenated; q, k, v are three outputs. RoPE and the cache write stay
  separate kernels (rotating in registers needs a program to own both halves of a head's
  rotated pairs: qkv_rope_cache's layout, not built for these weights yet). No split-K:
  the rows of three outputs make the grid, BLOCK_N small enough to fill the GPU.
"""

from dataclasses import replace

from tileflow.suite import gate_up_silu, matvec_fp8, matvec_int4, rms_norm
from tileflow.suite.matvec_family import RESIDUAL_FORM, grouped_candidates, grouped_split, rsqrt_mean
from tileflow.suite.matvec_fp8 import check_block_n, fp8_params, fp8_views, group_sums, quantize_groups, x_groups
from tileflow.suite.matvec_int4 import THREE, dequant_round, int4_params, int4_views, x_round
from tileflow.suite.quantize import GROUP
from tileflow.suite.registry import Case, SuiteKernel, register

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


def gate_up_fp8_reference(xp, x, ln_w, w_g, ws_g, w_u, ws_u, eps):
    h = rms_norm.reference(xp, x, ln_w, eps)["out"]
    return {"out": _silu_mul(xp, matvec_fp8.reference(xp, h, w_g, ws_g)["out"],
                             matvec_fp8.reference(xp, h, w_u, ws_u)["out"])}


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
    h = rms_norm.reference(xp, x, ln_w, eps)["out"]
    weights = ((w_q, ws_q, b_q), (w_k, ws_k, b_k), (w_v, ws_v, b_v))
    return {name: matvec_fp8.reference(xp, h, *w)["out"] for (_, _, name), w in zip(KINDS, weights)}


# --- rms_norm_qkv: three weights of two row counts, picked by each program ----------------


def _no_split(k, p) -> None:
    if p.get("SPLIT_K", 1) != 1:
        raise ValueError(f"{k.name}: SPLIT_K={p['SPLIT_K']}: the three outputs' row blocks make the grid (no split-K)")


def define_qkv(k, p, fmt: str) -> None:
    """rms_norm_qkv over ``fmt`` ("int4" or "fp8") weights; see the module docstring."""
    _no_split(k, p)
    if fmt == "fp8":
        check_block_n(k.name, p)
    x = k.input("x", ("M", "K"))
    ln_w = k.input("ln_w", ("K",))
    if fmt == "int4":
        views = [int4_views(k, suffix, rows) for suffix, rows, _ in KINDS]
    else:
        views = [fp8_views(k, suffix, rows, "NBQ" if rows == "NQ" else "NBK") for suffix, rows, _ in KINDS]
    biases = [k.input(f"b{suffix}", (rows,)) for suffix, rows, _ in KINDS] if p["HAS_BIAS"] else None
    outs = [k.output(name, ("M", rows)) for _, rows, name in KINDS]
    eps = k.scalar("eps")
    with k.stage("matvec", grid=("cdiv(NQ, BLOCK_N) + 2 * cdiv(NKD, BLOCK_N)", "M")):
        blk, row = k.program_id(0), k.program_id(1)
        bn = k.param("BLOCK_N")
        nq, nkd = k.dim("NQ"), k.dim("NKD")
        nqb, nkb = k.cdiv(nq, bn), k.cdiv(nkd, bn)
        is_q, is_v = blk < nqb, blk >= nqb + nkb
        is_k = (blk >= nqb) & (blk < nqb + nkb)
        # each kind's first row, clamped into its view: a read or write predicated off
        # must still address inside its view on every target
        firsts = (k.minimum(blk, nqb - 1) * bn, k.minimum(k.maximum(blk - nqb, 0), nkb - 1) * bn,
                  k.maximum(blk - nqb - nkb, 0) * bn)
        kinds = tuple(zip((is_q, is_k, is_v), firsts))
        # the picked kind's rows from its block's first on: the loads' row limit
        left = k.where(is_q, nq - firsts[0], k.where(is_k, nkd - firsts[1], nkd - firsts[2]))
        rel = k.range(0, "BLOCK_N", aligned=True)

        def pick(i, shift=None):
            return [(when, v[i], first if shift is None else first // shift)
                    for (when, first), v in zip(kinds, views)]

        kdim = k.dim("K")
        acc0 = [k.full(THREE if fmt == "int4" else ("BLOCK_N",), 0.0), k.full(("BLOCK_K",), 0.0)]
        if fmt == "int4":
            half = k.dim("KH")
            picks = [pick(i) for i in range(3)]

            def load(which, idx, limit):
                got = k.load_pick(picks[which], (rel, idx), limits={0: left, 1: limit})
                return k.cast(got, "i32") if which == 0 else got  # (picked loads arrive as f32)

            with k.loop(0, half, "BLOCK_K", carry=acc0) as lp:
                j = lp.index
                cols = k.range(j, "BLOCK_K", aligned=True)
                w_lo, w_hi = dequant_round(k, load, cols, j, half, half)
                x_lo, x_hi, ss = x_round(k, x, row, cols, j, half, half, ln_w, lp.carry[1])
                lp.next(lp.carry[0] + w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :], ss)
            acc, ss = lp.results
            sums = k.sum(k.sum(acc, axis=2), axis=1)
        else:
            w_pick, s_pick = pick(0), pick(1, k.param("GROUP"))
            with k.loop(0, kdim, "BLOCK_K", carry=acc0) as lp:
                cols = k.range(lp.index, "BLOCK_K", aligned=True)
                xg, ss = x_groups(k, x, row, cols, kdim, ln_w, lp.carry[1])
                xq, a_s = quantize_groups(k, xg)
                wt = k.load_pick(w_pick, (rel, cols), limits={0: left, 1: kdim})
                groups = k.range(lp.index // k.param("GROUP"), "BLOCK_G", aligned=True)
                # one row of block scales: BLOCK_N divides 128, so the block never straddles two
                lp.next(lp.carry[0] + group_sums(k, wt, xq, a_s,
                                                 lambda: k.load_pick(s_pick, (0, groups), limits={0: 1})), ss)
            sums, ss = lp.results
        y = sums * rsqrt_mean(k, ss, kdim, eps)
        if biases is not None:
            y = y + k.load_pick([(when, b, first) for (when, first), b in zip(kinds, biases)], (rel,),
                                limits={0: left})
        for out, (when, first) in zip(outs, kinds):
            k.store(out, (row, k.range(first, "BLOCK_N", aligned=True)), y, when=when)


# --- parameters --------------------------------------------------------------------------


def qkv_params(s: dict, make, block_n: int = 0, **extra) -> dict:
    """Parameters of an rms_norm_qkv form: ``make(n, k, block_n, ...)`` (int4_params /
    fp8_params) without split-K. Untuned default BLOCK_N: the largest of 16, 8, 4 giving the
    three outputs 256 row blocks or more (about two programs a multiprocessor: no split-K
    fills the GPU otherwise), else 16 (rows too few to fill it at any tile: the larger tile)."""
    if not block_n:
        blocks = {bn: -(-s["NQ"] // bn) + 2 * -(-s["NKD"] // bn) for bn in (16, 8, 4)}
        block_n = next((bn for bn, n in blocks.items() if n >= 256), 16)
    p = make(s["NQ"], s["K"], block_n, HAS_BIAS=s.get("HAS_BIAS", 1), **extra)
    for key in ("SPLIT_K", "BLOCK_R"):
        p.pop(key)
    return p


def qkv_candidates(s: dict, make, row: int, block_ns) -> list[dict]:
    n = s["NQ"] + 2 * s["NKD"]
    return [qkv_params(s, make, bn, BLOCK_G=bg, BLOCK_K=bg * GROUP, num_warps=nw)
            for bn, bg, nw in {(c["BLOCK_N"], c["BLOCK_G"], c["num_warps"])
                               for c in grouped_candidates(n, row, block_ns, lambda bn, bg, sk, nw: dict(
                                   BLOCK_N=bn, BLOCK_G=bg, SPLIT_K=sk, num_warps=nw)) if c["SPLIT_K"] == 1}]


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


EPS = dict(eps=1e-6)

# --- int4 ---------------------------------------------------------------------------------

register(SuiteKernel(
    name="rms_norm_gate_up_silu_int4",
    summary="fused: RMSNorm, the int4 gate and up projections, SiLU(gate) * up",
    define=lambda k, p: matvec_int4.define_int4(GATE_UP, k, p),
    reference=gate_up_int4_reference,
    default_params=lambda s: int4_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"] // 2)),
    test_cases=[
        Case("tiny", _int4_sizes(1, 256, N=32), EPS),
        # a ragged last round (K/2 = 384 bytes in 256-byte rounds), N not a block multiple
        Case("ragged", _int4_sizes(2, 768, N=37), dict(eps=1e-5), params=dict(BLOCK_G=2, BLOCK_K=256)),
        # split-K: the norm's scale from a pass of its own over x
        Case("splitk", _int4_sizes(2, 1024, N=24), EPS, params=dict(SPLIT_K=3, BLOCK_N=8)),
    ],
    decode_cases=lambda c: [Case("gate_up", _int4_sizes(1, c["D"], N=c["INTER"]), EPS)],
    candidates=lambda s: grouped_candidates(s["N"], s["K"] // 2, (4, 8, 16, 32, 64),
                                            lambda bn, bg, sk, nw: int4_params(s["N"], s["K"], bn, bg, sk, nw)),
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
    default_params=lambda s: int4_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"] // 2)),
    test_cases=[
        Case("tiny", _int4_sizes(1, 256, N=32)),
        Case("ragged", _int4_sizes(3, 768, N=37), params=dict(BLOCK_G=2, BLOCK_K=256)),
        Case("splitk", _int4_sizes(2, 1536, N=24), params=dict(SPLIT_K=2, BLOCK_N=8, BLOCK_G=1, BLOCK_K=128)),
    ],
    decode_cases=lambda c: [Case("o", _int4_sizes(1, c["NH"] * c["DH"], N=c["D"])),
                            Case("down", _int4_sizes(1, c["INTER"], N=c["D"]))],
    candidates=lambda s: grouped_candidates(s["N"], s["K"] // 2, (4, 8, 16, 32, 64),
                                            lambda bn, bg, sk, nw: int4_params(s["N"], s["K"], bn, bg, sk, nw)),
    tune_keys=("M", "N", "K"),
    input_makers=_int4_makers(""),
    min_bytes=_int4_bytes(1, 1, False),
    fused=True,
    module=__name__,
))

register(SuiteKernel(
    name="rms_norm_qkv_int4",
    summary="fused: RMSNorm, the int4 q, k and v projections (+ biases), three outputs",
    define=lambda k, p: define_qkv(k, p, "int4"),
    reference=qkv_int4_reference,
    default_params=lambda s: qkv_params(s, int4_params),
    test_cases=[
        Case("tiny", _int4_sizes(1, 256, NQ=64, NKD=32, HAS_BIAS=1), EPS),
        # ragged row blocks of every kind (40 = 2.5 blocks, 24 = 1.5), several rows, a ragged round
        Case("ragged-nobias", _int4_sizes(3, 768, NQ=40, NKD=24, HAS_BIAS=0), dict(eps=1e-5),
             params=dict(BLOCK_N=16, BLOCK_G=2, BLOCK_K=256)),
        Case("rows-bias", _int4_sizes(2, 512, NQ=48, NKD=16, HAS_BIAS=1), EPS, params=dict(BLOCK_N=8)),
    ],
    decode_cases=lambda c: [Case("qkv", _int4_sizes(1, c["D"], NQ=c["NH"] * c["DH"], NKD=c["NKV"] * c["DH"],
                                                    HAS_BIAS=c.get("BIAS", 1)), EPS)],
    candidates=lambda s: qkv_candidates(s, int4_params, s["K"] // 2, (4, 8, 16, 32)),
    tune_keys=("M", "NQ", "NKD", "K", "HAS_BIAS"),
    input_makers=_int4_makers("_q", "_k", "_v"),
    min_bytes=_qkv_bytes("int4"),
    fused=True,
    module=__name__,
))

# --- fp8 ----------------------------------------------------------------------------------

register(SuiteKernel(
    name="rms_norm_gate_up_silu_fp8",
    summary="fused: RMSNorm, the fp8 gate and up projections (x quantized per 128 columns), SiLU(gate) * up",
    define=lambda k, p: matvec_fp8.define_fp8(GATE_UP, k, p),
    reference=gate_up_fp8_reference,
    default_params=lambda s: fp8_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"])),
    test_cases=[
        Case("tiny", _fp8_sizes(1, 256, N=32), EPS),
        # a ragged last group of x and of the weights; programs on both sides of row 128
        Case("ragged", _fp8_sizes(2, 200, N=150), dict(eps=1e-5), params=dict(BLOCK_N=32)),
        Case("splitk", _fp8_sizes(2, 1024, N=24), EPS, params=dict(SPLIT_K=3, BLOCK_N=8)),
    ],
    decode_cases=lambda c: [Case("gate_up", _fp8_sizes(1, c["D"], N=c["INTER"]), EPS)],
    candidates=lambda s: grouped_candidates(s["N"], s["K"], (4, 8, 16, 32, 64, 128),
                                            lambda bn, bg, sk, nw: fp8_params(s["N"], s["K"], bn, bg, sk, nw)),
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
    default_params=lambda s: fp8_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"])),
    test_cases=[
        Case("tiny", _fp8_sizes(1, 256, N=32)),
        Case("ragged", _fp8_sizes(3, 200, N=150), params=dict(BLOCK_N=32)),
        Case("splitk", _fp8_sizes(2, 768, N=40), params=dict(SPLIT_K=2, BLOCK_G=1, BLOCK_K=128, BLOCK_N=8)),
    ],
    decode_cases=lambda c: [Case("o", _fp8_sizes(1, c["NH"] * c["DH"], N=c["D"])),
                            Case("down", _fp8_sizes(1, c["INTER"], N=c["D"]))],
    candidates=lambda s: grouped_candidates(s["N"], s["K"], (4, 8, 16, 32, 64, 128),
                                            lambda bn, bg, sk, nw: fp8_params(s["N"], s["K"], bn, bg, sk, nw)),
    tune_keys=("M", "N", "K"),
    input_makers=_fp8_makers(""),
    min_bytes=_fp8_bytes(1, 1, False),
    fused=True,
    module=__name__,
))

register(SuiteKernel(
    name="rms_norm_qkv_fp8",
    summary="fused: RMSNorm, the fp8 q, k and v projections (x quantized per 128 columns, + biases), three outputs",
    define=lambda k, p: define_qkv(k, p, "fp8"),
    reference=qkv_fp8_reference,
    default_params=lambda s: qkv_params(s, fp8_params),
    test_cases=[
        Case("tiny", _fp8_sizes(1, 256, NQ=64, NKD=32, HAS_BIAS=1), EPS),
        # ragged row blocks (q past row 128, k / v in a second block row), a ragged last group
        Case("ragged-nobias", _fp8_sizes(3, 200, NQ=150, NKD=40, HAS_BIAS=0), dict(eps=1e-5),
             params=dict(BLOCK_N=32)),
        Case("rows-bias", _fp8_sizes(2, 384, NQ=48, NKD=16, HAS_BIAS=1), EPS, params=dict(BLOCK_N=8, BLOCK_G=1,
                                                                                          BLOCK_K=128)),
    ],
    decode_cases=lambda c: [Case("qkv", _fp8_sizes(1, c["D"], NQ=c["NH"] * c["DH"], NKD=c["NKV"] * c["DH"],
                                                   HAS_BIAS=c.get("BIAS", 1)), EPS)],
    candidates=lambda s: qkv_candidates(s, fp8_params, s["K"], (4, 8, 16, 32)),
    tune_keys=("M", "NQ", "NKD", "K", "HAS_BIAS"),
    input_makers=_fp8_makers("_q", "_k", "_v"),
    min_bytes=_qkv_bytes("fp8"),
    fused=True,
    module=__name__,
))
