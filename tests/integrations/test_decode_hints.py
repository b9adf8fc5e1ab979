"""The decode step's launch hints, which change when memory is read, never what is
computed. Early inputs (the option ``early_inputs``, on by default): the step vouches that
the positions, lengths and residual of qkv, attention and o come from before the kernel
just ahead, so those kernels load them before the dependent-launch wait. On CPU the
generated Triton text runs under the interpreter (the hints are GPU-only branches): the
tokens must equal eager's either way. (The L2 look-ahead, MLP look-ahead, ready-counter
and fused-MLP variants measured slower and were removed: docs/decisions.md.)"""

import pytest
import torch

import tileflow
from tileflow.runtime import ops

from .test_transformers_patch import greedy, prompt, tiny


@pytest.fixture
def interpreted(tileflow_options):
    tileflow_options(cpu_target="triton")
    ops._LAUNCHERS.clear()
    yield
    ops._LAUNCHERS.clear()


def _patched_equals_eager(model) -> None:
    """Greedy tokens of the patched model equal eager's (the spies see only the patch)."""
    ids = prompt()
    expected = greedy(model, ids)
    tileflow.patch(model)
    got = greedy(model, ids)
    tileflow.unpatch(model)
    assert torch.equal(got, expected)


def test_the_step_vouches_for_early_inputs_unless_told_not_to(interpreted, tileflow_options, monkeypatch):
    calls = []
    for name in ("qkv_rope_cache", "gqa_attention", "matvec_residual"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: calls.append((_n, k.get("early")))
                            or _r(*a, **k))
    model = tiny("llama")
    # the default (early) on the generated kernels; turned off, the flag's path is what
    # is checked, on the reference (a second interpreted decode adds ~60 s and no check)
    for want, target in ((True, "triton"), (False, "reference")):
        tileflow_options(early_inputs=want, cpu_target=target)
        ops._LAUNCHERS.clear()
        calls.clear()
        _patched_equals_eager(model)
        assert {n for n, _ in calls} == {"qkv_rope_cache", "gqa_attention", "matvec_residual"}
        residual = [e for n, e in calls if n == "matvec_residual"]  # o_proj, down_proj, o_proj, ...
        assert all(e is want for n, e in calls if n != "matvec_residual"), (want, calls[:4])
        assert all(e is want for e in residual[0::2]) and all(e is None for e in residual[1::2]), residual
