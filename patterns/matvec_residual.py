"""Pattern ``matvec_residual``: ``r + x @ W.T``, the output / down projection feeding a
residual add. Replaced by ``matvec_residual`` (one pass over the hidden state) when
the ``matvec`` conditions hold, the product has no bias, and ``r`` has the product's
shape and dtype; the add then disappears into the kernel's epilogue."""

NAME = "matvec_residual"
SUITE_KERNEL = "matvec_residual"
