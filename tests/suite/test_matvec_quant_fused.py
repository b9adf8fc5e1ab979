"""The fused forms of the low-precision matvecs (``tileflow.suite.matvec_quant_fused``) against
their references: RMSNorm, then dequantize-and-matmul (int4) or ``matvec_fp8``'s per-group
quantization of the normed row (fp8), then the epilogue (SiLU(gate) * up, the residual; q/k/v
rotated, K and V written into the caches). Every case x target x dtype through the suite harness, as the plain kernels
(tests/suite/test_matvec_quant.py): fresh inputs, NaN-poisoned outputs, float64 reference."""

from tests.suite.harness import make_test

test_rms_norm_gate_up_silu_int4 = make_test("rms_norm_gate_up_silu_int4")
test_matvec_residual_int4 = make_test("matvec_residual_int4")
test_rms_norm_qkv_rope_cache_int4 = make_test("rms_norm_qkv_rope_cache_int4")
test_rms_norm_gate_up_silu_fp8 = make_test("rms_norm_gate_up_silu_fp8")
test_matvec_residual_fp8 = make_test("matvec_residual_fp8")
test_rms_norm_qkv_rope_cache_fp8 = make_test("rms_norm_qkv_rope_cache_fp8")
