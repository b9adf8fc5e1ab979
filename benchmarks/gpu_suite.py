#!/usr/bin/env python3
"""The per-kernel leaderboard on a GPU, in one call.

For every suite kernel at the DeepSeek-R1-Distill-Qwen-1.5B decode shapes, in bf16:
verify the generated Triton kernel against the float64 reference, tune its launch
parameters, and time it beside the vendor path on the same tensors. Also measures
the copy bandwidth (the roofline's B) in the same run and tries the generated Pallas
kernels compiled on this GPU. Prints a table last; writes JSON (and the tuned
parameters) to ``--out`` (default ``$OUT`` or ``benchmarks/results``).

Timing: each kernel is captured ``inner`` times in a CUDA graph, cycling over enough
copies of its inputs to exceed L2 (so HBM, not the cache, is measured), and the
graph replay time is divided by the launches: a kernel's cost inside a decode graph.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tileflow.bench import versions  # noqa: E402
from tileflow.bench.roofline import copy_bandwidth_gbs  # noqa: E402
from tileflow.emit import autotune  # noqa: E402
from tileflow.runtime.torch_triton import torch_launcher  # noqa: E402
from tileflow.suite import KERNELS  # noqa: E402
from tileflow.suite.registry import QWEN_1_5B  # noqa: E402
from tileflow.verify import DTYPES, make_inputs, poisoned_outputs, verify  # noqa: E402
from graph_timing import replay_us  # noqa: E402
from rotation import rotation_sets  # noqa: E402
from vendor import vendor_call  # noqa: E402


def graph_time_us(calls: list, launches: int = 240, reps: int = 12) -> float:
    for c in calls:
        c()
    torch.cuda.synchronize()
    inner = max(1, launches // len(calls))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    us = replay_us(g, reps) / (inner * len(calls))
    del g
    return us


class Workload:
    """Rotating input sets of one kernel case (enough copies to defeat L2)."""

    def __init__(self, kernel, case, dtype: str):
        self.kernel, self.case, self.dtype = kernel, case, dtype
        ir = kernel.build(kernel.params_for(case))
        self.sets = rotation_sets(lambda i: self._one(ir, i))
        self.n_sets = len(self.sets)

    def _one(self, ir, seed):
        gen = torch.Generator().manual_seed(1000 + seed)
        tdt = DTYPES[self.dtype]
        t = make_inputs(self.kernel, ir, self.case, tdt, gen, "cuda")
        t.update(poisoned_outputs(ir, self.case, tdt, "cuda"))
        return t

    def tileflow_calls(self, params):
        ir = self.kernel.build(params)
        launch = torch_launcher(ir, "cuda", self.case.sizes)  # as the integrations launch it
        scal = [self.case.scalars[s.name] for s in ir.scalars]
        names = [v.name for v in ir.arguments]
        return [(lambda t=t: launch(*[t[n] for n in names], *scal)) for t in self.sets]

    def vendor_calls(self):
        calls, label = [], ""
        for t in self.sets:
            fn, label = vendor_call(self.kernel.name, t, self.case.scalars)
            calls.append(fn)
        return calls, label


# parameters whose effect a one-change comparison shows best: the tuned tiles with it on
TWIN_SWITCHES = ("PIPELINE",)


def _twin(params: dict, key: str, every: list[dict]) -> dict:
    """``params`` with ``key`` on: the candidate that adds it (and what it brings) to
    exactly these parameters, else ``{**params, key: 1}``."""
    for c in every:
        if c.get(key) and all(c.get(k) == v for k, v in params.items() if k != key):
            return c
    return {**params, key: 1}


def pick_candidates(kernel, case, limit: int, device: str = "") -> list[dict]:
    """The defaults, the parameters tuned before on this device (so a retune can only keep
    or beat them), their twins with each of ``TWIN_SWITCHES`` on (where the kernel has
    it: the one-change comparison an even sample could miss), and an even
    sample of the rest of the kernel's candidates."""
    base = kernel.params_for(case)
    tuned = autotune.lookup(kernel.name, case.sizes, "bf16", device) if device else None
    known = [t for t in ([{**base, **tuned}] if tuned else []) if t != base]
    every = kernel.candidates(case.sizes) if kernel.candidates else []
    for key in TWIN_SWITCHES:
        if any(key in c for c in every):
            known += [twin for t in [base] + known if not t.get(key)
                      for twin in [_twin(t, key, every)] if twin not in known and twin != base]
    if any("PIPELINE" in c for c in every):
        # PIPELINE=2 (only the first round before the wait) is no candidate of its own (a
        # third more of every list); the unpipelined default's and tuned tiles' twins try it
        known += [twin for t in [base] + known if not t.get("PIPELINE")
                  for twin in [{**t, "PIPELINE": 2}] if twin not in known]
    cands = [c for c in every if c != base and c not in known]
    room = max(0, limit - 1 - len(known))
    if len(cands) > room:
        step = len(cands) / max(room, 1)
        cands = [cands[int(i * step)] for i in range(room)]
    return [base] + known + cands


