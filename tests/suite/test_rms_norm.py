"""Verification of the suite kernel `rms_norm` on every target and dtype."""

from tests.suite.harness import make_test

test_rms_norm = make_test("rms_norm")
