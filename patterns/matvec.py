"""Pattern ``matvec``: a decode-time ``nn.Linear``, ``y = x @ W.T (+ b)``.

Replaced by the suite kernel ``matvec`` when, exactly:
- ``x`` has one row (decode; prefill's many rows stay with the library GEMM),
- ``W`` is a 2-D [N, K] tensor used transposed (the ``nn.Linear`` layout), ``b`` is
  1-D [N] or absent, and there is no alpha/beta scaling,
- the dtypes of ``x``, ``W`` (and ``b``) are one of bf16 / fp16 / fp32, all equal.
"""

NAME = "matvec"
SUITE_KERNEL = "matvec"
DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")
MAX_ROWS = 1
