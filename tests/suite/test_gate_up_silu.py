"""Verification of the suite kernel `gate_up_silu` on every target and dtype."""

from tests.suite.harness import make_test

test_gate_up_silu = make_test("gate_up_silu")
