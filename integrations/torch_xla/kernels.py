"""The suite kernels that the backend's rewrite inserts, as the XLA paths see them:
which pattern each stands for, its suite kernel, and its launch sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SuiteCall:
    """One ``torch.ops.tileflow`` op of the rewrite: the pattern it implements, the
    suite kernel behind it, the names of its tensor arguments (the kernel's inputs, in
    the op's order) and its launch sizes as a function of the argument shapes."""

    op: str
    pattern: str
    kernel: str
    inputs: tuple[str, ...]
    sizes: Callable[..., dict]


def _matvec_sizes(x, w, *rest) -> dict:
    return {"M": x.shape[0], "N": w.shape[0], "K": w.shape[1]}


def _linear_sizes(x, w, b=None) -> dict:
    return {**_matvec_sizes(x, w), "HAS_BIAS": int(b is not None)}


CALLS = {
    "linear": SuiteCall("linear", "matvec", "q_proj_matvec", ("x", "w", "b"), _linear_sizes),
    "linear_residual": SuiteCall("linear_residual", "matvec_residual", "o_proj_residual", ("x", "w", "r"),
                                 _matvec_sizes),
    "gate_up_silu": SuiteCall("gate_up_silu", "gate_up_silu", "mlp_gate_up_silu", ("x", "wg", "wu"),
                              _matvec_sizes),
}


def call_of(target) -> SuiteCall | None:
    """The :class:`SuiteCall` of an FX node target, None if it is no tileflow op."""
    from tileflow.runtime import torch_library  # noqa: F401  (registers torch.ops.tileflow)

    for name, call in CALLS.items():
        if target is getattr(torch.ops.tileflow, name).default:
            return call
    return None
