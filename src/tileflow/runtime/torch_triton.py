"""Run a suite kernel's generated Triton code on torch tensors.

On a machine without a GPU the Triton interpreter runs the same generated text (this
is how CI executes every Triton kernel). Interpreter mode is process-wide in Triton:
``triton.jit`` picks compiled or interpreted when a module is imported, triton's own
library included, so it must be chosen before triton is first imported and never
switched back. :func:`use_interpreter_if_no_gpu` does that once.

A launcher is built once per kernel and device (``ops``); what it takes from the
process, the interpreter mode and the option ``pdl``, is fixed then and passed to the
generated ``launch`` as arguments.
"""

from __future__ import annotations

import functools

from tileflow import settings
from tileflow.emit.cache import load_generated
from tileflow.tile.ir import KernelIR


def use_interpreter_if_no_gpu() -> bool:
    """Turn on ``TRITON_INTERPRET`` when no CUDA/ROCm device exists; return the mode."""
    if settings.triton_interpret():
        return True
    import torch

    if not torch.cuda.is_available():
        settings.use_triton_interpreter()
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
    return functools.partial(module.launch, pdl=settings.ENVIRONMENT.pdl, interpret=interpret)


def static_shapes_wanted(ir: KernelIR, sizes: dict, options=None) -> bool:
    """Whether a launch of ``ir`` at ``sizes`` compiles its strides and sizes in
    (:func:`torch_launcher`): for one-row (decode) launches, whose shapes are fixed per
    model, so the one compile per shape is paid once; a prefill's row count changes
    with every prompt, and each new count would be a compile. Kernels with persistent
    workspaces (counters that outlive a launch) keep the generic launcher, which owns
    them. The option ``static_shapes`` (``TILEFLOW_STATIC_SHAPES=0``) turns it off (the A/B)."""
    if not settings.resolve(options).static_shapes or any(v.persistent for v in ir.workspaces):
        return False
    return all(sizes.get(n, 1) == 1 for n in ("M", "B"))


def torch_launcher(ir: KernelIR, device_type: str, sizes: dict):
    """``launch`` for torch tensors: with :func:`static_shapes_wanted`, the same stage
    kernels through ``launch_xla`` with each tensor's strides and every size compiled in
    (constant strides and trip counts let Triton drop masks and prove 16-byte alignment;
    measured faster, docs/notebook.md), else the generic
    ``launch`` (runtime strides, Triton's own divisibility hints)."""
    generic = triton_launcher(ir, device_type)
    if not static_shapes_wanted(ir, sizes):
        return generic
    return torch_static_launcher(ir, use_interpreter_if_no_gpu())


def torch_static_launcher(ir: KernelIR, interpret: bool) -> Callable:
    """``launch``'s drop-in for torch tensors through ``launch_xla``: the same kernels with
    every stride and size compiled in (the decode launches' default,
    :func:`tileflow.runtime.torch_triton.torch_launcher`). Workspaces are plain ``torch.empty``."""
    import torch

    from tileflow.runtime.triton_xla import torch_call, xla_launcher

    launch = xla_launcher(ir, interpret)
    pdl = {}

    def run(*args):
        first = args[0]
        if first.device not in pdl:
            pdl[first.device] = (first.is_cuda and not interpret and settings.ENVIRONMENT.pdl
                                 and torch.cuda.get_device_capability(first.device)[0] >= 9)
        empty = lambda shape, dtype: torch.empty(  # noqa: E731
            tuple(int(n) for n in shape), device=first.device,
            dtype={"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}[dtype])
        launch(torch_call, empty, *args, pdl=pdl[first.device])

    return run
