"""matvec_int4: ``out = x @ dequant(W).T (+ b)`` with W as 4-bit codes, group-wise (128
columns) scales and zero points: a decode matvec that reads a quarter of bf16's weight bytes.

The math is gpt-fast's ``WeightOnlyInt4Linear`` / torchao's ``int4_weight_only`` (asymmetric,
zero point in the float domain)::

    w[n, k] = (q[n, k] - 8) * scales[n, k // 128] + zeros[n, k // 128],   q in 0..15
    out[m, n] = sum_k x[m, k] * w[n, k]   (+ b[n])

with every product and sum in fp32 (the weight dequantized in registers, never stored).
Inputs: ``qw`` uint8 [N, K/2] packed as ``tileflow.suite.quantize.quantize_int4`` does (byte
``j`` holds column ``j`` in its low nibble and column ``j + K/2`` in its high one, so both
nibbles meet contiguous slices of x), ``scales`` / ``zeros`` [N, K/128] in the activations'
dtype, K a multiple of 256.

Each program owns ``BLOCK_N`` rows of one row of x and streams [BLOCK_N, BLOCK_K] byte tiles
(``BLOCK_K = BLOCK_G * 128``: whole groups) through a [BLOCK_N, BLOCK_G, 128] fp32 accumulator;
``SPLIT_K > 1`` splits the bytes of a row over programs and adds the parts in a second stage.
"""

import torch

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import (MatvecForm, grouped_candidates, grouped_params, grouped_split,
                                          matvec_views, reduce_outputs, split_k_range, store_scaled)
from tileflow.suite.quantize import GROUP
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


THREE = ("BLOCK_N", "BLOCK_G", "GROUP")
PAIR = ("BLOCK_G", "GROUP")

# the plain kernel: one weight (qw, scales, zeros), an optional bias; the fused forms
# (suite/matvec_quant_fused.py) name their weights by suffix: qw_g, scales_g, zeros_g...
FORM = MatvecForm(
    weights=("",),
    outputs=("out",),
    extras=lambda p: (("b", ("N",)),) if p["HAS_BIAS"] else (),
    epilogue=lambda k, sums, ex: [sums[0] + ex["b"]] if ex else [sums[0]],
)


def int4_views(k, suffix: str, rows: str = "N") -> tuple:
    """One int4 weight's inputs: codes ``qw<suffix>`` [rows, K/2] and ``scales<suffix>`` /
    ``zeros<suffix>`` [rows, K/128]."""
    return (k.input(f"qw{suffix}", (rows, "KH"), dtype="u8"), k.input(f"scales{suffix}", (rows, "G")),
            k.input(f"zeros{suffix}", (rows, "G")))


