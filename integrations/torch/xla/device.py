"""Which XLA client the tensors live on, and which path suite kernels take there."""

from __future__ import annotations

from typing import Any, Iterable

from tileflow import settings

TARGETS = ("auto", "pallas", "pallas-interpret", "reference")


def is_xla(x: Any) -> bool:
    """True for a tensor (real or fake) on a torch-xla device."""
    device = getattr(x, "device", None)
    return getattr(device, "type", None) == "xla"


def any_xla(values: Iterable[Any]) -> bool:
    return any(is_xla(v) for v in values)


def client() -> str:
    """The PJRT client of the XLA device: "TPU", "CPU", "CUDA", ..."""
    import torch_xla.runtime as xr

    return xr.device_type() or "?"


def path() -> str:
    """The path matched patterns take: "pallas" on TPU (Mosaic compiles the generated
    kernels there), "reference" elsewhere, since Pallas compiles for TPU only through
    torch-xla. The option ``xla_target`` (``TILEFLOW_XLA_TARGET``) overrides: "pallas-interpret"
    runs the generated kernels under the Pallas interpreter on any client (how CI checks
    them on CPU)."""
    forced = settings.ENVIRONMENT.xla_target
    if forced != "auto":
        return forced
    return "pallas" if client() == "TPU" else "reference"
