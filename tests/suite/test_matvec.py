"""Verification of the suite kernel `matvec` on every target and dtype."""

from tests.suite.harness import make_test

test_matvec = make_test("matvec")
