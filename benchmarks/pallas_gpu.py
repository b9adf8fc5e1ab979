#!/usr/bin/env python3
"""The generated Pallas kernels compiled on this machine's GPU: every test case
verified against the float64 reference, then each kernel timed at the
DeepSeek-R1-Distill-Qwen-1.5B decode shapes. ``gpu_suite.py`` runs this in a
subprocess (JAX's allocator stays out of the torch measurements) and reads the
``PALLAS_JSON`` line it prints.

Timing: one jit calls the kernel on enough input sets to exceed L2, so a call's
dispatch is shared by all of them; median of ``reps`` over the sets. Launch
parameters are those ``tileflow.jax`` uses (block sizes that divide the weight
dimensions: a padded weight would be a copy on every call). In-place views (KV
caches) are not donated here, so kernels that write the cache also pay its copy.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rotation import rotation_sets  # noqa: E402


def check_test_cases(kernels: dict) -> dict:
    """name -> {ok, rel_err, cases, detail}: every test case, bf16."""
    from tileflow.verify import verify

    res = {}
    for name, k in kernels.items():
        try:  # every test case: odd shapes and padded head groups are where GPU programs collide
            rs = [verify(k, case, "bf16", "pallas") for case in k.test_cases if case.runs_on("pallas")]
            if not rs:  # Triton only (atomics): nothing for Pallas to check
                continue
            bad = [r for r in rs if not r.ok]
            res[name] = {"ok": not bad, "rel_err": max(r.max_error for r in rs), "cases": len(rs),
                         "detail": "; ".join(f"{r.case}: {r.detail}" for r in bad)}
        except Exception as e:  # noqa: BLE001 - one kernel's failure is reported, the rest still run
            res[name] = {"ok": False, "error": (type(e).__name__ + ": " + str(e).splitlines()[0])[:300]}
    return res


def time_cases(kernels: dict, cases_of: Callable, interpret: bool = False, reps: int = 10,
               max_sets: int = 48) -> dict:
    """name -> {case label -> {ok, rel_err, us, gbs, sets}} for the cases ``cases_of(kernel)``."""
    import jax
    import torch

    from tileflow.integrations.jax.primitives import launch_params
    from tileflow.runtime.jax_pallas import pallas_launcher
    from tileflow.verify import _to_jax, make_inputs, poisoned_outputs, verify

    out: dict = {}
    for name, k in kernels.items():
        for case in (c for c in cases_of(k) if c.runs_on("pallas")):
            row: dict = {}
            try:
                params = launch_params(name, tuple(sorted(case.sizes.items())))
                v = verify(k, case, "bf16", "pallas", params)
                ir = k.build(params)
                launch = pallas_launcher(ir)
                gen = torch.Generator().manual_seed(7)
                sets = [[_to_jax(t[v_.name]) for v_ in ir.arguments] for t in rotation_sets(
                    lambda i: {**make_inputs(k, ir, case, torch.bfloat16, gen),
                               **poisoned_outputs(ir, case, torch.bfloat16)}, max_sets)]
                n_sets = len(sets)
                scal = [case.scalars[s.name] for s in ir.scalars]
                run_all = jax.jit(lambda sets: [launch(*a, *scal, interpret=interpret) for a in sets])
                jax.block_until_ready(run_all(sets))  # compiles
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(run_all(sets))
                    times.append((time.perf_counter() - t0) * 1e6 / n_sets)
                us = statistics.median(times)
                row = {"ok": v.ok, "rel_err": v.max_error, "detail": v.detail, "us": us,
                       "gbs": k.min_bytes(case.sizes, 2) / us / 1e3, "sets": n_sets, "params": params}
            except Exception as e:  # noqa: BLE001
                row = {"ok": False, "error": (type(e).__name__ + ": " + str(e).splitlines()[0])[:300]}
            out.setdefault(name, {})[case.label] = row
    return out


def main(argv: Optional[list] = None) -> int:
    os.environ.setdefault("TILEFLOW_PALLAS_INTERPRET", "0")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import tileflow.integrations  # noqa: F401
    except ImportError:  # a source checkout that is not pip-installed (the GPU machine)
        from run_cli_uninstalled import map_source_packages

        map_source_packages()
    from tileflow.suite import KERNELS
    from tileflow.suite.registry import QWEN_1_5B

    argv = sys.argv[1:] if argv is None else argv
    res = {"checked": check_test_cases(KERNELS)}
    if "--no-timing" not in argv:
        res["timed"] = time_cases(KERNELS, lambda k: k.decode_cases(QWEN_1_5B))
    print("PALLAS_JSON" + json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
