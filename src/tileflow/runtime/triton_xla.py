"""Run a suite kernel's generated Triton code as XLA custom calls (JAX on CUDA / ROCm).

The generated module's ``launch_xla(call, empty, *arguments, *scalars)`` computes the
grids and launch parameters once, for any array type, and hands each stage to ``call``:

- :func:`jax_call` binds it as an XLA custom call (jaxlib's Triton launcher, the kernel
  compiled by jax_triton; the written views aliased from operand to result, so XLA
  updates them in place and the stages thread);
- :func:`torch_call` launches the same stage kernel on torch tensors, which on a machine
  without a GPU is the Triton interpreter: how CI checks the custom-call argument order
  (``tileflow.verify`` target ``triton_xla``) without jax_triton or a GPU.

These are the same kernels (and tuned launch parameters) the torch integrations run,
less programmatic dependent launch: XLA launches them, not Triton's launcher. (torch's
decode launches use ``launch_xla`` too, through ``torch_triton.torch_static_launcher``.)
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

from tileflow.emit.cache import load_generated
from tileflow.tile.ir import KernelIR


def xla_launcher(ir: KernelIR, interpret: bool = False) -> Callable:
    """The generated ``launch_xla`` for ``ir`` (``interpret``: under the Triton interpreter)."""
    module = load_generated(ir, "triton", variant="_interp" if interpret else "")
    return functools.partial(module.launch_xla, interpret=interpret)


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


# The custom-call target the stages lower to: jaxlib's own typed-FFI Triton launcher,
# registered once more under this name with XLA's COMMAND_BUFFER_COMPATIBLE trait, so
# that XLA records the launches into its command buffers (CUDA graphs) with the fused
# code around them instead of launching each from the host. jaxlib registers it
# without the trait; a compiled call only ever runs cuLaunchKernel (its module loads
# in the handler's initialize stage), which stream capture records and replays.
_TARGET = "tileflow_triton_kernel_call"
_JAXLIB_TARGET = "triton_kernel_call_ffi"
_registered: set = set()


def _custom_call_target(platform: str) -> str:
    if platform not in _registered:
        import jax
        from jax._src.lib import gpu_triton
        from jaxlib.xla_client import CustomCallTargetTraits

        lib = gpu_triton._cuda_triton if platform == "cuda" else gpu_triton._hip_triton
        jax.ffi.register_ffi_target(_TARGET, lib.registrations()[_JAXLIB_TARGET], platform=platform.upper(),
                                    api_version=1, traits=CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE)
        _registered.add(platform)
    return _TARGET


_call_p = None


def _primitive():
    """``tileflow_triton_call``: one Triton kernel launch, its written operands aliased to
    its results (built on first use: jax_triton and a GPU jaxlib are imported here)."""
    global _call_p
    if _call_p is not None:
        return _call_p
    import jax
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    p = Primitive("tileflow_triton_call")
    p.multiple_results = True
    p.def_abstract_eval(lambda *avals, out_avals, **_: list(out_avals))
    p.def_impl(lambda *args, **params: jax.jit(lambda *a: p.bind(*a, **params))(*args))
    for platform in ("cuda", "rocm"):
        mlir.register_lowering(p, _lowering(platform), platform=platform)
    _call_p = p
    return p


def _lowering(platform: str):
    def rule(ctx, *arrays, kernel, grid, scalars, meta, num_warps, num_stages, n_reads, out_avals):
        import zlib

        import jax
        from jax._src.lib import gpu_triton
        from jax_triton import triton_lib as jtl

        # kernel parameters: the arrays (reads, then the written views as aliased
        # operands), the scalars, then the results (the same buffers as those operands)
        args = list(ctx.avals_in) + list(scalars) + list(ctx.avals_out)
        dtypes = [jtl.get_triton_type(a) for a in args]
        n_in = len(ctx.avals_in)
        scalar_args = tuple((n_in + i, dtypes[n_in + i], v) for i, v in enumerate(scalars))
        init = jtl.get_cuda_backend if platform == "cuda" else jtl.get_hip_backend
        compiled, attrs = jtl.get_or_create_triton_kernel(
            init, platform, kernel, dtypes, scalar_args, num_warps=num_warps, num_stages=num_stages, num_ctas=1,
            compute_capability=None, enable_fp_fusion=True, metaparams=dict(meta), dump=False)
        params = []
        for i, (a, t) in enumerate(zip(args, dtypes)):
            if t.startswith("*"):
                params.append(gpu_triton.create_array_parameter(0, 16 if ["tt.divisibility", 16] in attrs[(i,)] else 0))
            elif a != 1:  # a scalar equal to 1 is specialised into the kernel, as Triton does
                params.append(gpu_triton.create_scalar_parameter(a, t))
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        call = gpu_triton.TritonKernelCall(compiled, gx, gy, gz, params)
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        aliases = {n_reads + i: i for i in range(len(ctx.avals_out))}
        lower = jax.ffi.ffi_lowering(_custom_call_target(platform), api_version=4, operand_output_aliases=aliases)
        return lower(ctx, *arrays, opaque=zlib.compress(call.to_proto(name, b"")))

    return rule


def _shaped(shape, dtype):
    try:  # public in jax 0.10; jax.core keeps shedding names
        from jax.core import ShapedArray
    except ImportError:  # pragma: no cover
        from jax._src.core import ShapedArray
    return ShapedArray(tuple(shape), dtype)


def jax_call(kernel, grid: tuple, reads: Sequence, writes: Sequence, scalars: Sequence, meta: dict) -> tuple:
    """One stage as a ``tileflow_triton_call``: ``writes`` go in aliased to the results."""
    import numpy as np

    meta, opts = _launch_options(meta)
    # Python floats would reach the kernel as fp64; the torch launcher passes fp32
    scal = tuple(np.float32(s) if isinstance(s, float) else int(s) for s in scalars)
    outs = _primitive().bind(
        *reads, *writes, kernel=kernel, grid=tuple(int(g) for g in grid), scalars=scal,
        meta=tuple(sorted(meta.items())), num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3),
        n_reads=len(reads), out_avals=tuple(_shaped(w.shape, w.dtype) for w in writes))
    return tuple(outs)


_JAX_WORKSPACE = {"f32": "float32", "i32": "int32", "i64": "int64"}


def jax_empty(shape: tuple, dtype: str):
    """A workspace: an uninitialised buffer (every element a later stage reads was written)."""
    import jax
    import jax.numpy as jnp

    return jax.lax.empty(tuple(int(n) for n in shape), jnp.dtype(_JAX_WORKSPACE[dtype]))


def torch_call(kernel, grid: tuple, reads: Sequence, writes: Sequence, scalars: Sequence, meta: dict) -> tuple:
    """One stage launched on torch tensors, written in place (the interpreter on CPU),
    with programmatic dependent launch where the stage was generated for it."""
    meta, opts = _launch_options(meta)
    if meta.get("USE_PDL"):
        opts["launch_pdl"] = True
    kernel[tuple(grid)](*reads, *writes, *scalars, *writes, **meta, **opts)
    return tuple(writes)


def torch_empty(shape: tuple, dtype: str, device="cpu"):
    """A poisoned workspace (NaN / -1), so a stage that reads an unwritten element fails."""
    import torch

    t = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}[dtype]
    fill = float("nan") if t == torch.float32 else -1
    return torch.full(tuple(int(n) for n in shape), fill, dtype=t, device=device)