def pallas_on_gpu(timing: bool = True) -> dict:
    """The generated Pallas kernels compiled on this GPU (``pallas_gpu.py``): every test
    case verified, and timed at the decode shapes; in a subprocess so JAX's allocator
    stays out of the torch measurements."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "pallas_gpu.py")] + ([] if timing else ["--no-timing"])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
        for line in p.stdout.splitlines():
            if line.startswith("PALLAS_JSON"):
                return json.loads(line[len("PALLAS_JSON"):])
        return {"_error": (p.stderr or p.stdout)[-1500:]}
    except Exception as e:  # noqa: BLE001
        return {"_error": repr(e)}


def model_shapes(name: str) -> dict:
    """Decode sizes of a built-in config (``tileflow bench --model`` names)."""
    from tileflow.bench.models import builtin_config
    from tileflow.suite.registry import decode_shapes

    return decode_shapes(builtin_config(name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--kernels", nargs="*", default=None)
    ap.add_argument("--max-candidates", type=int, default=24)
    ap.add_argument("--no-pallas", action="store_true")
    ap.add_argument("--no-pallas-timing", action="store_true", help="verify the Pallas kernels, do not time them")
    ap.add_argument("--model", default=None,
                    help="built-in config whose decode shapes to tune (default: the 1.5B shape)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; this script measures GPUs only.")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    t0 = time.time()
    bw = copy_bandwidth_gbs(torch.device("cuda"))
    print(f"device {device}; copy bandwidth {bw:.0f} GB/s", flush=True)
    rows, tuned = [], {}
    shapes = QWEN_1_5B if args.model is None else model_shapes(args.model)
    names = args.kernels or list(KERNELS)
    for name in names:
        k = KERNELS[name]
        for case in k.decode_cases(shapes):
            row = {"kernel": name, "case": case.label, "sizes": case.sizes}
            try:
                wl = Workload(k, case, "bf16")
                default = k.params_for(case)
                v0 = verify(k, case, "bf16", "triton", default, device="cuda")
                trials_n = 0

                def time_us(params):
                    return graph_time_us(wl.tileflow_calls(params))

                best, trials = autotune.tune(pick_candidates(k, case, args.max_candidates, device), time_us)
                trials_n = len(trials)
                v1 = verify(k, case, "bf16", "triton", best, device="cuda")
                best_us = trials[0]["us"]
                default_us = next(t["us"] for t in trials if t["params"] == default)
                vcalls, vlabel = wl.vendor_calls()
                vendor_us = graph_time_us(vcalls)
                nbytes = k.min_bytes(case.sizes, 2)
                row.update(
                    ok=v0.ok and v1.ok, rel_err=max(v0.max_error, v1.max_error), detail=v0.detail or v1.detail,
                    default_us=default_us, us=best_us, params=best, trials=trials_n,
                    gbs=nbytes / best_us / 1e3, pct_bw=100 * nbytes / best_us / 1e3 / bw,
                    vendor=vlabel, vendor_us=vendor_us, vendor_gbs=nbytes / vendor_us / 1e3,
                    speedup=vendor_us / best_us, bytes=nbytes, rotation_sets=wl.n_sets,
                    errors=[t["error"] for t in trials if t["error"]][:3],
                    # the best trial with and without each switch: what one change is worth
                    # (PIPELINE also by value: 1 look-ahead loop, 2 first round only)
                    switches={key: {state: min((t["us"] for t in trials if want(t["params"].get(key, 0))
                                                and not t["error"]), default=None)
                                    for state, want in (("on", bool), ("off", lambda v: not v))
                                    + ((("1", lambda v: v == 1), ("2", lambda v: v == 2)) if key == "PIPELINE" else ())}
                              for key in TWIN_SWITCHES if any(key in t["params"] for t in trials)})
                if v1.ok:  # a winner that fails verification is never what a later step uses
                    autotune.record(name, case.sizes, "bf16", device, best, best_us, path=out / "autotune.json")
                    tuned[f"{name}/{case.label}"] = best
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, detail=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
            print(json.dumps({k_: row.get(k_) for k_ in ("kernel", "case", "ok", "rel_err", "us", "gbs",
                                                         "vendor_us", "switches", "detail")}), flush=True)
            torch.cuda.empty_cache()
    pallas = {} if args.no_pallas else pallas_on_gpu(timing=not args.no_pallas_timing)
    record = {
        "what": "per-kernel leaderboard, bf16, DeepSeek-R1-Distill-Qwen-1.5B decode shapes",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "versions": versions(), "commit": os.environ.get("TILEFLOW_COMMIT", "unknown"),
        "copy_bandwidth_gbs": bw, "timing": "CUDA-graph replay, inputs rotated past L2, median of 12",
        "rows": rows, "pallas_compiled_on_gpu": pallas, "seconds": time.time() - t0,
    }
    stamp = dt.date.today().isoformat()
    slug = device.replace(" ", "-").replace("/", "-")
    path = out / f"{stamp}-{slug}-kernels.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print()
    print(f"{'kernel':<22}{'case':<9}{'ok':<4}{'rel_err':>9}{'us':>8}{'GB/s':>7}{'%B':>5}"
          f"{'vendor_us':>10}{'v.GB/s':>7}{'x':>6}")
    for r in rows:
        if "us" not in r:
            print(f"{r['kernel']:<22}{r['case']:<9}ERR {r.get('detail', '')[:80]}")
            continue
        print(f"{r['kernel']:<22}{r['case']:<9}{'ok' if r['ok'] else 'NO':<4}{r['rel_err']:>9.1e}{r['us']:>8.2f}"
              f"{r['gbs']:>7.0f}{r['pct_bw']:>5.0f}{r['vendor_us']:>10.2f}{r['vendor_gbs']:>7.0f}{r['speedup']:>6.2f}")
    for name, cases in pallas.get("timed", {}).items():
        for label, r in cases.items():
            if "us" in r:
                print(f"{name:<22}{label:<9}{'ok' if r['ok'] else 'NO':<4}{r['rel_err']:>9.1e}{r['us']:>8.2f}"
                      f"{r['gbs']:>7.0f}{100 * r['gbs'] / bw:>5.0f}  (Pallas, compiled by JAX)")
            else:
                print(f"{name:<22}{label:<9}ERR {r.get('error', '')[:80]}  (Pallas)")
    ok_p = sum(1 for v in pallas.get("checked", {}).values() if isinstance(v, dict) and v.get("ok"))
    pallas_line = "not run (--no-pallas)" if args.no_pallas else f"{ok_p}/{len(pallas.get('checked', {}))} correct on every test case"
    print(f"pallas compiled on this GPU: {pallas_line}; copy bandwidth {bw:.0f} GB/s; "
          f"{time.time() - t0:.0f}s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