def dequant_round(k, load, cols, j, half, hi):
    """A round's tiles of one int4 weight, fp32 [BLOCK_N, BLOCK_G, GROUP] (the low nibbles:
    columns ``cols`` = [j, j + BLOCK_K); the high ones K/2 further on). ``load(which, idx,
    limit)`` reads the program's rows of the codes (0, as i32) or of the scales / zeros (1 /
    2) at columns ``idx``, 0 from ``limit`` on."""
    def dequant(codes, first_group, group_limit):
        # (q - 8) * scale + zero over [BLOCK_N, BLOCK_G, GROUP]; past the row's end the
        # scale and zero read 0, so the weight is 0 there
        g = k.range(first_group, "BLOCK_G")
        s = load(1, g, group_limit)
        z = load(2, g, group_limit)
        q = k.reshape(k.cast(codes - 8, "f32"), THREE)
        return q * s[:, :, None] + z[:, :, None]

    byte = load(0, cols, hi)
    # the low nibbles are columns [j, j + BLOCK_K), the high ones K/2 further on
    w_lo = dequant(byte & 15, j // k.param("GROUP"), half // k.param("GROUP"))
    w_hi = dequant(byte >> 4, (half + j) // k.param("GROUP"), k.dim("G"))
    return w_lo, w_hi


def x_round(k, x, row, cols, j, half, hi, ln_w=None, ss=None) -> tuple:
    """(x_lo, x_hi, ss): a round's two slices of row ``row`` of x as [BLOCK_G, GROUP] tiles
    (columns ``cols`` and K/2 further on), times the norm's gamma ``ln_w`` where given; with
    ``ss`` (the carried [BLOCK_K] sums of x^2, for the norm's scale) its new value."""
    def part(idx, limit, ss):
        xv = k.load(x, (row, idx), limits={1: limit})
        if ss is not None:
            ss = ss + xv * xv
        if ln_w is not None:
            xv = xv * k.load(ln_w, (idx,), limits={0: limit})
        return k.reshape(xv, PAIR), ss

    x_lo, ss = part(cols, hi, ss)
    x_hi, ss = part(k.range(half + j, "BLOCK_K"), half + hi, ss)
    return x_lo, x_hi, ss


def define_int4(form: MatvecForm, k, p) -> None:
    """``form`` (matvec_family's :class:`MatvecForm`, its ``weights`` the suffixes of int4
    weights) over int4 weights: each weight's products summed in fp32, the RMSNorm of x
    first where ``form.norm`` (its scale applied to the sums), then the epilogue."""
    mv = matvec_views(k, form, p, lambda suffix: int4_views(k, suffix), lambda suffix: f"part{suffix}")

    with k.stage("matvec", grid=("cdiv(N, BLOCK_N)", "SPLIT_K", "M")):
        row = k.program_id(2)
        rows = k.range(k.program_id(0) * k.param("BLOCK_N"), "BLOCK_N", aligned=True)
        half = k.dim("KH")  # bytes a row: column j's byte also holds column j + K/2
        lo, hi = split_k_range(k, half, mv.split)
        # without split-K the loop sees all of x (both halves): it gathers the norm's sum of squares
        gather_ss = form.norm and mv.split == 1
        acc0 = [k.full(THREE, 0.0) for _ in mv.weights] + ([k.full(("BLOCK_K",), 0.0)] if gather_ss else [])
        with k.loop(lo, hi, "BLOCK_K", carry=acc0) as lp:
            j = lp.index
            cols = k.range(j, "BLOCK_K", aligned=True)
            tiles = []
            for codes, scales, zeros in mv.weights:
                views = (codes, scales, zeros)
                tiles.append(dequant_round(
                    k, lambda which, idx, limit, views=views: k.load(views[which], (rows, idx), limits={1: limit}),
                    cols, j, half, hi))
            x_lo, x_hi, ss = x_round(k, mv.x, row, cols, j, half, hi, mv.ln_w,
                                     lp.carry[len(mv.weights)] if gather_ss else None)
            new = [a + w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :] for a, (w_lo, w_hi) in zip(lp.carry, tiles)]
            lp.next(*new, *([ss] if gather_ss else []))
        store_scaled(k, form, mv, row, rows, lp.results, gather_ss, lambda acc: k.sum(k.sum(acc, axis=2), axis=1))
    reduce_outputs(k, form, mv.outs, mv.parts, mv.load_extras)


def define(k, p):
    define_int4(FORM, k, p)


def dequantize(xp, qw, scales, zeros, dtype):
    """The weight [N, K] of packed codes ``qw`` (the nibbles unpacked, ``(q - 8) * scale + zero``)."""
    q = xp.astype(qw, xp.int32)
    q = xp.concat([q & 15, q >> 4], axis=1)
    n, kdim = q.shape
    group = xp.arange(kdim) // GROUP
    s, z = xp.take(scales, group, axis=1), xp.take(zeros, group, axis=1)
    return (xp.astype(q, dtype) - 8) * s + z


def reference(xp, x, qw, scales, zeros, b=None):
    """Dequantize (unpack the nibbles, ``(q - 8) * scale + zero``), then ``x @ w.T (+ b)``."""
    y = x @ xp.matrix_transpose(dequantize(xp, qw, scales, zeros, x.dtype))
    return {"out": y + b if b is not None else y}


def int4_params(n: int, k_: int, block_n: int = 16, block_g: int = 0, split_k: int = 1,
                num_warps: int = 4, num_stages: int = 2, **extra) -> dict:
    """Launch parameters for an N x K int4 matvec (K/2 bytes a row). Untuned defaults: a
    [16, 256] byte tile (8K weights) a round, split-K where rows are few."""
    return grouped_params(n, k_ // 2, block_n, block_g, split_k, num_warps, num_stages, **extra)


def default_params(s):
    return int4_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"] // 2), HAS_BIAS=s.get("HAS_BIAS", 0))


def candidates(s):
    """Tiles of 1K-16K bytes (2K-32K weights), enough programs, split-K where rows are few."""
    return grouped_candidates(s["N"], s["K"] // 2, (4, 8, 16, 32, 64),
                              lambda bn, bg, sk, nw: int4_params(s["N"], s["K"], bn, bg, sk, nw,
                                                                 HAS_BIAS=s.get("HAS_BIAS", 0)))


def draw_codes(gen, shape, sizes):
    """Random bytes: every pair of codes equally likely."""
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def draw_scales(gen, shape, sizes):
    """Positive group scales of an N(0, 1/K) weight's groups: (max - min) / 15 is about 0.4/sqrt(K)."""
    return (0.2 + 0.4 * torch.rand(shape, generator=gen)) / sizes["K"] ** 0.5


def draw_zeros(gen, shape, sizes):
    return linear_weight(gen, shape, sizes) / 4


KERNEL = register(SuiteKernel(
    name="matvec_int4",
    summary="x @ dequant(W).T (+ b), W int4 with per-128-column scales and zero points (gpt-fast / torchao)",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("tiny", dict(M=1, N=32, K=256, KH=128, G=2)),
        Case("odd-n", dict(M=1, N=37, K=512, KH=256, G=4)),
        Case("rows", dict(M=3, N=70, K=768, KH=384, G=6)),
        Case("bias", dict(M=2, N=33, K=256, KH=128, G=2, HAS_BIAS=1)),
        # a ragged last round: K/2 = 384 bytes in 256-byte rounds
        Case("ragged", dict(M=1, N=40, K=768, KH=384, G=6), params=dict(BLOCK_G=2, BLOCK_K=256)),
        Case("splitk", dict(M=1, N=40, K=2048, KH=1024, G=16), params=dict(SPLIT_K=3)),
        Case("splitk-bias", dict(M=2, N=24, K=1536, KH=768, G=12, HAS_BIAS=1),
             params=dict(SPLIT_K=2, BLOCK_N=8, BLOCK_G=1, BLOCK_K=128)),
    ],
    decode_cases=lambda c: [
        Case("q", dict(M=1, N=c["NH"] * c["DH"], K=c["D"], KH=c["D"] // 2, G=c["D"] // GROUP,
                       HAS_BIAS=c.get("BIAS", 1))),
        Case("gate", dict(M=1, N=c["INTER"], K=c["D"], KH=c["D"] // 2, G=c["D"] // GROUP)),
        Case("down", dict(M=1, N=c["D"], K=c["INTER"], KH=c["INTER"] // 2, G=c["INTER"] // GROUP)),
    ],
    candidates=candidates,
    tune_keys=("M", "N", "K", "HAS_BIAS"),
    input_makers={"qw": draw_codes, "scales": draw_scales, "zeros": draw_zeros},
    # packed weight (K/2 bytes a row), scales and zeros, x, bias, out
    min_bytes=lambda s, b: (s["N"] * s["K"] // 2 + 2 * b * s["N"] * s["K"] // GROUP
                            + b * (s.get("M", 1) * (s["K"] + s["N"]) + s.get("HAS_BIAS", 0) * s["N"])),
    module=__name__,
))
