"""Verification of the suite kernel `matvec_pair` on every target and dtype."""

from tests.suite.harness import make_test

test_matvec_pair = make_test("matvec_pair")
