"""Verification of the suite kernel `q_proj_matvec` on every target and dtype."""

from tests.suite.harness import make_test

test_q_proj_matvec = make_test("q_proj_matvec")
