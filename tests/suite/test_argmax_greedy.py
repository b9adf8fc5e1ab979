"""Verification of the suite kernel `argmax_greedy` on every target and dtype."""

from tests.suite.harness import make_test

test_argmax_greedy = make_test("argmax_greedy")
