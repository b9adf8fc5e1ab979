"""Pattern ``rms_norm``: ``w * x / sqrt(mean(x^2, -1) + eps)``, transformers' RMSNorm.

Replaced by the suite kernel ``rms_norm`` (ONNX: ``SimplifiedLayerNormalization`` /
``RMSNormalization``) when, exactly:
- the reduction is a mean over the last axis only, and the normalized value is
  ``x * reciprocal(sqrt(var + eps))`` with ``eps`` a constant scalar (kept as is),
- ``w`` is a constant 1-D tensor whose length is ``x``'s last dimension,
- ``x`` and ``w`` are float32 (half-precision models compute the norm in fp32 through
  casts; those forms are not claimed by this pattern).
"""

NAME = "rms_norm"
SUITE_KERNEL = "rms_norm"
