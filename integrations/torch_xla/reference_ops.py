"""The reference path: each suite kernel's array-API reference evaluated with torch
ops on the XLA tensors, so it is traced into the XLA graph like any other op.

Arithmetic is fp32 (as ``tileflow.runtime.ops`` on CPU) and the result is cast back
to the storage dtype."""

from __future__ import annotations

from typing import Optional

import torch

from tileflow.integrations.torch_xla.kernels import CALLS, SuiteCall


def _run(call: SuiteCall, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    import array_api_compat

    from tileflow.suite import KERNELS

    inputs = {n: t.float() for n, t in zip(call.inputs, tensors) if t is not None}
    xp = array_api_compat.array_namespace(*inputs.values())
    return KERNELS[call.kernel].run_reference(xp, **inputs)["out"].to(tensors[0].dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` (q_proj_matvec's reference)."""
    return _run(CALLS["linear"], x, w, b)


def linear_residual(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ w.T + r`` (o_proj_residual's reference)."""
    return _run(CALLS["linear_residual"], x, w, r)


def gate_up_silu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """``silu(x @ wg.T) * (x @ wu.T)`` (mlp_gate_up_silu's reference)."""
    return _run(CALLS["gate_up_silu"], x, wg, wu)


OPS = {"linear": linear, "linear_residual": linear_residual, "gate_up_silu": gate_up_silu}
