#!/usr/bin/env python3
"""Several rows a step through the matvec family, per kernel, on a GPU: the cost of M
rows against one, for each way a program can hold them.

At the 1.5B decode shapes (bf16), for M in 1..16 rows: ``sum`` (each program's
[BLOCK_M, BLOCK_N, BLOCK_K] products reduced on the CUDA cores, the earlier default),
``dot`` (the default: the rows' products on tensor cores, ``rows_params``), and the best
of a sample of the dot candidates. Every arm verified against the float64 reference
first; times as ``gpu_suite`` takes them (a CUDA graph over input copies past L2).
Writes ``rows-probe.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_suite import Workload, graph_time_us  # noqa: E402
from tileflow.bench.roofline import copy_bandwidth_gbs  # noqa: E402
from tileflow.suite import KERNELS  # noqa: E402
from tileflow.suite.matvec_family import block_m, matvec_params  # noqa: E402
from tileflow.suite.registry import QWEN_1_5B, Case, next_pow2  # noqa: E402
from tileflow.verify import verify  # noqa: E402

# (kernel, decode case label): the layer's weight streams and the lm_head
SHAPES = (("rms_norm_gate_up_silu", None), ("matvec_residual", None), ("rms_norm_matvec", None), ("matvec", "q"))


def sum_params(n: int, k_: int, m: int, **extra) -> dict:
    """The many-rows tiles before the dot form (products reduced on the CUDA cores)."""
    many = n >= 8192
    block_n = 16 if n > 65536 else 2
    if many:
        block_k = min(next_pow2(k_), 512 if block_n <= 2 else 256)
    else:
        block_k = min(2048, next_pow2(k_), max(256, 4096 // block_n))
    block_k = min(block_k, max(64, 16384 // (block_n * block_m(m))))
    return matvec_params(n, k_, block_n, block_k, 1, 4 if many else 8, m=m, **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--candidates", type=int, default=10, help="dot candidates sampled per shape")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("rows_probe: no CUDA device here; this script measures GPUs only.")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s", flush=True)
    rows = []
    for name, label in SHAPES:
        kernel = KERNELS[name]
        base = next(c for c in kernel.decode_cases(QWEN_1_5B) if label in (None, c.label))
        one_us = None
        for m in args.rows:
            case = Case(f"{base.label}-m{m}", {**base.sizes, "M": m}, base.scalars)
            default = kernel.params_for(case)
            extra = {k: v for k, v in default.items() if k in ("HAS_BIAS", "EARLY_INPUTS")}
            arms = {"default": default}
            if m > 1:
                arms["sum"] = sum_params(case.sizes["N"], case.sizes["K"], m, **extra)
                every = kernel.candidates(case.sizes)
                step = max(1, len(every) // max(1, args.candidates))
                arms.update({f"cand{i}": c for i, c in enumerate(every[::step][:args.candidates])})
            wl = Workload(kernel, case, "bf16")
            got = {}
            for arm, params in arms.items():
                try:
                    v = verify(kernel, case, "bf16", "triton", params, device="cuda")
                    us = graph_time_us(wl.tileflow_calls(params))
                    got[arm] = dict(us=us, ok=v.ok, err=v.max_error, params=params)
                except Exception as exc:  # a candidate the compiler refuses: recorded, not fatal
                    got[arm] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}", params=params)
            if m == 1:
                one_us = got["default"].get("us")
            timed = {a: r for a, r in got.items() if "us" in r and r["ok"]}
            best = min(timed, key=lambda a: timed[a]["us"]) if timed else None
            nbytes = kernel.min_bytes(case.sizes, 2)
            row = dict(kernel=name, case=case.label, M=m, arms=got, best=best, one_row_us=one_us)
            rows.append(row)
            line = "  ".join(f"{a} {r['us']:.2f}{'' if r['ok'] else '!'}" for a, r in got.items()
                             if "us" in r and a in ("default", "sum"))
            if best:
                line += f"  best {best} {timed[best]['us']:.2f} us ({100 * nbytes / timed[best]['us'] / 1e3 / bw:.0f}% B)"
            print(f"{name:22s} M={m:2d}  {line}", flush=True)
            (out / "rows-probe.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                 copy_gbs=bw, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
