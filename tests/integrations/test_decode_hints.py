"""The decode step's launch hints, which change when memory is read, never what is
computed. Early inputs (the option ``early_inputs``, on by default): the step vouches that
the positions, lengths and residual of qkv, attention and o come from before the kernel
just ahead, so those kernels load them before the dependent-launch wait. On CPU the
generated Triton text runs under the interpreter (the hints are GPU-only branches): the
tokens must equal eager's either way. Launch at start (the option ``launch_at_start``):
the launches it names let the next one in at their programs' start, and the launch after
one of them loads no early inputs (``launch_plan``'s rule). (The L2 look-ahead, MLP look-ahead, ready-counter
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


# ------------------------------------------------- launch at start (option launch_at_start)


def test_the_launch_after_one_that_launches_at_start_loads_no_early_inputs():
    """The rule: a launch let in at its predecessor's start may start before the launch ahead
    of that predecessor is complete, so it loads only weights before its wait."""
    from tileflow.integrations.transformers.decode_step import LaunchPlan, launch_plan

    plan = launch_plan(frozenset(), True)  # today's step
    assert plan.early == {"qkv", "attention", "o"} and not plan.at_start and not plan.refused
    plan = launch_plan(frozenset({"qkv", "attention", "o"}), True)  # the study's first arm
    assert plan.early == {"qkv"} and [r for r, _ in plan.refused] == ["attention", "o"]
    assert "follows qkv, which lets it in at its programs' start" in plan.refused[0][1]
    assert plan.notes()[1].startswith("decode step: o loads no early inputs: it follows attention")
    plan = launch_plan(frozenset(tileflow.settings.STEP_LAUNCHES), True)  # everywhere
    assert plan.early == set() and [r for r, _ in plan.refused] == ["qkv", "attention", "o"]
    assert "follows embedding / down" in plan.refused[0][1]
    assert launch_plan(frozenset({"down"}), True).early == {"attention", "o"}  # qkv follows down
    assert launch_plan(frozenset({"gate_up", "lm_head"}), True).early == {"qkv", "attention", "o"}
    assert launch_plan(frozenset({"qkv"}), False).refused == ()  # nothing early to turn off
    with pytest.raises(ValueError, match="o may not load early inputs after attention"):
        LaunchPlan(frozenset({"attention"}), frozenset({"o"}))
    with pytest.raises(ValueError, match="unknown launch"):
        launch_plan(frozenset({"mlp"}), True)


def test_the_option_names_the_launches(tileflow_options):
    from tileflow import settings

    assert settings.launch_set("0") == frozenset() and settings.launch_set("1") == set(settings.STEP_LAUNCHES)
    assert settings.launch_set("qkv, attention,o") == {"qkv", "attention", "o"}
    with pytest.raises(ValueError, match="option launch_at_start='mlp': expected 0, 1 or a comma list of"):
        settings.resolve({"launch_at_start": "mlp"})


@pytest.mark.parametrize("option,at_start,early", [
    ("0", set(), {"qkv", "attention", "o"}),
    ("qkv,attention,o", {"qkv", "attention", "o"}, {"qkv"}),
    ("1", {"embedding", "qkv", "attention", "o", "gate_up", "down", "lm_head"}, set()),
])
def test_the_step_launches_at_start_as_told(option, at_start, early, tileflow_options, monkeypatch):
    """Each launch of the step gets ``at_start`` as the option names it and ``early`` as the
    rule leaves it; the patch report says which early inputs went and why; the tokens are
    eager's (the reference path: the flags' text is checked in tests/emit)."""
    roles = {"embedding_lookup": ["embedding"], "qkv_rope_cache": ["qkv"], "gqa_attention": ["attention"],
             "rms_norm_gate_up_silu": ["gate_up"], "matvec_residual": ["o", "down"], "rms_norm_matvec": ["lm_head"]}
    calls = []
    for name in roles:
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: calls.append(
            (_n, k.get("at_start", False), k.get("early", False))) or _r(*a, **k))
    tileflow_options(launch_at_start=option, cpu_target="reference")
    ops._LAUNCHERS.clear()
    model = tiny("qwen2")
    ids = prompt()
    expected = greedy(model, ids)
    report = tileflow.patch(model)
    got = greedy(model, ids)
    tileflow.unpatch(model)
    assert torch.equal(got, expected)
    seen = {}
    residual = 0
    for name, start, e in calls:  # o_proj, down_proj, o_proj, ...
        role = roles[name][residual % 2] if name == "matvec_residual" else roles[name][0]
        residual += name == "matvec_residual"
        seen.setdefault(role, set()).add((start, e))
    assert set(seen) == set(tileflow.settings.STEP_LAUNCHES), seen
    for role, flags in seen.items():
        assert flags == {(role in at_start, role in early)}, (role, flags)
    notes = [n for n in report.notes if "early inputs" in n]
    assert sorted(n.split(":")[1].split()[0] for n in notes) == sorted({"qkv", "attention", "o"} - early)


def test_a_launch_at_start_runs_through_the_generated_launcher(interpreted):
    """ops with ``at_start`` on the Triton target: the launcher is built with the parameter
    (and the shipped tiles: the flag is no part of the tune key), the result as without."""
    g = torch.Generator().manual_seed(0)
    x, w, r = (torch.randn(s, generator=g) for s in ((1, 40), (24, 40), (1, 24)))
    plain = ops.matvec_residual(x, w, r, early=True)
    got = ops.matvec_residual(x, w, r, early=True, at_start=True)
    assert torch.allclose(got, plain, rtol=1e-5, atol=1e-5) and torch.allclose(plain, x @ w.T + r, atol=1e-4)
    flags = [dict(sizes) for name, sizes, *_ in ops._LAUNCHERS if name == "matvec_residual"]
    assert sorted(f.get("LAUNCH_AT_START", 0) for f in flags) == [0, 1]
