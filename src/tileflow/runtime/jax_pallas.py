"""Run a suite kernel's generated Pallas code on JAX arrays."""

from __future__ import annotations

import functools

from tileflow import settings
from tileflow.emit.cache import load_generated
from tileflow.tile.ir import KernelIR


def pallas_launcher(ir: KernelIR):
    """The generated ``launch(*arrays, *scalars, interpret=...)`` for ``ir``; the option
    ``pallas_masked_stores`` ("1" / "0") fixes how it stores partial blocks (else the
    generated default: masked stores compiled on a GPU)."""
    launch = load_generated(ir, "pallas").launch
    forced = settings.ENVIRONMENT.pallas_masked_stores
    return launch if forced == "auto" else functools.partial(launch, masked_stores=forced == "1")


def default_interpret() -> bool:
    """Pallas runs compiled on TPU, interpreted elsewhere; the option ``pallas_interpret``
    ("0" forces compilation, e.g. to try Mosaic GPU; "1" the interpreter) overrides."""
    forced = settings.ENVIRONMENT.pallas_interpret
    if forced != "auto":
        return forced == "1"
    import jax

    return jax.default_backend() != "tpu"
