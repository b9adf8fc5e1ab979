"""Timing a captured CUDA graph: what the leaderboard, the probes and the step ceiling
measure (launches back to back, no host in between)."""

from __future__ import annotations

import statistics

import torch


def replay_us(graph: "torch.cuda.CUDAGraph", reps: int = 10) -> float:
    """Median µs of one replay of ``graph`` over ``reps`` replays, each timed by CUDA events."""
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)
