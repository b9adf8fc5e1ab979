"""Verification of the suite kernel `attention_decode_gqa` on every target and dtype."""

from tests.suite.harness import make_test

test_attention_decode_gqa = make_test("attention_decode_gqa")
