"""The reference path: each suite kernel's array-API reference evaluated with torch
ops on the XLA tensors, so it is traced into the XLA graph like any other op.

Arithmetic is fp32 (as ``tileflow.runtime.ops`` on CPU) and the result is cast back
to the storage dtype."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tileflow.integrations.torch.xla.kernels import CALLS, SuiteCall


def _run(call: SuiteCall, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    import array_api_compat

    from tileflow.suite import KERNELS

    values = call.named(*tensors)
    conv = call.convention(values)
    inputs = {n: values[n].float() for n in conv.inputs}
    xp = array_api_compat.array_namespace(*inputs.values())
    return KERNELS[call.kernel].run_reference(xp, **inputs)[conv.outputs[0]].to(conv.storage(values).dtype)


def _entry(op: str) -> Callable:
    call = CALLS[op]

    def run(*tensors):
        return _run(call, *tensors)

    run.__name__ = run.__qualname__ = f"reference_{op}"
    run.__doc__ = f"torch.ops.tileflow.{op} as {call.kernel}'s reference, in fp32"
    return run


OPS = {op: _entry(op) for op in CALLS}
