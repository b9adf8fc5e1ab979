"""Pattern ``residual_rms_norm``: ``s = a + b; y = rms_norm(s)`` where ``s`` is also the
residual stream carried on. Replaced by one pass that returns both ``y`` and ``s``
(ONNX Runtime: ``com.microsoft.SkipSimplifiedLayerNormalization``, outputs 0 and 3)
when the ``rms_norm`` conditions hold for ``s`` and ``a`` and ``b`` have one shape
(no broadcasting), rank 3, and one dtype."""

NAME = "residual_rms_norm"
SUITE_KERNEL = "rms_norm"
