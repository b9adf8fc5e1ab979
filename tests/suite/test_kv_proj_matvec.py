"""Verification of the suite kernel `kv_proj_matvec` on every target and dtype."""

from tests.suite.harness import make_test

test_kv_proj_matvec = make_test("kv_proj_matvec")
