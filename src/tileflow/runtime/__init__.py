"""Launching generated kernels: from torch (Triton), from JAX (Pallas), or the reference."""
