#!/usr/bin/env python3
"""Device time of each launch a suite kernel makes (torch.profiler), beside the vendor
path: where a multi-stage kernel's time goes. ``kernel_profile.py NAME [CASE]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_suite import Workload  # noqa: E402
from tileflow.suite import KERNELS  # noqa: E402
from tileflow.suite.registry import QWEN_1_5B  # noqa: E402


def device_times(calls, reps: int = 50) -> list[tuple[str, float, int]]:
    for c in calls:
        c()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            calls[i % len(calls)]()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            rows.append((e.key, e.device_time_total / e.count if hasattr(e, "device_time_total") else e.cuda_time, e.count))
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel")
    ap.add_argument("case", nargs="?")
    ap.add_argument("--set", nargs="*", default=[], help="param overrides NAME=INT")
    a = ap.parse_args(argv)
    k = KERNELS[a.kernel]
    for case in k.decode_cases(QWEN_1_5B):
        if a.case and case.label != a.case:
            continue
        wl = Workload(k, case, "bf16")
        params = k.params_for(case)
        params.update({kv.split("=")[0]: int(kv.split("=")[1]) for kv in a.set})
        print(f"== {a.kernel}/{case.label} params={params}")
        for name, us, n in device_times(wl.tileflow_calls(params)):
            print(f"  tileflow {us:8.2f} us  x{n:<4} {name[:90]}")
        vcalls, label = wl.vendor_calls()
        for name, us, n in device_times(vcalls):
            print(f"  vendor   {us:8.2f} us  x{n:<4} {name[:90]}")


if __name__ == "__main__":
    main()
