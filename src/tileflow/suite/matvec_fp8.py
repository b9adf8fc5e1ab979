"""matvec_fp8: ``out = x @ W.T (+ b)`` for a float8 e4m3 weight with 128 x 128 block scales, as
transformers' fine-grained FP8 ``FP8Linear`` computes it on CUDA (DeepSeek-V3 / R1's published
checkpoints: ``quantization_config`` with ``weight_block_size`` [128, 128], ``activation_scheme``
"dynamic"): half the weight bytes of bf16.

What transformers computes (transformers 5.25, ``integrations/finegrained_fp8.py``): on CUDA
``FP8Linear.forward`` calls ``fp8_linear``, which never dequantizes the weight: it runs a W8A8
block matmul that also quantizes the activations, per token and per 128 columns, to fp8. Two
kernels serve it: DeepGEMM where it loads (SM90/SM100, a CUDA toolkit, the ``kernels``
package), else the Hub's ``kernels-community/finegrained-fp8`` Triton ``matmul_2d``. The
Triton one (what this kernel follows) does, for each 128-column group g of a row of x::

    a_s[g]  = max(|x_g|) / 448                      (fp32; x loaded as fp32)
    xq_g    = fp8_e4m3(x_g / max(a_s[g], 1e-12))    (round to nearest even, saturating)
    acc    += dot(xq_g, Wq_g) * a_s[g] * w_s[n // 128, g]     (fp32 dot of exact fp8 products)
    out     = acc.to(x.dtype);  out += b            (bias added by transformers afterwards)

DeepGEMM differs in the last bits: ``a_s = max(amax, 1e-4) / 448``, ``xq = fp8(x * (1 / a_s))``
and ``acc += dot * (a_s * w_s)``. There is no CPU path: ``fp8_linear`` loads the Hub kernel
(Triton, CUDA) or fails; transformers dequantizes fp8 checkpoints at load time on machines
without a GPU. This kernel differs from the Triton one only in how sums round: it sums each
group's 128 exact fp8 x fp8 products in IEEE fp32 (Hopper's fp8 MMA accumulates with fewer
bits), and adds the bias to the fp32 sums before the one rounding to x's dtype (transformers
rounds twice; DeepSeek's fp8 linears have no bias). Division is Triton's ``/`` as there
(``div.full.f32`` compiled; IEEE in the interpreter, in Pallas and in the reference).

The fp8 rounding of x is written with integer ops (exact on every target; the Triton
interpreter's own float8 conversion does not round to nearest). Each program owns
``BLOCK_N`` rows (a divisor of 128, so one row of block scales) of one row of x and streams
[BLOCK_N, BLOCK_K] fp8 tiles, ``BLOCK_K = BLOCK_G * 128`` (whole groups); ``SPLIT_K > 1``
adds the parts in a second stage. A per-output-channel scale (``weight_block_size`` [1, K])
does not fall out of this definition (its activations are not group-quantized the same way).
"""

import torch

from tileflow.suite.matvec_family import (MatvecForm, grouped_candidates, grouped_params, grouped_split,
                                          matvec_views, reduce_outputs, split_k_range, store_scaled)
from tileflow.suite.quantize import FP8_MAX, GROUP
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register

SUBNORMAL = 2.0 ** -6  # e4m3's smallest normal; below it the step is 2^-9


