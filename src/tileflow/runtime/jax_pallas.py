"""Run a suite kernel's generated Pallas code on JAX arrays."""

from __future__ import annotations

from tileflow.emit.cache import load_generated
from tileflow.tile.ir import KernelIR


def pallas_launcher(ir: KernelIR):
    """The generated ``launch(*arrays, *scalars, interpret=...)`` for ``ir``."""
    return load_generated(ir, "pallas").launch


def default_interpret() -> bool:
    """Pallas runs compiled on TPU (and Mosaic GPU where it lowers); else interpreted."""
    import jax

    return jax.default_backend() not in ("tpu",)
