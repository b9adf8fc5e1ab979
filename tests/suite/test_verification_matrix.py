"""What the default run verifies (``tileflow.verify.verification_matrix``, used by the
suite tests and ``tileflow verify``) against the full sweep (``--full``): a subset that
still checks every kernel x target x dtype and every test case x target at least once,
and a real cut of the sweep (docs/testing.md)."""

import pytest

from tileflow.suite import KERNELS
from tileflow.suite.registry import TARGETS
from tileflow.verify import DTYPES, verification_matrix


def _keys(jobs):
    return [(case.label, target, dtype) for case, target, dtype in jobs]


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_the_default_set_covers_every_target_dtype_and_case(name):
    kernel = KERNELS[name]
    labels = [c.label for c in kernel.test_cases]
    assert len(set(labels)) == len(labels), f"{name}: test case labels repeat (the suite's test ids would)"
    full, default = _keys(verification_matrix(kernel, full=True)), _keys(verification_matrix(kernel))
    assert len(set(full)) == len(full) and len(set(default)) == len(default)
    assert set(default) <= set(full)
    assert default == [k for k in full if k in set(default)], "the default set keeps the sweep's order"
    assert {(t, d) for _, t, d in full} == {(t, d) for _, t, d in default}
    assert {(c, t) for c, t, _ in full} == {(c, t) for c, t, _ in default}
    assert {(t, d) for _, t, d in default} == {(t, d) for t in TARGETS for d in DTYPES}, name
    if len(full) > 3 * len(TARGETS) * len(DTYPES):
        assert len(default) <= len(full) // 2, (name, len(default), len(full))


def test_a_case_restricted_to_some_dtypes_keeps_them():
    kernel = KERNELS["rope_q"]
    far = next(c for c in kernel.test_cases if c.dtypes)
    for case, _, dtype in verification_matrix(kernel) + verification_matrix(kernel, full=True):
        if case is far:
            assert dtype in far.dtypes


def test_asked_targets_and_dtypes_narrow_both_sets():
    kernel = KERNELS["gqa_attention"]
    for full in (False, True):
        jobs = verification_matrix(kernel, ("pallas",), ("fp32",), full=full)
        assert {(t, d) for _, t, d in jobs} == {("pallas", "fp32")}
        assert [c.label for c, _, _ in jobs] == [c.label for c in kernel.test_cases if c.runs_on("pallas")]
    # one dtype asked: the rotation does not leave a case out
    assert len(verification_matrix(kernel, ("triton",), ("bf16",))) == len(kernel.test_cases)


def test_the_command_checks_the_default_set_or_with_full_the_sweep(capsys):
    from tileflow.cli import main

    kernel = KERNELS["rms_norm"]
    counts = {}
    for flags in ([], ["--full"]):
        assert main(["verify", "rms_norm", "--targets", "reference", *flags]) == 0
        out = capsys.readouterr().out
        assert "0 failed" in out
        counts[bool(flags)] = sum(1 for line in out.splitlines() if line.strip("│ ").startswith("rms_norm"))
    assert counts[False] == len(verification_matrix(kernel, ("reference",)))
    assert counts[True] == len(verification_matrix(kernel, ("reference",), full=True)) == 3 * len(kernel.test_cases)
    assert counts[False] < counts[True]
