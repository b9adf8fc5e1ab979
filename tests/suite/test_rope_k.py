"""Verification of the suite kernel `rope_k` on every target and dtype."""

from tests.suite.harness import make_test

test_rope_k = make_test("rope_k")
