"""Verification of the suite kernel `residual_add` on every target and dtype."""

from tests.suite.harness import make_test

test_residual_add = make_test("residual_add")
