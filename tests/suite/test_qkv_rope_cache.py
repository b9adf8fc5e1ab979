"""Verification of the fused decode kernel `qkv_rope_cache` on every target and dtype."""

from tests.suite.harness import make_test

test_qkv_rope_cache = make_test("qkv_rope_cache")
