"""Verification of the fused decode kernel `rms_norm_matvec` on every target and dtype."""

from tests.suite.harness import make_test

test_rms_norm_matvec = make_test("rms_norm_matvec")
