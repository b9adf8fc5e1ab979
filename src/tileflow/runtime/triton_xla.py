"""Run a suite kernel's generated Triton code as XLA custom calls (JAX on CUDA / ROCm).

The generated module's ``launch_xla(call, empty, *arguments, *scalars)`` computes the
grids and launch parameters once, for any array type, and hands each stage to ``call``:

- :func:`jax_call` binds it with ``jax_triton.triton_call`` (the written views aliased
  from operand to result, so XLA updates them in place and the stages thread);
- :func:`torch_call` launches the same stage kernel on torch tensors, which on a machine
  without a GPU is the Triton interpreter: how CI checks the custom-call argument order
  (``tileflow.verify`` target ``triton_xla``) without jax_triton or a GPU.

These are the same kernels (and tuned launch parameters) the torch integrations run,
less programmatic dependent launch: XLA launches them, not Triton's launcher.
"""

from __future__ import annotations

from typing import Callable, Sequence

from tileflow.emit.cache import load_generated
from tileflow.tile.ir import KernelIR


def xla_launcher(ir: KernelIR, interpret: bool = False) -> Callable:
    """The generated ``launch_xla`` for ``ir``."""
    return load_generated(ir, "triton", variant="_interp" if interpret else "").launch_xla


def jax_triton_missing() -> str:
    """Why jax_triton cannot be used here, or "" when it can."""
    try:
        import jax_triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or jaxlib without its Triton library
        return f"jax_triton is not importable ({type(e).__name__}: {e})"
    return ""


def _launch_options(meta: dict) -> tuple[dict, dict]:
    meta = dict(meta)
    opts = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    return meta, opts


def jax_call(kernel, grid: tuple, reads: Sequence, writes: Sequence, scalars: Sequence, meta: dict) -> tuple:
    """One stage as a ``jax_triton.triton_call``: ``writes`` go in aliased to the results."""
    import jax
    import jax_triton as jt
    import numpy as np

    meta, opts = _launch_options(meta)
    # Python floats would reach the kernel as fp64; the torch launcher passes fp32
    scal = [np.float32(s) if isinstance(s, float) else int(s) for s in scalars]
    first = len(reads)
    outs = jt.triton_call(
        *reads, *writes, *scal, kernel=kernel, grid=tuple(int(g) for g in grid),
        out_shape=[jax.ShapeDtypeStruct(w.shape, w.dtype) for w in writes],
        input_output_aliases={first + i: i for i in range(len(writes))}, **opts, **meta)
    return tuple(outs)


_JAX_WORKSPACE = {"f32": "float32", "i32": "int32", "i64": "int64"}


def jax_empty(shape: tuple, dtype: str):
    """A workspace: an uninitialised buffer (every element a later stage reads was written)."""
    import jax
    import jax.numpy as jnp

    return jax.lax.empty(tuple(int(n) for n in shape), jnp.dtype(_JAX_WORKSPACE[dtype]))


def torch_call(kernel, grid: tuple, reads: Sequence, writes: Sequence, scalars: Sequence, meta: dict) -> tuple:
    """One stage launched on torch tensors, written in place (the interpreter on CPU)."""
    meta, opts = _launch_options(meta)
    kernel[tuple(grid)](*reads, *writes, *scalars, *writes, **meta, **opts)
    return tuple(writes)


def torch_empty(shape: tuple, dtype: str, device="cpu"):
    """A poisoned workspace (NaN / -1), so a stage that reads an unwritten element fails."""
    import torch

    t = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}[dtype]
    fill = float("nan") if t == torch.float32 else -1
    return torch.full(tuple(int(n) for n in shape), fill, dtype=t, device=device)
