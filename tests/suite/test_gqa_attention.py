"""Verification of the suite kernel `gqa_attention` on every target and dtype."""

from tests.suite.harness import make_test

test_gqa_attention = make_test("gqa_attention")