def round_e4m3(k, v):
    """The f32 tile ``v`` rounded to the nearest float8 e4m3fn value (ties to even, saturating
    at +-448 like ``cvt.rn.satfinite``), as f32."""
    a = k.unary("abs", v)
    bits = k.bitcast(a, "i32")
    # normal range: keep 3 of 23 mantissa bits, ties to even (a carry bumps the exponent)
    normal = k.bitcast((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576, "f32")
    # subnormal range: a multiple of 2^-9; y = a * 512 < 8 rounded to an integer, ties to even
    y = a * 512.0
    t = k.cast(y, "i32")
    f = y - k.cast(t, "f32")
    up = (f > 0.5) | (k.eq(f, 0.5) & k.eq(t & 1, 1))
    sub = k.cast(k.where(up, t + 1, t), "f32") * (1.0 / 512)
    r = k.minimum(k.where(a < SUBNORMAL, sub, normal), FP8_MAX)
    return k.where(v < 0.0, -r, r)


# the plain kernel: one weight (w, ws), an optional bias; the fused forms
# (suite/matvec_quant_fused.py) name their weights by suffix: w_g, ws_g...
FORM = MatvecForm(
    weights=("",),
    outputs=("out",),
    extras=lambda p: (("b", ("N",)),) if p["HAS_BIAS"] else (),
    epilogue=lambda k, sums, ex: [sums[0] + ex["b"]] if ex else [sums[0]],
)


def check_block_n(name: str, p) -> None:
    if p["BLOCK_N"] > GROUP or GROUP % p["BLOCK_N"]:
        raise ValueError(f"{name}: BLOCK_N={p['BLOCK_N']} must divide {GROUP} (one row of block scales)")


def fp8_views(k, suffix: str, rows: str = "N", blocks: str = "NB") -> tuple:
    """One fp8 weight's inputs: ``w<suffix>`` [rows, K] and its fp32 ``weight_scale_inv``
    ``ws<suffix>`` [ceil(rows/128), ceil(K/128)]."""
    return k.input(f"w{suffix}", (rows, "K"), dtype="f8e4m3"), k.input(f"ws{suffix}", (blocks, "KB"), dtype="f32")


def x_groups(k, x, row, cols, hi, ln_w=None, ss=None) -> tuple:
    """(xg, ss): a round's columns ``cols`` of row ``row`` of x as [BLOCK_G, GROUP] groups (past
    ``hi``: zeros), times the norm's gamma ``ln_w`` where given; with ``ss`` (the carried
    [BLOCK_K] sums of x^2, for the norm's scale) its new value."""
    xv = k.load(x, (row, cols), limits={1: hi})
    if ss is not None:
        ss = ss + xv * xv
    if ln_w is not None:
        xv = xv * k.load(ln_w, (cols,), limits={0: hi})
    return k.reshape(xv, ("BLOCK_G", "GROUP")), ss


def quantize_groups(k, xg) -> tuple:
    """(xq, a_s): the activations' dynamic quantization, per 128 columns (zeros stay zeros)."""
    amax = k.max(k.unary("abs", xg), axis=1)
    # divisors spelled out per element (+ v * 0.0): XLA rewrites a division by a constant
    # or a broadcast as a multiplication by the reciprocal, one ulp off, which rounds
    # ties of x / a_s (frequent with bf16 x) the other way; other targets divide as written
    a_s = amax / (amax * 0.0 + FP8_MAX)
    den = k.maximum(a_s, 1e-12)[:, None] + xg * 0.0
    return round_e4m3(k, xg / den), a_s


def group_sums(k, wt, xq, a_s, load_scales):
    """[BLOCK_N] sums of a round: each group's fp32 dot of the fp8 tile ``wt`` [BLOCK_N, BLOCK_K]
    with ``xq``, times its activation scale and the weight's block scales (``load_scales()``,
    [BLOCK_G])."""
    wt = k.reshape(wt, ("BLOCK_N", "BLOCK_G", "GROUP"))
    dots = k.sum(wt * xq[None, :, :], axis=2)  # [BLOCK_N, BLOCK_G]: each group's fp32 dot
    w_s = load_scales()
    return k.sum(dots * a_s[None, :] * w_s[None, :], axis=1)


def define_fp8(form: MatvecForm, k, p) -> None:
    """``form`` (matvec_family's :class:`MatvecForm`, its ``weights`` the suffixes of fp8
    weights) over fp8 weights: x quantized once a round for every weight, the RMSNorm of x
    first where ``form.norm`` (x * gamma quantized, the norm's scale applied to the sums:
    the group scale a_s takes rstd's factor, xq is the same), then the epilogue."""
    check_block_n(k.name, p)
    mv = matvec_views(k, form, p, lambda suffix: fp8_views(k, suffix), lambda suffix: f"part{suffix}")

    with k.stage("matvec", grid=("cdiv(N, BLOCK_N)", "SPLIT_K", "M")):
        row = k.program_id(2)
        first = k.program_id(0) * k.param("BLOCK_N")
        rows = k.range(first, "BLOCK_N", aligned=True)
        block_row = first // k.param("GROUP")
        lo, hi = split_k_range(k, k.dim("K"), mv.split)
        gather_ss = form.norm and mv.split == 1
        acc0 = [k.full(("BLOCK_N",), 0.0) for _ in mv.weights] + ([k.full(("BLOCK_K",), 0.0)] if gather_ss else [])
        with k.loop(lo, hi, "BLOCK_K", carry=acc0) as lp:
            cols = k.range(lp.index, "BLOCK_K", aligned=True)
            xg, ss = x_groups(k, mv.x, row, cols, hi, mv.ln_w, lp.carry[len(mv.weights)] if gather_ss else None)
            xq, a_s = quantize_groups(k, xg)
            new = []
            for acc, (w, w_scale) in zip(lp.carry, mv.weights):
                wt = k.load(w, (rows, cols), limits={1: hi})
                new.append(acc + group_sums(k, wt, xq, a_s, lambda w_scale=w_scale: k.load(
                    w_scale, (block_row, k.range(lp.index // k.param("GROUP"), "BLOCK_G", aligned=True)))))
            lp.next(*new, *([ss] if gather_ss else []))
        store_scaled(k, form, mv, row, rows, lp.results, gather_ss, lambda acc: acc)
    reduce_outputs(k, form, mv.outs, mv.parts, mv.load_extras)


def define(k, p):
    define_fp8(FORM, k, p)


def e4m3_nearest(xp, v):
    """``v`` rounded to the nearest float8 e4m3fn value (ties to even, saturating), any float dtype."""
    a = xp.abs(xp.astype(v, xp.float64))
    e = xp.floor(xp.log2(xp.where(a > 0, a, 1.0)))
    # log2 may round a value just under a power of two up to it (or the other way): exact fix-ups
    e = xp.where(2.0 ** e > a, e - 1, e)
    e = xp.where(2.0 ** (e + 1) <= a, e + 1, e)
    step = 2.0 ** (xp.maximum(e, -6.0) - 3.0)  # 3 mantissa bits; fixed 2^-9 below 2^-6
    r = xp.minimum(xp.round(a / step) * step, FP8_MAX)  # round(): half to even
    return xp.where(v < 0, -r, r)


def act_quant(xp, x):
    """(xq [M, G, 128], a_s [M, G]) of x [M, K]: the Hub kernel's per-token, per-128-column
    dynamic quantization, in fp32 as on the GPU (K padded with zeros to whole groups)."""
    m, kdim = x.shape
    pad = -kdim % GROUP
    x32 = xp.astype(x, xp.float32)
    if pad:
        x32 = xp.concat([x32, xp.zeros((m, pad), dtype=xp.float32)], axis=1)
    xg = xp.reshape(x32, (m, (kdim + pad) // GROUP, GROUP))
    a_s = xp.max(xp.abs(xg), axis=2) / FP8_MAX
    return e4m3_nearest(xp, xg / xp.maximum(a_s, 1e-12)[..., None]), a_s


def reference(xp, x, w, ws, b=None):
    """Quantize x per token and group as above, then per group ``dot(xq, w) * a_s * w_s``,
    summed over the groups (exact fp8 products, sums in x's dtype: float64 as the oracle)."""
    y = quantized_sums(xp, *act_quant(xp, x), w, ws, x.dtype)
    return {"out": y + b if b is not None else y}


def quantized_sums(xp, xq, a_s, w, ws, dtype):
    """[M, N]: per 128-column group ``dot(xq, w) * a_s * w_s``, summed over the groups, in ``dtype``."""
    m, g, _ = xq.shape
    n, kdim = w.shape
    wf = xp.astype(w, dtype)
    if g * GROUP != kdim:
        wf = xp.concat([wf, xp.zeros((n, g * GROUP - kdim), dtype=dtype)], axis=1)
    wg = xp.permute_dims(xp.reshape(wf, (n, g, GROUP)), (1, 2, 0))  # [G, 128, N]
    dots = xp.matmul(xp.permute_dims(xp.astype(xq, dtype), (1, 0, 2)), wg)  # [G, M, N]
    w_s = xp.take(xp.astype(ws, dtype), xp.arange(n) // GROUP, axis=0)  # [N, G]
    scaled = xp.permute_dims(dots, (1, 2, 0)) * xp.astype(a_s, dtype)[:, None, :] * w_s[None, :, :]
    return xp.sum(scaled, axis=2)


def fp8_params(n: int, k_: int, block_n: int = 16, block_g: int = 0, split_k: int = 1,
               num_warps: int = 4, num_stages: int = 2, **extra) -> dict:
    """Launch parameters for an N x K fp8 matvec. Untuned defaults: [16, 256] fp8 tiles."""
    return grouped_params(n, k_, block_n, block_g, split_k, num_warps, num_stages, **extra)


def default_params(s):
    return fp8_params(s["N"], s["K"], split_k=grouped_split(s["N"], s["K"]), HAS_BIAS=s.get("HAS_BIAS", 0))


def candidates(s):
    """Tiles of 1K-16K fp8 bytes, rows a divisor of 128, enough programs, split-K where rows are few."""
    return grouped_candidates(s["N"], s["K"], (4, 8, 16, 32, 64, 128),
                              lambda bn, bg, sk, nw: fp8_params(s["N"], s["K"], bn, bg, sk, nw,
                                                                HAS_BIAS=s.get("HAS_BIAS", 0)))


def draw_weight(gen, shape, sizes):
    """fp8 codes over the whole e4m3 range (a quantized block's largest maps to 448)."""
    return (torch.randn(shape, generator=gen) * 120).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def draw_scales(gen, shape, sizes):
    """weight_scale_inv of an N(0, 1/K) weight: about 3 / (448 sqrt(K)), so outputs stay O(1)."""
    return (0.5 + torch.rand(shape, generator=gen)) / (120 * sizes["K"] ** 0.5)


def _case(label, m, n, k_, **kw):
    params = kw.pop("params", {})
    return Case(label, dict(M=m, N=n, K=k_, NB=-(-n // GROUP), KB=-(-k_ // GROUP), **kw), params=params)


KERNEL = register(SuiteKernel(
    name="matvec_fp8",
    summary="x @ W.T (+ b), W fp8 e4m3 with 128x128 block scales, x quantized per token and 128 columns "
            "(transformers' fine-grained FP8, DeepSeek-V3)",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        _case("tiny", 1, 32, 256),
        _case("odd", 1, 37, 200),  # a ragged last group of x and of the weight
        _case("rows", 3, 150, 384, params=dict(BLOCK_N=32)),  # programs on both sides of row 128
        _case("bias", 2, 33, 256, HAS_BIAS=1),
        _case("splitk", 1, 64, 1024, params=dict(SPLIT_K=3)),
        _case("splitk-bias", 2, 40, 768, HAS_BIAS=1, params=dict(SPLIT_K=2, BLOCK_G=1, BLOCK_K=128, BLOCK_N=8)),
        _case("wide", 1, 130, 1100, params=dict(BLOCK_N=128, BLOCK_G=4, BLOCK_K=512)),
    ],
    decode_cases=lambda c: [
        _case("q", 1, c["NH"] * c["DH"], c["D"]),
        _case("gate", 1, c["INTER"], c["D"]),
        _case("down", 1, c["D"], c["INTER"]),
    ],
    candidates=candidates,
    tune_keys=("M", "N", "K", "HAS_BIAS"),
    input_makers={"w": draw_weight, "ws": draw_scales},
    # fp8 weight, its scales, x, bias, out
    min_bytes=lambda s, b: (s["N"] * s["K"] + 4 * -(-s["N"] // GROUP) * -(-s["K"] // GROUP)
                            + b * (s.get("M", 1) * (s["K"] + s["N"]) + s.get("HAS_BIAS", 0) * s["N"])),
    module=__name__,
))
