"""Microbenchmarks of the decode matvec's structure, not suite kernels: what bounds the
1.5B down projection (1536 x 8960) at ~2.7 TB/s?

1. ``hot``: does a decode matvec pay for every program re-reading the same input row
from L2? ``y = W @ x`` at a decode shape, each program
owning ``BLOCK_N`` rows of ``W`` and reading the whole of ``x``, as the suite's
matvecs do, with ``x`` given as ``R`` identical copies and program ``p`` reading copy
``p % R``. With R = 1 every program's x loads hit the same L2 lines; with more copies
the same bytes spread over more lines (and L2 slices). If the time falls as R grows,
the shared row is a bottleneck and a producer kernel writing a few copies of its
output would remove it. GPU only; timed as the suite's leaderboard times launches
(back to back in a CUDA graph, weight copies rotated so ``W`` streams from memory).

2. ``sweep``: the same kernel over tiles, warps and the K loop's software-pipelining
depth (``tl.range(..., num_stages=S)``), at the down projection's shape.

3. ``flags``: the MLP's two phases (gate-up-SiLU into ``h``, then down + residual) as two
dependent launches (programmatic dependent launch, as the suite runs them) against one
launch whose down programs poll per-chunk ready counters that the gate-up programs bump
after writing their rows of ``h`` (no grid barrier: a down program waits only for the
chunk of ``h`` its next K round reads, and loads its first weight tiles before waiting).
Does overlapping the second phase's ramp with the first's tail pay, before building it
into the suite?
4. ``ready``: the same counters between two *separate* dependent launches: the down kernel
skips ``gdc_wait`` and polls the chunk counters instead (the counters count rows of ``h``
written; gate-up's program 0 clears the next layer's row of counters, so nothing resets
them on the critical path). If this keeps the one-launch gain, the suite needs no programs
of two roles in one grid, only a signal epilogue and a wait before a chunk's load.
5. ``fused``: the whole MLP (norm, gate-up, SiLU, down, residual) as one launch with no
dependency between its programs: program ``p`` owns ``BI`` rows of the intermediate
activation ``h``, computes them from its rows of the gate and up weights, multiplies them
into the matching ``BI`` columns of the down weight and adds its partial ``[D]`` row into
an fp32 accumulator with relaxed atomics; the last program to finish (an atomic ticket)
rounds the sum, adds the residual, writes the output and leaves the accumulator and the
ticket at zero for the next launch. Against the suite's own two launches (ops) in the
same graph harness. The down weight read as stored (``[D, I]``, ``BI`` contiguous
elements a row) or column-major (``[I, D]`` contiguous: the same tensor re-laid-out in
place, so no extra memory).

6. ``split``: the down projection (long rows: 1536 x 8960) with its K range split over
``SPLIT`` programs a row block in *one* launch: each program stores its partial sums to a
workspace, then takes an acq_rel ticket of its row block; the last of the block's programs
adds the partials and the residual and writes the rows (no second launch, no device-wide
atomics: one ticket a row block). More programs with shorter K loops put more bytes in
flight early (``step_ceiling.py``: a pure read of down's bytes runs fastest as ~3400
programs of two rounds, against the suite's 768 programs of five). Timed after the
suite's gate-up (as in the step) and alone.

    python benchmarks/matvec_probe.py [hot|sweep|flags|ready|fused|split]
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from graph_timing import replay_us


@triton.jit
def matvec_copies(w_ptr, x_ptr, y_ptr, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 1):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    xs = x_ptr + (pid % R) * K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=cols[None, :] < K, other=0.0).to(tl.float32)
        x = tl.load(xs + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1))


def graph_us(run, launches: int) -> float:
    """Median µs a launch of ``run(i)`` for i in range(launches), captured back to back in
    one CUDA graph (10 replays)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            run(i)
    return replay_us(g) / launches


