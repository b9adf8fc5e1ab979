"""Run a suite kernel's generated Triton code on torch tensors.

On a machine without a GPU the Triton interpreter runs the same generated text (this
is how CI executes every Triton kernel). Interpreter mode is process-wide in Triton:
``triton.jit`` picks compiled or interpreted when a module is imported, triton's own
library included, so it must be chosen before triton is first imported and never
switched back. :func:`use_interpreter_if_no_gpu` does that once.
"""

from __future__ import annotations

import os

from tileflow.emit.cache import load_generated
from tileflow.tile.ir import KernelIR


def use_interpreter_if_no_gpu() -> bool:
    """Turn on ``TRITON_INTERPRET`` when no CUDA/ROCm device exists; return the mode."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        return True
    return False


def triton_launcher(ir: KernelIR, device_type: str):
    """The generated ``launch`` for ``ir``: compiled on a GPU, interpreted without one."""
    interpret = use_interpreter_if_no_gpu()
    if device_type == "cpu" and not interpret:
        raise RuntimeError(
            f"{ir.name}: CPU tensors on a machine with a GPU; the Triton interpreter is off "
            "in this process (set TRITON_INTERPRET=1 before importing triton to use it)")
    module = load_generated(ir, "triton", variant="_interp" if interpret else "")
    return module.launch
