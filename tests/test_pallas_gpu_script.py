"""benchmarks/pallas_gpu.py (the Pallas part of the GPU leaderboard) on this machine,
under the Pallas interpreter on test shapes: the code path the GPU run takes, with
results that must verify (timings here mean nothing)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pallas_gpu  # noqa: E402

from tileflow.suite import KERNELS  # noqa: E402


def test_checks_and_times_every_case(tileflow_options):
    tileflow_options(pallas_interpret="1")
    some = {n: KERNELS[n] for n in ("matvec_residual", "gqa_attention")}
    checked = pallas_gpu.check_test_cases(some)
    assert set(checked) == set(some) and all(v["ok"] for v in checked.values()), checked
    timed = pallas_gpu.time_cases(some, lambda k: k.test_cases[:2], interpret=True, reps=2, max_sets=2)
    for name, cases in timed.items():
        assert len(cases) == 2
        for label, r in cases.items():
            assert r.get("ok") and r["us"] > 0 and r["gbs"] > 0 and r["sets"] >= 1, (name, label, r)
