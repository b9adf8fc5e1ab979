"""Verification of the suite kernel `mlp_gate_up_silu` on every target and dtype."""

from tests.suite.harness import make_test

test_mlp_gate_up_silu = make_test("mlp_gate_up_silu")
