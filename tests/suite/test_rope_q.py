"""Verification of the suite kernel `rope_q` on every target and dtype."""

from tests.suite.harness import make_test

test_rope_q = make_test("rope_q")
