"""Verification of the suite kernel `silu_mul_fused` on every target and dtype."""

from tests.suite.harness import make_test

test_silu_mul_fused = make_test("silu_mul_fused")
