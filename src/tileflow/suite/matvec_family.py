"""The tile definition shared by the matvec kernels of the suite.

``y_j = W_j @ x`` for one to two weights ``W_j`` in the Hugging Face ``nn.Linear``
layout ``[N, K]`` (rows contiguous along K, so no weight copy is needed), with an
epilogue: bias, residual, or SiLU(gate) * up. Decode is one row (M = 1); a step of
more rows (a batch, or speculative tokens) gives each program ``BLOCK_M`` of them, so a
weight tile is read once per program for all its rows, not once per row: decode is
memory-bound, and a step of 8 rows should cost about what a step of 1 does.

Each program owns ``BLOCK_N`` output rows and streams ``[BLOCK_N, BLOCK_K]`` weight
tiles through a 2-D fp32 accumulator (one cross-lane reduction at the end instead of
one per tile). With ``SPLIT_K > 1`` a first stage writes per-split partial sums and a
second adds them and applies the epilogue: the small decode matvecs (N = 256..1536)
have too few row blocks to keep every multiprocessor streaming otherwise.

A form with ``norm`` first applies the RMSNorm that precedes every decode matvec of a
Qwen2 / Llama layer (``x * rsqrt(mean(x^2) + eps) * ln_w``): each program recomputes
the row's mean square from ``x`` (a few KB, served from L2) instead of a separate
normalisation launch writing and re-reading the normalised row (per row of the
program's ``BLOCK_M``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from tileflow.suite.registry import next_pow2
from tileflow.tile.ir import RangeValue, Value, View

MAX_BLOCK_M = 16  # rows a program: a step's batch or speculative tokens, rarely more


def block_m(m: int) -> int:
    """Rows a program for ``m`` rows a step: all of them (to a power of two), at most
    ``MAX_BLOCK_M``."""
    return min(MAX_BLOCK_M, next_pow2(m))


def residual_params(s: dict) -> dict:
    """The parameters of a residual matvec (o_proj, down_proj) that are sizes:
    ``EARLY_INPUTS`` (the residual loads before the dependent-launch wait, where the caller
    vouches that the kernel just before does not write it)."""
    return {"EARLY_INPUTS": s.get("EARLY_INPUTS", 0)}


@dataclass(frozen=True)
class MatvecForm:
    """Which matvec: weight names, output names, extra inputs, and the epilogue.

    ``epilogue(k, sums, extras)`` gets the fp32 row sums (one per weight) and the
    loaded extra inputs (dict name -> tile over the same rows) and returns one tile
    per output.
    """

    weights: tuple[str, ...]
    outputs: tuple[str, ...]
    extras: Callable[[dict], tuple[tuple[str, tuple], ...]]  # params -> ((name, shape), ...)
    epilogue: Callable
    norm: bool = False  # RMSNorm of x (gamma ``ln_w``, scalar ``eps``) before the products


RESIDUAL_FORM = MatvecForm(
    weights=("w",),
    outputs=("out",),
    extras=lambda p: (("r", ("M", "N")),),
    epilogue=lambda k, sums, ex: [sums[0] + ex["r"]],
)


def residual_reference(xp, x, w, r):
    """``x @ w.T + r`` (the o_proj and down_proj kernels)."""
    return {"out": x @ xp.matrix_transpose(w) + r}


def rsqrt_mean(k, sq_sums, kdim, eps):
    """fp32 ``rsqrt(sum(sq_sums) / kdim + eps)``: RMSNorm's scale from per-lane sums of x^2
    (over the last axis: one scale per row of a [BLOCK_M, BLOCK_K] tile)."""
    return k.rsqrt(k.sum(sq_sums, axis=-1) / k.cast(kdim, "f32") + eps)


def _lanes(row) -> tuple:
    """The shape of a ``BLOCK_K``-wide slice of x at ``row``: one row, or a range of them."""
    return (row.block, "BLOCK_K") if isinstance(row, RangeValue) else ("BLOCK_K",)


def rms_scale(k, x, row, kdim, eps):
    """fp32 ``rsqrt(mean(x[row]^2) + eps)`` of a row of ``x`` (one per row where ``row`` is
    a range), looping over BLOCK_K."""
    with k.loop(0, kdim, "BLOCK_K", carry=[k.full(_lanes(row), 0.0)]) as lp:
        xv = k.load(x, (row, k.range(lp.index, "BLOCK_K", aligned=True)))
        lp.next(lp.carry[0] + xv * xv)
    return rsqrt_mean(k, lp.results[0], kdim, eps)


def products_body(k, x, row, ln_w=None, gather_ss: bool = False, hi=None, dot: bool = False):
    """The ``body`` of :func:`stream_k` for products with a row of ``x``: the carried fp32
    accumulators gain ``tile * x[cols]`` (times the norm's gamma ``ln_w`` where given), and
    with ``gather_ss`` a last carried value gathers x^2 for the norm's scale. ``hi`` limits
    the columns read (a split-K chunk).

    Where ``row`` is a range of ``BLOCK_M`` rows the accumulators are [BLOCK_M, BLOCK_N]
    and gain the round's products summed over its columns: every row meets the one
    weight tile the round loaded. With ``dot`` (weight tiles loaded ``for_dot``) that sum
    is one tensor-core ``dot``, x rounded to the weights' dtype as the model's matmul does."""
    many = isinstance(row, RangeValue)

    def body(cols, carry, tiles):
        xv = k.load(x, (row, cols), limits=None if hi is None else {1: hi})
        ss = [carry.pop() + xv * xv] if gather_ss else []
        if ln_w is not None:
            g = k.load(ln_w, (cols,), limits=None if hi is None else {0: hi})
            xv = xv * (g[None, :] if many else g)
        if many and dot:
            return [a + k.dot(xv, k.trans(t)) for a, t in zip(carry, tiles())] + ss
        if many:
            return [a + k.sum(xv[:, None, :] * t[None, :, :], axis=2) for a, t in zip(carry, tiles())] + ss
        return [a + t * xv[None, :] for a, t in zip(carry, tiles())] + ss
    return body


def stream_k(k, lo, hi, carry, load_tiles, body, pipeline: int) -> list:
    """The K loop of a weight-streaming kernel: ``for`` rounds of ``BLOCK_K`` columns from
    ``lo`` to ``hi``, ``body(cols, carry, tiles)`` returning the new carry, where
    ``tiles()`` gives the round's weight tiles (``load_tiles(cols)``). Returns the carry
    at exit.

    With ``pipeline`` 1 (a kernel's ``PIPELINE`` parameter) each round requests the next
    round's tiles before its products and carries them in registers, so a program keeps
    two tiles in flight: Triton does not software-pipeline loads that feed no dot (no
    cp.async in the sm_90 PTX), and a short grid cannot hide the round trips with
    occupancy. The first round's tiles are loaded before the dependent-launch wait
    (:meth:`~tileflow.tile.builder.TileBuilder.before_wait`), so even with a single
    round they can arrive during the previous kernel's tail (on the H200 the tuner kept
    this form only for o_proj; docs/notebook.md). The tiles must be of inputs no earlier kernel
    of the step writes. With ``pipeline`` 2 only the first round's tiles come before the
    wait; the other rounds run as without pipelining."""
    carry = list(carry)
    n = len(carry)
    if pipeline:
        # weights are no earlier kernel's output: the first round's tiles are requested
        # before the dependent-launch wait, while the previous kernel drains
        with k.before_wait():
            first = load_tiles(k.range(lo, "BLOCK_K", aligned=True))
        if pipeline == 2:
            # PIPELINE=2: only the first round ahead of the wait, peeled off the loop, which
            # then holds one round's tiles as the plain loop does (no look-ahead registers;
            # measured faster on pure weight reads: benchmarks/step_ceiling.py, docs/notebook.md)
            carry = body(k.range(lo, "BLOCK_K", aligned=True), carry, lambda: first)
            lo, pipeline = lo + k.param("BLOCK_K"), 0
        else:
            carry += first
    with k.loop(lo, hi, "BLOCK_K", carry=carry) as lp:
        cols = k.range(lp.index, "BLOCK_K", aligned=True)
        if pipeline:
            held = list(lp.carry[n:])
            # not "aligned": the last round's look-ahead lies past the row (masked off),
            # so padding targets (Pallas) pad one block more
            ahead = load_tiles(k.range(lp.index + k.param("BLOCK_K"), "BLOCK_K"))
            new = body(cols, list(lp.carry[:n]), lambda: held)
        else:
            ahead = []
            new = body(cols, list(lp.carry), lambda: load_tiles(cols))
        lp.next(*new, *ahead)
    return list(lp.results[:n])


def split_k_range(k, kdim, split: int) -> tuple:
    """The K range [lo, hi) this program sums: with SPLIT_K > 1 its chunk (program axis 1,
    a whole number of BLOCK_K tiles), else all of K."""
    if split <= 1:
        return 0, kdim
    chunk = k.cdiv(k.cdiv(kdim, k.param("SPLIT_K")), k.param("BLOCK_K")) * k.param("BLOCK_K")
    lo = k.program_id(1) * chunk
    return lo, k.minimum(lo + chunk, kdim)


def store_with_bias(k, out, b, row, rows, y) -> None:
    """``out[row, rows] = y (+ b[rows])``."""
    k.store(out, (row, rows), y + k.load(b, (rows,)) if b is not None else y)


def store_sums(k, part, out, b, row, rows, sums) -> None:
    """A program's sums: with split-K (``part`` a workspace) its split's partials, else the
    output (+ bias)."""
    if part is not None:
        k.store(part, (k.program_id(1), row, rows), sums)
    else:
        store_with_bias(k, out, b, row, rows, sums)


def reduce_stage(k, parts, finish) -> None:
    """Split-K's second stage: each BLOCK_R outputs of a row summed over the SPLIT_K
    partials of every workspace in ``parts``; ``finish(row, rows, sums)`` stores them."""
    with k.stage("reduce", grid=("cdiv(N, BLOCK_R)", "M")):
        row = k.program_id(1)
        rows = k.range(k.program_id(0) * k.param("BLOCK_R"), "BLOCK_R", aligned=True)
        acc0 = [k.full(("BLOCK_R",), 0.0) for _ in parts]
        with k.loop(0, k.param("SPLIT_K"), 1, carry=acc0) as lp:
            lp.next(*[a + k.load(part, (lp.index, row, rows)) for a, part in zip(lp.carry, parts)])
        finish(row, rows, list(lp.results))


def extras_loader(k, extras: dict):
    """``load(row, rows)``: each extra input's tile at the program's output rows (a [N]
    input, e.g. a bias, or an [M, N] one, e.g. the residual)."""
    def load(row, rows):
        return {name: k.load(view, (rows,) if view.rank == 1 else (row, rows)) for name, view in extras.items()}
    return load


@dataclass(frozen=True)
class MatvecViews:
    """What a matvec kernel declares (:func:`matvec_views`)."""

    x: View
    ln_w: Optional[View]  # the norm's gamma, where ``form.norm``
    weights: list  # per weight, what its ``weight_views`` declared (a view, or a tuple of them)
    outs: list[View]
    eps: Optional[Value]  # the norm's runtime scalar, where ``form.norm``
    split: int  # SPLIT_K
    parts: list[View]  # with split-K, a partial-sums workspace per weight; else none
    load_extras: Callable  # ``load(row, rows)`` of the form's extra inputs (:func:`extras_loader`)


def matvec_views(k, form: MatvecForm, p, weight_views: Callable[[str], Any],
                 part_name: Callable[[str], str]) -> MatvecViews:
    """A matvec's views, declared in the order every matvec kernel's signature has them: x,
    the norm's gamma ``ln_w``, each of ``form.weights``' views (``weight_views(name)``), the
    form's extra inputs, the outputs, the norm's ``eps``, and with SPLIT_K > 1 a workspace
    ``part_name(name)`` per weight."""
    x = k.input("x", ("M", "K"))
    ln_w = k.input("ln_w", ("K",)) if form.norm else None
    weights = [weight_views(w) for w in form.weights]
    extras = {name: k.input(name, shape) for name, shape in form.extras(p)}
    outs = [k.output(o, ("M", "N")) for o in form.outputs]
    eps = k.scalar("eps") if form.norm else None
    split = p["SPLIT_K"]
    parts = [k.workspace(part_name(w), ("SPLIT_K", "M", "N")) for w in form.weights] if split > 1 else []
    return MatvecViews(x, ln_w, weights, outs, eps, split, parts, extras_loader(k, extras))


def store_outputs(k, form: MatvecForm, outs, parts, row, rows, sums, extras) -> None:
    """The end of a matvec stage: the partial sums to the split-K workspaces ``parts``, or
    (no split) the epilogue of ``extras()`` into ``outs``."""
    if parts:
        for part, s in zip(parts, sums):
            k.store(part, (k.program_id(1), row, rows), s)
    else:
        for out, y in zip(outs, form.epilogue(k, sums, extras())):
            k.store(out, (row, rows), y)


def store_scaled(k, form: MatvecForm, mv: MatvecViews, row, rows, results: list, gather_ss: bool,
                 reduce: Callable) -> None:
    """The end of a one-row matvec stage over the K loop's ``results`` (an accumulator per
    weight, then the norm's gathered sum of x^2 where ``gather_ss``): the norm's scale (from
    that sum, else a pass over x), each accumulator's sums (``reduce(acc)``) times it where
    ``form.norm``, then :func:`store_outputs`."""
    results = list(results)
    if gather_ss:
        scale = rsqrt_mean(k, results.pop(), k.dim("K"), mv.eps)
    elif form.norm:
        scale = rms_scale(k, mv.x, row, k.dim("K"), mv.eps)
    sums = [reduce(a) for a in results]
    if form.norm:
        # sum(w * x * g) * rstd == sum(w * (x * rstd) * g): the norm scales the sums
        sums = [s * scale for s in sums]
    store_outputs(k, form, mv.outs, mv.parts, row, rows, sums, lambda: mv.load_extras(row, rows))


def reduce_outputs(k, form: MatvecForm, outs, parts, load_extras) -> None:
    """With split-K (``parts``), the reduce stage: the parts added, then the epilogue."""
    if not parts:
        return

    def finish(row, rows, sums):
        for out, y in zip(outs, form.epilogue(k, sums, load_extras(row, rows))):
            k.store(out, (row, rows), y)

    reduce_stage(k, parts, finish)


def define_matvec(form: MatvecForm, k, p) -> None:
    mv = matvec_views(k, form, p, lambda w: k.input(w, ("N", "K")), lambda w: f"part_{w}")

    # BLOCK_M > 1: a program owns BLOCK_M rows of x (masked to M) and reads each weight
    # tile once for all of them; 1 keeps the one-row program (x rows are scalars)
    many = p.get("BLOCK_M", 1) > 1
    # DOT: the rows' products on tensor cores (Triton pipelines the weight loads of a dot loop)
    dot = many and bool(p.get("DOT", 0))
    with k.stage("matvec", grid=("cdiv(N, BLOCK_N)", "SPLIT_K", "cdiv(M, BLOCK_M)" if many else "M")):
        row = k.range(k.program_id(2) * k.param("BLOCK_M"), "BLOCK_M", aligned=True) if many else k.program_id(2)
        rows = k.range(k.program_id(0) * k.param("BLOCK_N"), "BLOCK_N", aligned=True)
        kdim = k.dim("K")
        lo, hi = split_k_range(k, kdim, mv.split)
        # sum(w * x * g) * rstd == sum(w * (x * rstd) * g): the norm's rstd scales the sums
        # afterwards, so the weight stream does not wait for the norm's reduction; without
        # split-K the loop sees all of x and gathers the sum of squares on the way
        gather_ss = form.norm and mv.split == 1
        # EARLY_INPUTS: the caller vouches that the extra inputs (the residual) were written
        # two or more kernels back, so they load before the dependent-launch wait instead
        # of as a round trip after the K loop
        early = None
        if p.get("EARLY_INPUTS", 0) and mv.split == 1:
            with k.before_wait():
                early = mv.load_extras(row, rows)
        # no k.prefetch of the first weight tile here: measured slower (docs/decisions.md)
        # many rows: [BLOCK_M, BLOCK_N] sums, each round's products reduced as they come
        # (a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator would need BLOCK_M times the registers)
        acc0 = [k.full(("BLOCK_M", "BLOCK_N") if many else ("BLOCK_N", "BLOCK_K"), 0.0) for _ in mv.weights]
        if gather_ss:
            acc0.append(k.full(_lanes(row), 0.0))
        body = products_body(k, mv.x, row, mv.ln_w, gather_ss, hi, dot)
        results = stream_k(k, lo, hi, acc0,
                           lambda cols: [k.load(w, (rows, cols), limits={1: hi}, for_dot=dot) for w in mv.weights],
                           body, p.get("PIPELINE", 0))
        if gather_ss:
            scale = rsqrt_mean(k, results.pop(), kdim, mv.eps)
        elif form.norm:
            scale = rms_scale(k, mv.x, row, kdim, mv.eps)
        sums = results if many else [k.sum(a, axis=1) for a in results]
        if form.norm:
            sums = [s * (scale[:, None] if many else scale) for s in sums]
        store_outputs(k, form, mv.outs, mv.parts, row, rows, sums, lambda: early or mv.load_extras(row, rows))
    reduce_outputs(k, form, mv.outs, mv.parts, mv.load_extras)


def matvec_params(n: int, k_: int, block_n: int = 0, block_k: int = 0, split_k: int = 0,
                  num_warps: int = 0, num_stages: int = 2, m: int = 1, **extra) -> dict:
    """Launch parameters with defaults that suit a decode matvec of size N x K with ``m``
    rows a step (``BLOCK_M`` only where ``m`` > 1: one row keeps the one-row program;
    several rows take :func:`rows_params` unless tiles are given)."""
    if m > 1 and not (block_n or block_k):
        return rows_params(n, k_, m, split_k=split_k, num_warps=num_warps, **extra)
    # Untuned defaults, from what the leaderboards of both GH100 parts picked (1.5B
    # shapes, H100 and H200 entries in data/autotune.json):
    # - few rows (q, o, down: N = 1536): two rows a program and a 2048-wide slice of K
    #   per round trip, 8 warps: a short grid needs big tiles to keep bytes in flight;
    # - many rows (gate_up N = 8960, lm_head N = 152k): small tiles, 4 warps, many
    #   programs resident per multiprocessor. With the few-rows tiles these ran 1.5-1.9x
    #   slower on the H200 (norm-fused gate_up 33.7 vs 17.9 us, lm_head 169.5 vs 107.4),
    #   which is what untuned 7B / 8B shapes would get.
    many_rows = n >= 8192
    if not block_n:
        block_n = 16 if n > 65536 else 2  # vocab-sized rows (lm_head): 16-row tiles
    if not block_k:
        if many_rows:
            block_k = min(next_pow2(k_), 512 if block_n <= 2 else 256)
        else:  # at most 4k fp32 accumulators per weight (16 x 2048 spilled registers)
            block_k = min(2048, next_pow2(k_), max(256, 4096 // block_n))
        if m > 1:  # a round's [BLOCK_M, BLOCK_N, BLOCK_K] products within the candidates' largest tile
            block_k = min(block_k, max(64, 16384 // (block_n * block_m(m))))
    num_warps = num_warps or (4 if many_rows else 8)
    if not split_k:
        split_k = 1
    p = {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "BLOCK_R": min(1024, next_pow2(n)),
         "num_warps": num_warps, "num_stages": num_stages}
    if m > 1:
        p["BLOCK_M"] = block_m(m)
    p.update(extra)
    return p


def rows_params(n: int, k_: int, m: int, block_n: int = 0, block_k: int = 0, split_k: int = 0,
                num_warps: int = 0, num_stages: int = 3, **extra) -> dict:
    """Several rows a step as a skinny matmul (``DOT``): [BLOCK_M, BLOCK_K] x [BLOCK_K,
    BLOCK_N] products on tensor cores, every tile side at least 16 (rows past ``m``
    masked), a few stages of weight tiles in flight, and split-K until about two programs
    a multiprocessor stream (the one-row defaults' 2-row tiles cannot feed a dot)."""
    block_n = block_n or (64 if n > 65536 else 32 if n >= 8192 else 16)
    block_k = block_k or min(128 if block_n >= 64 else 256, max(16, next_pow2(k_)))
    if not split_k:
        blocks, split_k = -(-n // block_n), 1
        while blocks * split_k < 264 and split_k < 8 and k_ / (split_k + 1) >= 2 * block_k:
            split_k += 1
    p = {"BLOCK_M": max(16, block_m(m)), "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
         "BLOCK_R": min(1024, next_pow2(n)), "DOT": 1, "num_warps": num_warps or 4, "num_stages": num_stages}
    p.update(extra)
    return p


def matvec_candidates(n: int, k_: int, m: int = 1, **extra) -> list[dict]:
    """The parameter sets the autotuner tries for an N x K matvec: tiles of 1k-16k
    elements (a whole K row per tile included, so short rows need one round trip),
    enough programs to cover the multiprocessors, split-K where rows are few, and each
    with the register-pipelined K loop (``PIPELINE``, first tiles before the PDL wait).
    With ``m`` > 1 rows a step, :func:`rows_params` tiles."""
    if m > 1:
        return [rows_params(n, k_, m, bn, bk, split, nw, stages, **extra)
                for bn in (16, 32, 64) for bk in (64, 128, 256) for split in (1, 2, 3, 4, 6, 8)
                for nw in (4, 8) for stages in (3, 4)
                if bk <= max(16, next_pow2(k_)) and 128 <= -(-n // bn) * split <= 16384
                and (split == 1 or k_ / split >= bk)]
    out = []
    for block_n in (2, 4, 8, 16, 32):
        for block_k in (256, 512, 1024, 2048, 4096):
            tile = block_n * block_k
            if block_k > next_pow2(k_) or not 1024 <= tile <= 16384:
                continue
            for split_k in (1, 2, 3, 4, 6, 8):
                programs = -(-n // block_n) * split_k
                if not 128 <= programs <= 16384 or (split_k > 1 and k_ / split_k < block_k / 2):
                    continue
                for num_warps in (4, 8):
                    if tile // (num_warps * 32) < 8:  # under one 16-byte load per thread
                        continue
                    out.append(matvec_params(n, k_, block_n, block_k, split_k, num_warps, m=m, **extra))
                    # pipelined: the first tiles load before the PDL wait, one round or more
                    out.append(matvec_params(n, k_, block_n, block_k, split_k, num_warps, m=m, PIPELINE=1,
                                             **extra))
    return out


def matvec_bytes(n_weights: int, n_bias: int, n_rows_in: int, n_outputs: int):
    """Least bytes moved: each weight, bias, [M, N] input and output once, and x."""
    def f(s, b):
        m, n, k_ = s.get("M", 1), s["N"], s["K"]
        return b * (n_weights * n * k_ + m * k_ + n_bias * n + (n_rows_in + n_outputs) * m * n)
    return f


def grouped_params(n: int, row: int, block_n: int = 16, block_g: int = 0, split_k: int = 1,
                   num_warps: int = 4, num_stages: int = 2, **extra) -> dict:
    """Launch parameters of a matvec over 128-column weight groups (the quantized kernels),
    a weight row read as ``row`` elements (bytes for packed int4). Untuned defaults:
    [16, 256] tiles."""
    from tileflow.suite.quantize import GROUP

    block_g = block_g or max(1, min(2, next_pow2(row) // GROUP))
    p = {"BLOCK_N": block_n, "BLOCK_G": block_g, "BLOCK_K": block_g * GROUP, "GROUP": GROUP,
         "SPLIT_K": split_k, "BLOCK_R": min(1024, next_pow2(n)), "num_warps": num_warps,
         "num_stages": num_stages}
    p.update(extra)
    return p


def grouped_split(n: int, row: int) -> int:
    """SPLIT_K for a short grid (fewer than 264 programs of 16 rows, e.g. the 1.5B's
    1536-row projections): fills the GPU, each split at least 256 elements of a row."""
    programs = -(-n // 16)
    split = 1 if programs >= 264 else min(8, max(1, 264 // programs))
    while split > 1 and row / split < 256:
        split -= 1
    return split


def grouped_candidates(n: int, row: int, block_ns, make) -> list[dict]:
    """Tiles of 1K-16K elements, enough programs, split-K where rows are few;
    ``make(block_n, block_g, split_k, num_warps)`` gives each candidate's params."""
    from tileflow.suite.quantize import GROUP

    out = []
    for block_n in block_ns:
        for block_g in (1, 2, 4, 8):
            tile = block_n * block_g * GROUP
            if block_g * GROUP > next_pow2(row) or not 1024 <= tile <= 16384:
                continue
            for split_k in (1, 2, 3, 4, 6, 8):
                programs = -(-n // block_n) * split_k
                if not 128 <= programs <= 16384 or (split_k > 1 and row / split_k < block_g * GROUP / 2):
                    continue
                for num_warps in (4, 8):
                    out.append(make(block_n, block_g, split_k, num_warps))
    return out