def time_us(n: int, k: int, copies: int, block_n: int, block_k: int, warps: int, stages: int = 1, sets: int = 4,
            launches: int = 40) -> float:
    """Median µs a launch inside a CUDA graph of ``launches`` back-to-back launches that
    rotate over ``sets`` weight copies (together larger than L2, so W streams from memory)."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16).repeat(copies, 1)
    y = torch.empty(n, device="cuda", dtype=torch.float32)
    grid = (n // block_n,)

    def run(i):
        matvec_copies[grid](ws[i % sets], x, y, n, k, copies, block_n, block_k, stages, num_warps=warps)

    run(0)
    torch.testing.assert_close(y, ws[0].float() @ x[0].float(), rtol=2e-2, atol=2e-2)
    return graph_us(run, launches)


@triton.jit
def gate_up_phase(pid, wg_ptr, wu_ptr, x_ptr, h_ptr, D: tl.constexpr, BLOCK_A: tl.constexpr, BK_A: tl.constexpr):
    rows = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    ag = tl.zeros((BLOCK_A, BK_A), tl.float32)
    au = tl.zeros((BLOCK_A, BK_A), tl.float32)
    for k0 in range(0, D, BK_A):
        cols = k0 + tl.arange(0, BK_A)
        x = tl.load(x_ptr + cols).to(tl.float32)
        ag += tl.load(wg_ptr + rows[:, None] * D + cols[None, :]).to(tl.float32) * x[None, :]
        au += tl.load(wu_ptr + rows[:, None] * D + cols[None, :]).to(tl.float32) * x[None, :]
    g, u = tl.sum(ag, axis=1), tl.sum(au, axis=1)
    tl.store(h_ptr + rows, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty))


@triton.jit
def down_phase(pid, wd_ptr, h_ptr, r_ptr, y_ptr, flags_ptr, I: tl.constexpr, BLOCK_B: tl.constexpr,
               BK_B: tl.constexpr, PER_CHUNK: tl.constexpr, POLL: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_B, BK_B), tl.float32)
    cols = tl.arange(0, BK_B)
    w = tl.load(wd_ptr + rows[:, None] * I + cols[None, :], mask=cols[None, :] < I, other=0.0).to(tl.float32)
    for k0 in range(0, I, BK_B):
        cols = k0 + tl.arange(0, BK_B)
        if POLL:  # wait until every gate-up program of this chunk of h has written it
            need = tl.minimum(PER_CHUNK, (I - k0 + (BK_B // PER_CHUNK) - 1) // (BK_B // PER_CHUNK))
            done = tl.atomic_add(flags_ptr + k0 // BK_B, 0, sem="acquire")
            while done < need:
                done = tl.atomic_add(flags_ptr + k0 // BK_B, 0, sem="acquire")
        h = tl.load(h_ptr + cols, mask=cols < I, other=0.0, cache_modifier=".cg").to(tl.float32)
        nxt = k0 + BK_B + tl.arange(0, BK_B)
        w_next = tl.load(wd_ptr + rows[:, None] * I + nxt[None, :], mask=nxt[None, :] < I, other=0.0).to(tl.float32)
        acc += w * h[None, :]
        w = w_next
    tl.store(y_ptr + rows, tl.sum(acc, axis=1) + tl.load(r_ptr + rows).to(tl.float32))


@triton.jit
def gate_up_kernel(wg_ptr, wu_ptr, x_ptr, h_ptr, D: tl.constexpr, BLOCK_A: tl.constexpr, BK_A: tl.constexpr,
                   USE_PDL: tl.constexpr = True):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    gate_up_phase(tl.program_id(0), wg_ptr, wu_ptr, x_ptr, h_ptr, D, BLOCK_A, BK_A)


@triton.jit
def down_kernel(wd_ptr, h_ptr, r_ptr, y_ptr, I: tl.constexpr, BLOCK_B: tl.constexpr, BK_B: tl.constexpr,
                USE_PDL: tl.constexpr = True):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    down_phase(tl.program_id(0), wd_ptr, h_ptr, r_ptr, y_ptr, h_ptr, I, BLOCK_B, BK_B, 1, False)


@triton.jit
def mlp_flags_kernel(wg_ptr, wu_ptr, x_ptr, h_ptr, wd_ptr, r_ptr, y_ptr, flags_ptr, D: tl.constexpr,
                     I: tl.constexpr, NA: tl.constexpr, BLOCK_A: tl.constexpr, BK_A: tl.constexpr,
                     BLOCK_B: tl.constexpr, BK_B: tl.constexpr, USE_PDL: tl.constexpr = True):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if pid < NA:
        gate_up_phase(pid, wg_ptr, wu_ptr, x_ptr, h_ptr, D, BLOCK_A, BK_A)
        tl.debug_barrier()  # every thread's rows of h are written before the count says so
        tl.atomic_add(flags_ptr + (pid * BLOCK_A) // BK_B, 1, sem="release")
    else:
        down_phase(pid - NA, wd_ptr, h_ptr, r_ptr, y_ptr, flags_ptr, I, BLOCK_B, BK_B, BK_B // BLOCK_A, True)


FLAG_CONFIGS = (  # gate-up (rows, K tile, warps), down (rows, K tile, warps)
    (8, 256, 4, 2, 1024, 4), (4, 256, 4, 2, 2048, 8), (4, 512, 4, 2, 1024, 4), (8, 256, 4, 4, 1024, 4),
    (16, 256, 8, 2, 1024, 8), (4, 256, 4, 1, 1024, 4), (8, 512, 8, 2, 2048, 8))


def flags(d: int = 1536, inter: int = 8960, sets: int = 3, launches: int = 30) -> None:
    dev, bf = "cuda", torch.bfloat16
    mk = lambda *s: torch.randn(*s, device=dev, dtype=bf) / s[-1] ** 0.5  # noqa: E731
    weights = [(mk(inter, d), mk(inter, d), mk(d, inter)) for _ in range(sets)]
    x, r = torch.randn(d, device=dev, dtype=bf), torch.randn(d, device=dev, dtype=bf)
    h, y = torch.empty(inter, device=dev, dtype=bf), torch.empty(d, device=dev, dtype=torch.float32)
    mb = (2 * inter * d + d * inter) * 2 / 1e6
    print(f"a layer's MLP, {mb:.1f} MB: {mb / 4.2e3 * 1e3:.2f} us at 4.2 TB/s")
    print(f"{'gate-up tiles':<16}{'down tiles':<16}{'two launches':>13}{'one, warps A':>13}{'one, warps B':>13}")

    def expected(wg, wu, wd):
        g, u = wg.float() @ x.float(), wu.float() @ x.float()
        return wd.float() @ (g * torch.sigmoid(g) * u).to(bf).float() + r.float()

    def timed(fn) -> float:
        fn(0, *weights[0])
        torch.cuda.synchronize()
        torch.testing.assert_close(y, expected(*weights[0]), rtol=2e-2, atol=2e-2)
        return graph_us(lambda i: fn(i, *weights[i % sets]), launches)

    for block_a, bk_a, wa, block_b, bk_b, wb in FLAG_CONFIGS:
        chunks = -(-inter // bk_b)
        flag_rows = torch.zeros(launches, chunks, device=dev, dtype=torch.int32)
        na, nb = inter // block_a, d // block_b

        def two(i, wg, wu, wd):
            gate_up_kernel[(na,)](wg, wu, x, h, d, block_a, bk_a, num_warps=wa, launch_pdl=True)
            down_kernel[(nb,)](wd, h, r, y, inter, block_b, bk_b, num_warps=wb, launch_pdl=True)

        def one(warps):
            def run(i, wg, wu, wd):
                if i == 0:  # the graph's first launch: every launch's counters start at zero
                    flag_rows.zero_()
                mlp_flags_kernel[(na + nb,)](wg, wu, x, h, wd, r, y, flag_rows[i], d, inter, na, block_a, bk_a,
                                             block_b, bk_b, num_warps=warps, launch_pdl=True)
            return run

        cells = [timed(two), timed(one(wa)), timed(one(wb)) if wb != wa else float("nan")]
        print(f"{f'{block_a}x{bk_a} w{wa}':<16}{f'{block_b}x{bk_b} w{wb}':<16}"
              + "".join(f"{c:>13.2f}" for c in cells), flush=True)


@triton.jit
def gate_up_signal_kernel(wg_ptr, wu_ptr, x_ptr, h_ptr, ready_ptr, clear_ptr, D: tl.constexpr, I: tl.constexpr,
                          BLOCK_A: tl.constexpr, BK_A: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    gate_up_phase(pid, wg_ptr, wu_ptr, x_ptr, h_ptr, D, BLOCK_A, BK_A)
    if pid == 0:  # the next layer's counters, cleared before this program's count is released,
        # so the down kernel (which the next layer's gate-up waits on) cannot finish before it
        c = tl.arange(0, NCHUNK)
        tl.store(clear_ptr + c, tl.zeros((NCHUNK,), tl.int32), mask=c < cdiv_i(I, CHUNK))
    tl.debug_barrier()  # every thread's rows of h are stored before the count says so
    tl.atomic_add(ready_ptr + (pid * BLOCK_A) // CHUNK, BLOCK_A, sem="release", scope="gpu")


@triton.jit
def cdiv_i(a, b):
    return (a + b - 1) // b


@triton.jit
def down_ready_kernel(wd_ptr, h_ptr, r_ptr, y_ptr, ready_ptr, I: tl.constexpr, BLOCK_B: tl.constexpr,
                      BK_B: tl.constexpr, CHUNK: tl.constexpr, WAIT: tl.constexpr):
    # no gdc_wait: every value this kernel reads from gate-up arrives behind a chunk counter
    tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_B, BK_B), tl.float32)
    cols = tl.arange(0, BK_B)
    w = tl.load(wd_ptr + rows[:, None] * I + cols[None, :], mask=cols[None, :] < I, other=0.0).to(tl.float32)
    if WAIT:
        tl.extra.cuda.gdc_wait()
    for k0 in range(0, I, BK_B):
        cols = k0 + tl.arange(0, BK_B)
        if not WAIT:
            for c in range(k0 // CHUNK, cdiv_i(tl.minimum(k0 + BK_B, I), CHUNK)):
                need = tl.minimum(CHUNK, I - c * CHUNK)
                while tl.atomic_add(ready_ptr + c, 0, sem="acquire", scope="gpu") < need:
                    pass
        h = tl.load(h_ptr + cols, mask=cols < I, other=0.0, cache_modifier=".cg").to(tl.float32)
        nxt = k0 + BK_B + tl.arange(0, BK_B)
        w_next = tl.load(wd_ptr + rows[:, None] * I + nxt[None, :], mask=nxt[None, :] < I, other=0.0).to(tl.float32)
        acc += w * h[None, :]
        w = w_next
    tl.store(y_ptr + rows, tl.sum(acc, axis=1) + tl.load(r_ptr + rows).to(tl.float32))


READY_CONFIGS = (  # gate-up (rows, K tile, warps), down (rows, K tile, warps), chunk of h per counter
    (2, 512, 4, 2, 2048, 8, 2048), (2, 512, 4, 2, 2048, 8, 512), (4, 256, 4, 2, 2048, 8, 2048),
    (4, 256, 4, 1, 1024, 4, 1024), (8, 256, 4, 2, 1024, 4, 1024))


def ready(d: int = 1536, inter: int = 8960, sets: int = 3, launches: int = 28) -> None:
    dev, bf = "cuda", torch.bfloat16
    mk = lambda *s: torch.randn(*s, device=dev, dtype=bf) / s[-1] ** 0.5  # noqa: E731
    weights = [(mk(inter, d), mk(inter, d), mk(d, inter)) for _ in range(sets)]
    x, r = torch.randn(d, device=dev, dtype=bf), torch.randn(d, device=dev, dtype=bf)
    h, y = torch.empty(inter, device=dev, dtype=bf), torch.empty(d, device=dev, dtype=torch.float32)
    print(f"{'gate-up tiles':<16}{'down tiles':<16}{'chunk':>6}{'gdc_wait':>10}{'counters':>10}{'one launch':>11}")

    def expected(wg, wu, wd):
        g, u = wg.float() @ x.float(), wu.float() @ x.float()
        return wd.float() @ (g * torch.sigmoid(g) * u).to(bf).float() + r.float()

    def timed(fn) -> float:
        for i in range(3):  # three layers eagerly: the counters' rows cycle as in the graph
            y.fill_(float("nan"))
            fn(i, *weights[i % sets])
            torch.cuda.synchronize()
            torch.testing.assert_close(y, expected(*weights[i % sets]), rtol=2e-2, atol=2e-2)
        return graph_us(lambda i: fn(i, *weights[i % sets]), launches)

    for block_a, bk_a, wa, block_b, bk_b, wb, chunk in READY_CONFIGS:
        nchunk = -(-inter // chunk)
        rows = torch.zeros(launches, nchunk, device=dev, dtype=torch.int32)
        na, nb = inter // block_a, d // block_b

        def two(wait):
            def run(i, wg, wu, wd):
                i %= launches
                gate_up_signal_kernel[(na,)](wg, wu, x, h, rows[i], rows[(i + 1) % launches], d, inter, block_a, bk_a,
                                             chunk, triton.next_power_of_2(nchunk), num_warps=wa, launch_pdl=True)
                down_ready_kernel[(nb,)](wd, h, r, y, rows[i], inter, block_b, bk_b, chunk, wait, num_warps=wb,
                                         launch_pdl=True)
            return run

        flag_rows = torch.zeros(launches, -(-inter // bk_b), device=dev, dtype=torch.int32)

        def one(i, wg, wu, wd):
            if i == 0:
                flag_rows.zero_()
            mlp_flags_kernel[(na + nb,)](wg, wu, x, h, wd, r, y, flag_rows[i], d, inter, na, block_a, bk_a,
                                         block_b, bk_b, num_warps=wb, launch_pdl=True)

        cells = [timed(two(True)), timed(two(False)), timed(one) if bk_b % block_a == 0 else float("nan")]
        print(f"{f'{block_a}x{bk_a} w{wa}':<16}{f'{block_b}x{bk_b} w{wb}':<16}{chunk:>6}"
              + "".join(f"{c:>10.2f}" for c in cells[:2]) + f"{cells[2]:>11.2f}", flush=True)


def hot() -> None:
    shapes = [("down 1536x8960", 1536, 8960, 2, 2048, 8), ("o 1536x1536", 1536, 1536, 2, 2048, 8),
              ("gate_up-like 17920x1536", 17920, 1536, 8, 256, 4)]
    print(f"{'shape':<26}{'copies':>7}{'us':>9}{'GB/s':>8}")
    for label, n, k, bn, bk, nw in shapes:
        for copies in (1, 2, 4, 8, 16, 64):
            us = time_us(n, k, copies, bn, bk, nw)
            print(f"{label:<26}{copies:>7}{us:>9.2f}{n * k * 2 / us / 1e3:>8.0f}", flush=True)


def sweep(n: int = 1536, k: int = 8960) -> None:
    print(f"{'BLOCK_N':>8}{'BLOCK_K':>8}{'warps':>6}{'stages':>7}{'us':>9}{'GB/s':>8}")
    rows = []
    for bn in (1, 2, 4, 8):
        for bk in (512, 1024, 2048, 4096):
            if not 1024 <= bn * bk <= 16384:
                continue
            for nw in (4, 8, 16):
                if bn * bk < nw * 32 * 8:
                    continue
                for stages in (1, 2, 3, 4):
                    try:
                        us = time_us(n, k, 1, bn, bk, nw, stages)
                    except Exception as exc:  # e.g. out of shared memory at deep pipelines
                        print(f"{bn:>8}{bk:>8}{nw:>6}{stages:>7}  {type(exc).__name__}", flush=True)
                        continue
                    rows.append((us, bn, bk, nw, stages))
                    print(f"{bn:>8}{bk:>8}{nw:>6}{stages:>7}{us:>9.2f}{n * k * 2 / us / 1e3:>8.0f}", flush=True)
    print("best:", " | ".join(f"BN{b} BK{kk} w{w} s{st}: {us:.2f} us" for us, b, kk, w, st in sorted(rows)[:5]))


@triton.jit
def fused_mlp_kernel(x_ptr, lnw_ptr, wg_ptr, wu_ptr, wd_ptr, r_ptr, acc_ptr, ticket_ptr, out_ptr, eps,
                     D: tl.constexpr, I: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                     COLUMN_MAJOR: tl.constexpr, NP: tl.constexpr, USE_PDL: tl.constexpr = True,
                     MODE: tl.constexpr = 0):
    # MODE (ablations, wrong results by design except 0 and 4): 0 the kernel; 1 partial rows
    # stored to a scratch row each, no atomics, no ticket; 2 gate-up only (h stored);
    # 3 down only (h from x, no gate-up weights); 4 the kernel with the first down tile
    # requested before the gate-up loop
    pid = tl.program_id(0)
    rows = pid * BI + tl.arange(0, BI)
    if MODE == 4:
        dc0 = tl.arange(0, BD)
        w_first = tl.load(wd_ptr + rows[:, None] * D + dc0[None, :], mask=dc0[None, :] < D, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if MODE == 3:
        h = tl.load(x_ptr + rows % D).to(tl.float32)
    else:
        h = _fused_gate_up(x_ptr, lnw_ptr, wg_ptr, wu_ptr, rows, eps, D, BI, BK)
    if MODE == 2:
        tl.store(acc_ptr + rows, h)
        return
    for d0 in range(0, D, BD):
        dc = d0 + tl.arange(0, BD)
        if MODE == 4 and d0 == 0:
            w = w_first
        elif COLUMN_MAJOR:  # element (d, i) at i * D + d
            w = tl.load(wd_ptr + rows[:, None] * D + dc[None, :], mask=dc[None, :] < D, other=0.0)
        else:
            w = tl.load(wd_ptr + dc[None, :] * I + rows[:, None], mask=dc[None, :] < D, other=0.0)
        part = tl.sum(w.to(tl.float32) * h[:, None], axis=0)
        if MODE == 1:
            tl.store(acc_ptr + pid * D + dc, part, mask=dc < D)
        else:
            tl.atomic_add(acc_ptr + dc, part, mask=dc < D, sem="relaxed")
    if MODE == 1:
        return
    _fused_finish(acc_ptr, ticket_ptr, r_ptr, out_ptr, NP, D, BD)


@triton.jit
def _fused_finish(acc_ptr, ticket_ptr, r_ptr, out_ptr, NP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """The count; the last of NP programs rounds the sums, adds the residual, writes the
    output and leaves the sums and the count at zero."""
    tl.debug_barrier()  # every thread's adds are issued before the ticket says this program is done
    t = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if t == NP - 1:
        for d0 in range(0, D, BD):
            dc = d0 + tl.arange(0, BD)
            # read at L2, where the adds were performed; then zero for the next launch
            a = tl.atomic_add(acc_ptr + dc, tl.zeros((BD,), tl.float32), mask=dc < D, sem="acquire")
            tl.store(acc_ptr + dc, tl.zeros((BD,), tl.float32), mask=dc < D)
            y = tl.load(r_ptr + dc, mask=dc < D).to(tl.float32) + a.to(tl.bfloat16).to(tl.float32)
            tl.store(out_ptr + dc, y.to(out_ptr.dtype.element_ty), mask=dc < D)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _fused_gate_up(x_ptr, lnw_ptr, wg_ptr, wu_ptr, rows, eps, D: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr):
    ag = tl.zeros((BI, BK), tl.float32)
    au = tl.zeros((BI, BK), tl.float32)
    ss = tl.zeros((BK,), tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        xv = tl.load(x_ptr + cols).to(tl.float32)
        ss += xv * xv
        xw = (xv * tl.load(lnw_ptr + cols).to(tl.float32))[None, :]
        ag += tl.load(wg_ptr + rows[:, None] * D + cols[None, :]).to(tl.float32) * xw
        au += tl.load(wu_ptr + rows[:, None] * D + cols[None, :]).to(tl.float32) * xw
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / D + eps)
    g = (tl.sum(ag, axis=1) * rstd).to(tl.bfloat16).to(tl.float32)
    u = (tl.sum(au, axis=1) * rstd).to(tl.bfloat16).to(tl.float32)
    return ((g * tl.sigmoid(g)).to(tl.bfloat16).to(tl.float32) * u).to(tl.bfloat16).to(tl.float32)


@triton.jit
def fused_mlp_stride_kernel(x_ptr, lnw_ptr, wg_ptr, wu_ptr, wd_ptr, r_ptr, acc_ptr, ticket_ptr, out_ptr, eps,
                            D: tl.constexpr, I: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
                            BDA: tl.constexpr, NPROG: tl.constexpr, USE_PDL: tl.constexpr = True):
    """One wave of NPROG programs, each taking row blocks pid, pid + NPROG, ... of h and
    keeping its partial [D] row in registers across them (BDA >= D columns of the
    column-major down weight a block): one set of atomic adds a program, no tail wave."""
    pid = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dc = tl.arange(0, BDA)
    part = tl.zeros((BDA,), tl.float32)
    for blk in range(pid, I // BI, NPROG):
        rows = blk * BI + tl.arange(0, BI)
        h = _fused_gate_up(x_ptr, lnw_ptr, wg_ptr, wu_ptr, rows, eps, D, BI, BK)
        w = tl.load(wd_ptr + rows[:, None] * D + dc[None, :], mask=dc[None, :] < D, other=0.0)
        part += tl.sum(w.to(tl.float32) * h[:, None], axis=0)
    tl.atomic_add(acc_ptr + dc, part, mask=dc < D, sem="relaxed")
    _fused_finish(acc_ptr, ticket_ptr, r_ptr, out_ptr, NPROG, D, BDA)


FUSED_CONFIGS = (  # rows of h a program, warps, column-major down weight
    (16, 4, True), (16, 4, False))
ABLATIONS = {1: "no atomics (rows to scratch)", 2: "gate-up only", 3: "down only (+atomics)", 4: "first down tile early"}


def fused(d: int = 1536, inter: int = 8960, sets: int = 3, launches: int = 28) -> None:
    from tileflow.runtime import ops

    dev, bf = "cuda", torch.bfloat16
    mk = lambda *s: torch.randn(*s, device=dev, dtype=bf) / s[-1] ** 0.5  # noqa: E731
    weights = [(mk(inter, d), mk(inter, d), mk(d, inter)) for _ in range(sets)]
    column_major = [wd.t().contiguous() for _, _, wd in weights]  # [I, D]: wd's column-major storage
    x, ln_w = torch.randn(d, device=dev, dtype=bf), mk(d) + 1
    r = x  # the MLP block's residual is its input (what the suite kernel adds)
    acc = torch.zeros(d, device=dev, dtype=torch.float32)
    scratch = torch.zeros(inter // 8, d, device=dev, dtype=torch.float32)  # MODE 1: a partial row a program
    ticket = torch.zeros(1, device=dev, dtype=torch.int32)
    y = torch.empty(d, device=dev, dtype=bf)
    eps = 1e-6
    mb = (3 * inter * d) * 2 / 1e6
    print(f"a layer's MLP, {mb:.1f} MB: {mb / 4.2e3 * 1e3:.2f} us at 4.2 TB/s")

    def expected(wg, wu, wd):
        n = (x.float() * torch.rsqrt(x.float().pow(2).mean() + eps)).to(bf) * ln_w
        g, u = (wg @ n).float(), (wu @ n).float()
        return (r.float() + (wd.float() @ (torch.nn.functional.silu(g.to(bf)) * u.to(bf)).float()).to(bf).float())

    def timed(fn, label) -> tuple[float, float]:
        worst = 0.0
        for i in range(3):
            y.fill_(float("nan"))
            fn(i)
            torch.cuda.synchronize()
            ref = expected(*weights[i % sets])
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 2e-2 and not y.isnan().any(), (label, err)
            worst = max(worst, err)
        return graph_us(fn, launches), worst

    def suite_pair(i):
        wg, wu, wd = weights[i % sets]
        y.copy_(ops.matvec_residual(ops.rms_norm_gate_up_silu(x[None], ln_w, eps, wg, wu), wd, r[None])[0])

    def suite_only(i):
        wg, wu, wd = weights[i % sets]
        ops.matvec_residual(ops.rms_norm_gate_up_silu(x[None], ln_w, eps, wg, wu), wd, r[None])

    suite_pair(0)
    torch.cuda.synchronize()
    ref = expected(*weights[0])
    print(f"suite pair rel err {((y.float() - ref).norm() / ref.norm()).item():.2e}")
    print(f"{'form':<34}{'us a layer':>11}{'rel err':>10}")
    print(f"{'suite: two launches':<34}{graph_us(suite_only, launches):>11.2f}", flush=True)

    for bi, warps, cm in FUSED_CONFIGS:
        bk, bd = max(32, 2048 // bi), min(512, 8192 // bi)
        np_ = inter // bi

        def one(i):
            wg, wu, wd = weights[i % sets]
            fused_mlp_kernel[(np_,)](x, ln_w, wg, wu, column_major[i % sets] if cm else wd, r, acc, ticket, y, eps,
                                     d, inter, bi, bk, bd, cm, np_, num_warps=warps, launch_pdl=True)
        label = f"fused BI{bi} BK{bk} BD{bd} w{warps} {'cm' if cm else 'rm'}"
        us, err = timed(one, label)
        print(f"{label:<34}{us:>11.2f}{err:>10.1e}", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for bi, warps, per_sm in ((4, 8, 2), (4, 8, 4), (8, 8, 4)):
        nprog, bk = sms * per_sm, max(64, 2048 // bi)

        def one(i):
            wg, wu, _ = weights[i % sets]
            fused_mlp_stride_kernel[(nprog,)](x, ln_w, wg, wu, column_major[i % sets], r, acc, ticket, y, eps, d, inter,
                                              bi, bk, triton.next_power_of_2(d), nprog, num_warps=warps,
                                              launch_pdl=True)
        label = f"one wave {nprog} BI{bi} BK{bk} w{warps}"
        us, err = timed(one, label)
        print(f"{label:<34}{us:>11.2f}{err:>10.1e}", flush=True)
    for bi in (16,):  # where the fused launch's time goes: each stage left out in turn
        bk, bd = max(32, 2048 // bi), min(512, 8192 // bi)
        np_ = inter // bi
        for mode, what in ABLATIONS.items():
            def one(i, mode=mode):
                wg, wu, _ = weights[i % sets]
                fused_mlp_kernel[(np_,)](x, ln_w, wg, wu, column_major[i % sets], r, scratch if mode in (1, 2) else acc,
                                         ticket, y, eps, d, inter, bi, bk, bd, True, np_, MODE=mode, num_warps=4,
                                         launch_pdl=True)
            label = f"BI{bi} w4 cm: {what}"
            if mode == 4:
                us, err = timed(one, label)
                print(f"{label:<34}{us:>11.2f}{err:>10.1e}", flush=True)
            else:
                print(f"{label:<34}{graph_us(one, launches):>11.2f}", flush=True)


@triton.jit
def down_split_kernel(w_ptr, h_ptr, r_ptr, y_ptr, ws_ptr, ticket_ptr, N: tl.constexpr, K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, SP2: tl.constexpr, PDL: tl.constexpr = 1):
    pid, s = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    KS: tl.constexpr = K // SPLIT
    if PDL:  # off only under the CPU interpreter
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, KS, BLOCK_K):
        cols = s * KS + k0 + tl.arange(0, BLOCK_K)
        live = k0 + tl.arange(0, BLOCK_K) < KS
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=live[None, :], other=0.0)
        x = tl.load(h_ptr + cols, mask=live, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    part = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(y_ptr + rows, (part + tl.load(r_ptr + rows).to(tl.float32)).to(y_ptr.dtype.element_ty))
    else:
        tl.store(ws_ptr + s * N + rows, part)
        tl.debug_barrier()
        t = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel")
        if t == SPLIT - 1:
            sp = tl.arange(0, SP2)
            parts = tl.load(ws_ptr + sp[:, None] * N + rows[None, :], mask=sp[:, None] < SPLIT, other=0.0,
                            cache_modifier=".cg")
            y = tl.sum(parts, axis=0) + tl.load(r_ptr + rows).to(tl.float32)
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))
            tl.store(ticket_ptr + pid, 0)


SPLIT_CONFIGS = (  # (BLOCK_N, BLOCK_K, SPLIT, warps); K = 8960 = 2^8 x 35
    (2, 2048, 1, 8), (2, 2048, 2, 8), (2, 1024, 4, 4), (2, 2048, 4, 8), (2, 1024, 5, 4), (2, 2048, 5, 8),
    (2, 1024, 7, 4), (2, 2048, 7, 8), (2, 1024, 8, 4), (1, 2048, 4, 4), (1, 2048, 5, 4), (1, 2048, 7, 8),
    (4, 1024, 4, 8), (4, 1024, 5, 8), (4, 2048, 5, 8), (4, 512, 8, 4), (8, 512, 5, 8), (2, 512, 10, 2),
)


def split(d: int = 1536, inter: int = 8960, sets: int = 3, launches: int = 28) -> None:
    from tileflow.runtime import ops

    dev, bf = "cuda", torch.bfloat16
    mk = lambda *s: torch.randn(*s, device=dev, dtype=bf) / s[-1] ** 0.5  # noqa: E731
    weights = [(mk(inter, d), mk(inter, d), mk(d, inter)) for _ in range(sets)]
    x, ln_w, eps = torch.randn(d, device=dev, dtype=bf), mk(d) + 1, 1e-6
    h = ops.rms_norm_gate_up_silu(x[None], ln_w, eps, *weights[0][:2])
    y = torch.empty(d, device=dev, dtype=bf)
    ws = torch.zeros(16, d, device=dev, dtype=torch.float32)
    tickets = torch.zeros(d, device=dev, dtype=torch.int32)
    print(f"down {d}x{inter} ({d * inter * 2 / 1e6:.1f} MB), {torch.cuda.get_device_name()}")

    def suite_down(i, hh=h):
        y.copy_(ops.matvec_residual(hh, weights[i % sets][2], x[None])[0])

    def check(fn, label):
        for i in range(3):
            y.fill_(float("nan"))
            fn(i)
            torch.cuda.synchronize()
            ref = x.float() + weights[i % sets][2].float() @ h[0].float()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2 and not y.isnan().any(), (label, err)
        return err

    forms = {"suite matvec_residual": lambda i, hh=h: ops.matvec_residual(hh, weights[i % sets][2], x[None])}
    check(suite_down, "suite")
    for bn, bk, sp, warps in SPLIT_CONFIGS:
        def one(i, hh=h, bn=bn, bk=bk, sp=sp, warps=warps):
            down_split_kernel[(d // bn, sp)](weights[i % sets][2], hh, x, y, ws, tickets, d, inter, bn, bk, sp,
                                             triton.next_power_of_2(sp), num_warps=warps, launch_pdl=True)
        label = f"split BN{bn} BK{bk} S{sp} w{warps}"
        try:
            check(one, label)
        except AssertionError as exc:
            print(f"{label:<30} WRONG {exc}", flush=True)
            continue
        forms[label] = one
    print(f"{'form':<30}{'alone us':>10}{'after gate-up us':>18}")
    for label, fn in forms.items():
        def pair(i, fn=fn):
            wg, wu, _ = weights[i % sets]
            fn(i, ops.rms_norm_gate_up_silu(x[None], ln_w, eps, wg, wu))
        print(f"{label:<30}{graph_us(fn, launches):>10.2f}{graph_us(pair, launches):>18.2f}", flush=True)


if __name__ == "__main__":
    {"sweep": sweep, "flags": flags, "ready": ready, "fused": fused, "split": split}.get(sys.argv[1] if sys.argv[1:] else "hot", hot)()
