"""Verification of the suite kernel `matvec_residual` on every target and dtype."""

from tests.suite.harness import make_test

test_matvec_residual = make_test("matvec_residual")
