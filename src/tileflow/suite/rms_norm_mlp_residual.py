"""rms_norm_mlp_residual (fused): a decode layer's whole MLP block in one launch,
``out = x + (silu(n @ wg.T) * (n @ wu.T)) @ wd.T`` with ``n = rms_norm(x, ln_w, eps)``.

The unfused pair (``rms_norm_gate_up_silu``, then ``down_proj_residual``) pays two
launches' ramp and drain a layer, and the down launch cannot start multiplying before the
whole intermediate row ``h`` exists. Here no program waits for another: program ``p`` owns
``BLOCK_I`` rows of ``h``, computes them from its rows of the gate and up weights (the
norm's scale gathered on the way, as in the matvec family), multiplies them into the
matching ``BLOCK_I`` columns of the down weight ``wd`` (``[D, I]``, the ``nn.Linear``
layout, any strides) and adds its
partial ``[D]`` row into the fp32 accumulator ``acc`` with atomics
(:meth:`~tileflow.tile.builder.TileBuilder.accumulate`). The program that counts itself
last on ``done`` adds the residual, writes ``out`` and puts ``acc`` and ``done`` back to
zero, so the caller hands both in at zero and gets them back at zero.

A program's columns of ``wd`` are whole contiguous rows when the weight is stored
column-major: the torch decode step re-lays it out once, in place (the same ``[D, I]``
tensor to every other reader, no extra memory); row-major, each row gives ``BLOCK_I``
contiguous elements. The sum's order over programs varies between runs (fp32
rounding). Triton only: TPU programs cannot add into one buffer, so Pallas targets run the
unfused pair.
"""

from tileflow.suite import rms_norm_gate_up_silu
from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec import products_body, rsqrt_mean, stream_k
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register
from tileflow.tile.builder import TileDefinitionError

PARAMS = ("BLOCK_I", "BLOCK_K", "BLOCK_D", "PIPELINE", "WAVE", "num_warps", "num_stages")


def define(k, p):
    x = k.input("x", ("M", "D"))
    ln_w = k.input("ln_w", ("D",))
    wg, wu = k.input("wg", ("I", "D")), k.input("wu", ("I", "D"))
    wd = k.input("wd", ("D", "I"))
    out = k.output("out", ("M", "D"))
    acc = k.inout("acc", ("M", "D"), "f32")
    done = k.inout("done", ("M",), "i32")
    eps = k.scalar("eps")
    wave = p.get("WAVE", 0)
    if wave and p.get("PIPELINE", 0):
        raise TileDefinitionError("WAVE runs its row blocks in a loop: no PIPELINE (loads before the wait)")

    # WAVE > 0: one wave of WAVE programs, each taking row blocks pid, pid + WAVE, ... and
    # keeping its partial row (BLOCK_D >= D) in registers across them: one set of adds a
    # program, and no tail wave of a few programs
    with k.stage("mlp", grid=("WAVE" if wave else "cdiv(I, BLOCK_I)", "M")):
        row = k.program_id(1)
        ddim = k.dim("D")
        blocks = k.cdiv(k.dim("I"), k.param("BLOCK_I"))

        def h_rows(rows, pipeline):
            """``silu(gate) * up`` of ``rows`` of h (rows past I: zero weights, h = 0)."""
            body = products_body(k, x, row, ln_w, gather_ss=True)
            acc0 = [k.full(("BLOCK_I", "BLOCK_K"), 0.0), k.full(("BLOCK_I", "BLOCK_K"), 0.0),
                    k.full(("BLOCK_K",), 0.0)]
            sums = stream_k(k, 0, ddim, acc0, lambda cols: [k.load(wg, (rows, cols)), k.load(wu, (rows, cols))],
                            body, pipeline)
            scale = rsqrt_mean(k, sums.pop(), ddim, eps)
            g = k.sum(sums[0], axis=1) * scale
            return g * k.sigmoid(g) * (k.sum(sums[1], axis=1) * scale)

        if wave:
            cols = k.range(0, "BLOCK_D", aligned=True)
            with k.loop(k.program_id(0), blocks, "WAVE", carry=[k.full(("BLOCK_D",), 0.0)]) as blk:
                rows = k.range(blk.index * k.param("BLOCK_I"), "BLOCK_I", aligned=True)
                h = h_rows(rows, 0)
                blk.next(blk.carry[0] + k.sum(k.load(wd, (cols, rows)) * h[None, :], axis=1))
            k.accumulate(acc, (row, cols), blk.results[0])
            programs = k.param("WAVE")
        else:
            rows = k.range(k.program_id(0) * k.param("BLOCK_I"), "BLOCK_I", aligned=True)
            h = h_rows(rows, p.get("PIPELINE", 0))
            with k.loop(0, ddim, "BLOCK_D", carry=[]) as lp:
                cols = k.range(lp.index, "BLOCK_D", aligned=True)
                k.accumulate(acc, (row, cols), k.sum(k.load(wd, (cols, rows)) * h[None, :], axis=1))
                lp.next()
            programs = blocks

        last = k.eq(k.atomic_add(done, (row,), 1), programs - 1)
        with k.loop(0, ddim, "BLOCK_D", carry=[]) as lp:
            cols = k.range(lp.index, "BLOCK_D", aligned=True)
            total = k.load(acc, (row, cols), when=last)
            k.store(out, (row, cols), k.load(x, (row, cols), when=last) + total, when=last)
            k.store(acc, (row, cols), k.full(("BLOCK_D",), 0.0), when=last)
            lp.next()
        k.store(done, (row,), 0, when=last)


