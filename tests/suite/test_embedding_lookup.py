"""Verification of the suite kernel `embedding_lookup` on every target and dtype."""

from tests.suite.harness import make_test

test_embedding_lookup = make_test("embedding_lookup")
