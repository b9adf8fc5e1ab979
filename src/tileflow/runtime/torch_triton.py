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


def static_shapes_wanted(ir: KernelIR, sizes: dict) -> bool:
    """Whether a launch of ``ir`` at ``sizes`` compiles its strides and sizes in
    (:func:`torch_launcher`): for one-row (decode) launches, whose shapes are fixed per
    model, so the one compile per shape is paid once; a prefill's row count changes
    with every prompt, and each new count would be a compile. Kernels with persistent
    workspaces (counters that outlive a launch) keep the generic launcher, which owns
    them, as do persistent launches (one launch for every stage, which ``launch_xla``
    does not make). ``TILEFLOW_STATIC_SHAPES=0`` turns it off (the A/B), ``=1`` forces it on for
    any row count."""
    mode = os.environ.get("TILEFLOW_STATIC_SHAPES", "")
    if mode == "0" or any(v.persistent for v in ir.workspaces) or ir.params.get("PERSISTENT"):
        return False
    return mode == "1" or all(sizes.get(n, 1) == 1 for n in ("M", "B"))


def torch_launcher(ir: KernelIR, device_type: str, sizes: dict):
    """``launch`` for torch tensors: with :func:`static_shapes_wanted`, the same stage
    kernels through ``launch_xla`` with each tensor's strides and every size compiled in
    (measured on an H200: 1.5B decode 836 -> 866 tok/s, NOTES.md: constant strides and
    trip counts let Triton drop masks and prove 16-byte alignment), else the generic
    ``launch`` (runtime strides, Triton's own divisibility hints)."""
    generic = triton_launcher(ir, device_type)
    if not static_shapes_wanted(ir, sizes):
        return generic
    from tileflow.runtime.triton_xla import torch_static_launcher

    return torch_static_launcher(ir, use_interpreter_if_no_gpu())
