"""Suite kernels as torch custom operators (``torch.ops.tileflow.*``), for graphs:
the dynamo backend's rewrites insert them, inductor schedules them as opaque calls,
CUDA graphs capture them. Eager code calls ``tileflow.runtime.ops`` directly (a
custom op's dispatch costs ~10 us a call)."""

from __future__ import annotations

from typing import Optional

import torch

from tileflow.runtime import ops


@torch.library.custom_op("tileflow::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` by the suite's matvec (q_proj_matvec)."""
    return ops.linear(x.contiguous(), w, b)


@linear.register_fake
def _(x, w, b=None):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("tileflow::linear_residual", mutates_args=())
def linear_residual(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ w.T + r`` by the suite's o_proj_residual kernel."""
    return ops.o_proj_residual(x.contiguous(), w, r.contiguous())


@linear_residual.register_fake
def _(x, w, r):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("tileflow::gate_up_silu", mutates_args=())
def gate_up_silu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """``silu(x @ wg.T) * (x @ wu.T)`` by the suite's mlp_gate_up_silu kernel."""
    return ops.gate_up_silu(x.contiguous(), wg, wu)


@gate_up_silu.register_fake
def _(x, wg, wu):
    return x.new_empty((x.shape[0], wg.shape[0]))