def reference(xp, x, ln_w, wg, wu, wd, acc, done, eps):
    h = rms_norm_gate_up_silu.reference(xp, x, ln_w, wg, wu, eps)["out"]
    return {"out": x + h @ xp.matrix_transpose(wd), "acc": xp.zeros_like(acc), "done": xp.zeros_like(done)}


def default_params(s: dict) -> dict:
    """One wave of 264 programs of 4 rows (2 on each of an H100 / H200's 132 multiprocessors)
    where there are that many row blocks: the fastest form measured on an H100 (34.45 against
    39.59 µs a layer for 560 programs of 16 rows, NOTES.md 2026-12-06); else a program a block."""
    if s["I"] >= 264 * 4 and next_pow2(s["D"]) <= 4096:
        return mlp_params(s["I"], s["D"], block_i=4, num_warps=8, wave=264)
    return mlp_params(s["I"], s["D"])


def mlp_params(i: int, d: int, block_i: int = 16, block_k: int = 0, block_d: int = 0, num_warps: int = 4,
               pipeline: int = 0, num_stages: int = 2, wave: int = 0) -> dict:
    """Launch parameters for an MLP of intermediate size ``i`` and width ``d``: tiles of
    about 2k elements a weight in the gate-up loop and 8k in the down loop; with ``wave``
    programs, the whole row of D in one tile."""
    block_k = block_k or min(next_pow2(d), max(32, 2048 // block_i))
    if wave:
        block_d = next_pow2(d)
    block_d = block_d or min(next_pow2(d), 512, max(32, 8192 // block_i))
    return {"BLOCK_I": block_i, "BLOCK_K": block_k, "BLOCK_D": block_d, "PIPELINE": pipeline, "WAVE": wave,
            "num_warps": num_warps, "num_stages": num_stages}


def mlp_candidates(s: dict) -> list[dict]:
    """What the autotuner tries: rows of h a program, warps, the pipelined gate-up loop."""
    out = []
    for block_i in (8, 16, 32, 64):
        if -(-s["I"] // block_i) < 64:
            continue
        for num_warps in (4, 8):
            for pipeline in (0, 1):
                out.append(mlp_params(s["I"], s["D"], block_i, num_warps=num_warps, pipeline=pipeline))
    for wave in (132, 264, 528):  # one wave: 1, 2, 4 programs on each of an H100 / H200's 132 SMs
        for block_i in (2, 4, 8):
            if block_i * next_pow2(s["D"]) <= 16384 and -(-s["I"] // block_i) >= wave:
                out.append(mlp_params(s["I"], s["D"], block_i, num_warps=8 if block_i >= 4 else 4, wave=wave))
    return out


def zeros(gen, shape, sizes):
    """Input maker for ``acc`` / ``done``: the caller hands them in at zero."""
    import torch

    return torch.zeros(shape)


def zero_counts(gen, shape, sizes):
    import torch

    return torch.zeros(shape, dtype=torch.int32)


def mlp_bytes(s: dict, b: int) -> int:
    """Each weight once, x read, out written (the accumulator stays in L2)."""
    m, i, d = s.get("M", 1), s["I"], s["D"]
    return b * (3 * i * d + 2 * m * d + d)


ATOMICS = ("triton", "reference")  # no cross-program adds on TPU

KERNEL = register(SuiteKernel(
    name="rms_norm_mlp_residual",
    summary="fused: RMSNorm, gate/up SiLU, down projection and residual, one launch (atomic split over I)",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("tiny", dict(M=1, I=64, D=32), dict(eps=1e-6), targets=ATOMICS),
        Case("odd", dict(M=1, I=99, D=61), dict(eps=1e-5), targets=ATOMICS),
        Case("loops", dict(M=2, I=37, D=600), dict(eps=1e-6), params=dict(BLOCK_I=8, BLOCK_K=128, BLOCK_D=256),
             targets=ATOMICS),
        Case("pipeline", dict(M=1, I=50, D=300), dict(eps=1e-6), params=dict(PIPELINE=1, BLOCK_K=64, BLOCK_D=128),
             targets=ATOMICS),
        # one wave of 3 programs over 13 row blocks of 4 (the last partial), D in one tile
        Case("wave", dict(M=2, I=50, D=300), dict(eps=1e-6), params=dict(WAVE=3, BLOCK_I=4, BLOCK_K=64, BLOCK_D=512),
             targets=ATOMICS),
        # more programs than row blocks: the idle ones still add (zeros) and count
        Case("wave-idle", dict(M=1, I=12, D=40), dict(eps=1e-5), params=dict(WAVE=5, BLOCK_I=4, BLOCK_K=32,
                                                                               BLOCK_D=64), targets=ATOMICS),
    ],
    decode_cases=lambda c: [Case("mlp", dict(M=1, I=c["INTER"], D=c["D"]), dict(eps=1e-6), targets=ATOMICS)],
    candidates=mlp_candidates,
    tune_keys=("M", "I", "D"),
    input_makers={"wg": linear_weight, "wu": linear_weight, "wd": linear_weight, "acc": zeros, "done": zero_counts},
    min_bytes=mlp_bytes,
    fused=True,
    module=__name__,
))
