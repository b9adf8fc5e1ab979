"""Verification of the fused decode kernel `rms_norm_gate_up_silu` on every target and dtype."""

from tests.suite.harness import make_test

test_rms_norm_gate_up_silu = make_test("rms_norm_gate_up_silu")
