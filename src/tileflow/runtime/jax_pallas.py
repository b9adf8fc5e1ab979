"""Run a suite kernel's generated Pallas code on JAX arrays."""

from __future__ import annotations

from tileflow.emit.cache import load_generated
from tileflow.tile.ir import KernelIR


def pallas_launcher(ir: KernelIR):
    """The generated ``launch(*arrays, *scalars, interpret=...)`` for ``ir``."""
    return load_generated(ir, "pallas").launch


def default_interpret() -> bool:
    """Pallas runs compiled on TPU, interpreted elsewhere; ``TILEFLOW_PALLAS_INTERPRET=0``
    forces compilation (e.g. to try Mosaic GPU), ``=1`` forces the interpreter."""
    import os

    forced = os.environ.get("TILEFLOW_PALLAS_INTERPRET")
    if forced in ("0", "1"):
        return forced == "1"
    import jax

    return jax.default_backend() != "tpu"
