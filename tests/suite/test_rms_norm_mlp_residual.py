"""Verification of the fused decode kernel `rms_norm_mlp_residual` (Triton and the
reference; its atomics have no Pallas form) on every dtype."""

from tests.suite.harness import make_test

test_rms_norm_mlp_residual = make_test("rms_norm_mlp_residual")
