"""Pattern ``matvec``: a decode-time ``nn.Linear``, ``y = x @ W.T (+ b)``.

Replaced by the suite kernel ``matvec`` when, exactly:
- ``x`` has one row (decode; prefill's many rows stay with the library GEMM), or, in
  the torch backend, the B x R rows of a step whose attention its dynamo pass matched
  (B sequences, R new tokens each; the kernel reads each weight tile once for them),
- ``W`` is a 2-D [N, K] tensor used transposed (the ``nn.Linear`` layout), ``b`` is
  1-D [N] or absent, and there is no alpha/beta scaling,
- the dtypes of ``x``, ``W`` (and ``b``) are one of bf16 / fp16 / fp32, all equal.
"""

NAME = "matvec"
SUITE_KERNEL = "matvec"
DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")
MAX_ROWS = 1  # without a matched attention (and in the JAX rewrite)
