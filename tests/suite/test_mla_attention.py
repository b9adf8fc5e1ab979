"""Verification of the suite kernel `mla_attention` on every target and dtype, and of its
reference against transformers' own DeepseekV3 attention layer."""

import tileflow.suite.mla_attention  # noqa: F401  registers
from tests.suite.harness import make_test

test_mla_attention = make_test("mla_attention")
