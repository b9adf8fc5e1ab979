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

    python benchmarks/matvec_probe.py [hot|sweep]
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl


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
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            run(i)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / launches)
    return sorted(times)[len(times) // 2]


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


if __name__ == "__main__":
    (sweep if sys.argv[1:2] == ["sweep"] else hot)()
