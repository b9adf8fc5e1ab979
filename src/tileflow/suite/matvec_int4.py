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
from tileflow.suite.matvec_family import (grouped_candidates, grouped_params, grouped_split, reduce_stage,
                                          split_k_range, store_sums, store_with_bias)
from tileflow.suite.quantize import GROUP
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


def define(k, p):
    x = k.input("x", ("M", "K"))
    qw = k.input("qw", ("N", "KH"), dtype="u8")
    scales = k.input("scales", ("N", "G"))
    zeros = k.input("zeros", ("N", "G"))
    b = k.input("b", ("N",)) if p["HAS_BIAS"] else None
    out = k.output("out", ("M", "N"))
    split = p["SPLIT_K"]
    part = k.workspace("part", ("SPLIT_K", "M", "N")) if split > 1 else None
    three = ("BLOCK_N", "BLOCK_G", "GROUP")

    with k.stage("matvec", grid=("cdiv(N, BLOCK_N)", "SPLIT_K", "M")):
        row = k.program_id(2)
        rows = k.range(k.program_id(0) * k.param("BLOCK_N"), "BLOCK_N", aligned=True)
        half = k.dim("KH")  # bytes a row: column j's byte also holds column j + K/2
        lo, hi = split_k_range(k, half, split)

        def dequant(codes, first_group, group_limit):
            # (q - 8) * scale + zero over [BLOCK_N, BLOCK_G, GROUP]; past the row's end the
            # scale and zero read 0, so the weight is 0 there
            g = k.range(first_group, "BLOCK_G")
            s = k.load(scales, (rows, g), limits={1: group_limit})
            z = k.load(zeros, (rows, g), limits={1: group_limit})
            q = k.reshape(k.cast(codes - 8, "f32"), three)
            return q * s[:, :, None] + z[:, :, None]

        with k.loop(lo, hi, "BLOCK_K", carry=[k.full(three, 0.0)]) as lp:
            j = lp.index
            cols = k.range(j, "BLOCK_K", aligned=True)
            byte = k.load(qw, (rows, cols), limits={1: hi})
            # the low nibbles are columns [j, j + BLOCK_K), the high ones K/2 further on
            w_lo = dequant(byte & 15, j // k.param("GROUP"), half // k.param("GROUP"))
            w_hi = dequant(byte >> 4, (half + j) // k.param("GROUP"), k.dim("G"))
            x_lo = k.reshape(k.load(x, (row, cols), limits={1: hi}), ("BLOCK_G", "GROUP"))
            x_hi = k.reshape(k.load(x, (row, k.range(half + j, "BLOCK_K")), limits={1: half + hi}),
                             ("BLOCK_G", "GROUP"))
            lp.next(lp.carry[0] + w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :])
        store_sums(k, part, out, b, row, rows, k.sum(k.sum(lp.results[0], axis=2), axis=1))

    if split > 1:
        reduce_stage(k, [part], lambda row, rows, ys: store_with_bias(k, out, b, row, rows, ys[0]))


def reference(xp, x, qw, scales, zeros, b=None):
    """Dequantize (unpack the nibbles, ``(q - 8) * scale + zero``), then ``x @ w.T (+ b)``."""
    q = xp.astype(qw, xp.int32)
    q = xp.concat([q & 15, q >> 4], axis=1)
    n, kdim = q.shape
    group = xp.arange(kdim) // GROUP
    s, z = xp.take(scales, group, axis=1), xp.take(zeros, group, axis=1)
    w = (xp.astype(q, x.dtype) - 8) * s + z
    y = x @ xp.matrix_transpose(w)
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
