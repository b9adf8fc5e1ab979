"""Per-stage device time of one suite kernel at a decode case, for several parameter
sets side by side (the leaderboard times whole launches; this says which stage of a
multi-stage kernel the time goes to). GPU only.

    python benchmarks/stage_profile.py gqa_attention ctx384 \
        --set SPLITS=4,SPLITS_BLOCK=4 --set SPLITS=16,SPLITS_BLOCK=16

Each set: the whole launch's time inside a CUDA graph (as gpu_suite times it, rotating
input copies), then each stage kernel's mean duration from torch.profiler over 50
plain launches.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_suite import Workload, graph_time_us  # noqa: E402
from tileflow.suite import KERNELS  # noqa: E402
from tileflow.suite.registry import QWEN_1_5B  # noqa: E402


def parse_set(text: str) -> dict:
    """``"A=1,B=2"`` -> {"A": 1, "B": 2}."""
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def stage_times(calls: list, rounds: int = 50) -> dict[str, float]:
    """Mean device µs per kernel name over ``rounds`` launches of the first call."""
    for _ in range(3):
        calls[0]()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            calls[0]()
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time
            count[ev.name] += 1
    return {n: total[n] / count[n] for n in total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel")
    ap.add_argument("case", help="a decode case label at the 1.5B shape, e.g. ctx384")
    ap.add_argument("--set", action="append", default=[], help="parameter overrides, A=1,B=2 (repeatable)")
    args = ap.parse_args()
    kernel = KERNELS[args.kernel]
    case = next(c for c in kernel.decode_cases(QWEN_1_5B) if c.label == args.case)
    wl = Workload(kernel, case, "bf16")
    base = kernel.params_for(case)
    for text in [""] + args.set:
        params = {**base, **parse_set(text), **kernel.structural_sizes(case.sizes)}
        calls = wl.tileflow_calls(params)
        whole = graph_time_us(calls)
        stages = stage_times(calls)
        print(f"{text or 'defaults':<40} graph {whole:8.2f} us | "
              + " | ".join(f"{n.split(kernel.name + '_')[-1]} {us:.2f}" for n, us in sorted(stages.items())), flush=True)


if __name__ == "__main__":
    main()
