"""Verification of the fused suite kernel `attention_o_proj_residual` on every target and dtype."""

from tests.suite.harness import make_test

test_attention_o_proj_residual = make_test("attention_o_proj_residual")
