"""Emitters: tile IR -> Triton source, -> Pallas source; the compile cache."""

from tileflow.emit.pallas import emit_pallas  # noqa: F401
from tileflow.emit.triton import emit_triton  # noqa: F401
