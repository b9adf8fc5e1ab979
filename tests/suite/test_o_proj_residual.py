"""Verification of the suite kernel `o_proj_residual` on every target and dtype."""

from tests.suite.harness import make_test

test_o_proj_residual = make_test("o_proj_residual")
