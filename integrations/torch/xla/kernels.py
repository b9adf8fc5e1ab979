"""The suite kernels that the backend's rewrite inserts, as the XLA paths see them:
which pattern each stands for and its suite kernel. Operand order, sizes and output
shapes are the kernel's calling convention (``tileflow.runtime.binding``), derived from
its tile definition: nothing here restates them."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tileflow.runtime import binding


def _no_flags(values: dict) -> dict:
    return {}


@dataclass(frozen=True)
class SuiteCall:
    """One ``torch.ops.tileflow`` op of the rewrite: the pattern it implements, the
    suite kernel behind it and the kernel's structural flags as a function of what is
    given. The op's parameters are the kernel's tensors, by the kernel's names."""

    op: str
    pattern: str
    kernel: str
    flags: Callable[[dict], dict] = _no_flags

    @functools.cached_property
    def inputs(self) -> tuple[str, ...]:
        """The op's tensor parameters, in its schema's order (the kernel's names)."""
        from tileflow.runtime import torch_library  # noqa: F401  (registers torch.ops.tileflow)

        schema = getattr(torch.ops.tileflow, self.op).default._schema
        return tuple(a.name for a in schema.arguments)

    def named(self, *tensors: Optional[torch.Tensor]) -> dict:
        """The op's positional tensors by the kernel's names (None: not given)."""
        return dict(zip(self.inputs, tensors))

    def convention(self, values: dict) -> binding.Convention:
        return binding.convention(self.kernel, self.flags(values))

    def sizes(self, *tensors: Optional[torch.Tensor]) -> dict:
        """The kernel's launch sizes at these tensors (flags included), read off their shapes."""
        values = self.named(*tensors)
        return self.convention(values).sizes(values)


def _bias(values: dict) -> dict:
    return {"HAS_BIAS": int(values.get("b") is not None)}


CALLS = {
    "matvec": SuiteCall("matvec", "matvec", "matvec", _bias),
    "matvec_residual": SuiteCall("matvec_residual", "matvec_residual", "matvec_residual"),
    "gate_up_silu": SuiteCall("gate_up_silu", "gate_up_silu", "gate_up_silu"),
}


def call_of(target) -> SuiteCall | None:
    """The :class:`SuiteCall` of an FX node target, None if it is no tileflow op."""
    from tileflow.runtime import torch_library  # noqa: F401  (registers torch.ops.tileflow)

    for name, call in CALLS.items():
        if target is getattr(torch.ops.tileflow, name).default:
            return call
    return None
