"""Verification of the suite kernel `silu_mul` on every target and dtype."""

from tests.suite.harness import make_test

test_silu_mul = make_test("silu_mul")
