"""Verification of the suite kernel `down_proj_residual` on every target and dtype."""

from tests.suite.harness import make_test

test_down_proj_residual = make_test("down_proj_residual")
