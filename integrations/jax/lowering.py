"""What a tileflow primitive lowers to, per platform.

- CUDA (and ROCm) with ``jax_triton`` importable: the kernel's generated Triton code
  (below, ``triton``), the fastest measured on an H200.
- TPU, and CUDA / ROCm without ``jax_triton``: the kernel's generated Pallas code,
  compiled (``interpret=False``; on GPUs Pallas compiles through its Triton backend).
  The option ``pallas_interpret="1"`` (``TILEFLOW_PALLAS_INTERPRET=1``) forces the interpreter.
- CPU: the kernel's array-API reference in jax.numpy with fp32 arithmetic, rounded
  once to the storage dtype (what the torch CPU path does), or, with
  ``TILEFLOW_JAX_TARGET=pallas``, the generated Pallas code under the interpreter.
- ``TILEFLOW_JAX_TARGET=triton`` (CUDA / ROCm): the kernel's generated *Triton* code,
  the same kernels and tuned launch parameters the torch integrations run, as XLA custom
  calls through ``jax_triton`` (``tileflow.runtime.triton_xla``). No such lowering on
  CPU or TPU: binding it there is an error that says so.
- ``TILEFLOW_JAX_TARGET=reference`` runs the reference on every platform.

:func:`keep_xla_reason`: where the generated kernels measured slower than XLA's own code
(CUDA without jax_triton, through Pallas's Triton backend), ``optimize`` leaves the
function as written under the ``auto`` target and says why; primitives called directly
still lower to Pallas.

The target is a static parameter of each call (the option ``jax_target``, read when the
primitive is bound: :func:`tileflow.integrations.jax.signature.jax_target`), so programs
traced under different settings never share a compiled executable.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from tileflow import settings
from tileflow.integrations.jax.signature import input_views, jax_target, kernel_ir, output_avals, storage_dtype
from tileflow.suite import KERNELS


def _interpret_on_accelerator() -> bool:
    return settings.ENVIRONMENT.pallas_interpret == "1"


def reference_impl(name: str):
    """The reference as a function of the primitive's operands and parameters."""
    kernel = KERNELS[name]

    def impl(*ops, sizes, scalars, target):
        views = input_views(name, sizes)
        storage = storage_dtype(name, sizes, ops)
        inputs = {v.name: (x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x)
                  for v, x in zip(views, ops)}
        with warnings.catch_warnings():
            # matvec_fp8's rounding asks for float64; without x64 JAX gives fp32, where each of its steps is exact
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64", category=UserWarning)
            res = kernel.run_reference(jnp, **inputs, **dict(scalars))
        avals = output_avals(name, sizes, storage)
        outs = kernel_outputs(name, sizes)
        return [res[n].astype(a.dtype) for n, a in zip(outs, avals)]

    return impl


def kernel_outputs(name: str, sizes: tuple) -> list:
    return [v.name for v in kernel_ir(name, sizes).outputs]


def pallas_impl(name: str, interpret: bool):
    """The generated Pallas ``launch`` on the primitive's operands. Interpreted (the
    tests), outputs start poisoned (NaN / -1), so an element the kernel fails to write
    cannot pass as a plausible value; compiled, they start as ``lax.empty`` buffers
    (an allocation, where a poison fill would be one more kernel per call: every
    kernel's writes are verified on every test case under the poison)."""
    from tileflow.runtime.jax_pallas import pallas_launcher

    def impl(*ops, sizes, scalars, target):
        ir = kernel_ir(name, sizes)
        launch = pallas_launcher(ir)
        avals = dict(zip((v.name for v in ir.outputs), output_avals(name, sizes, storage_dtype(name, sizes, ops))))
        it = iter(ops)
        args = []
        for v in ir.arguments:
            if v.role in ("input", "inout"):
                args.append(next(it))
            else:
                a = avals[v.name]
                if not interpret and hasattr(jax.lax, "empty"):
                    args.append(jax.lax.empty(a.shape, a.dtype))
                    continue
                fill = jnp.nan if jnp.issubdtype(a.dtype, jnp.floating) else -1
                args.append(jnp.full(a.shape, fill, a.dtype))
        scal = dict(scalars)
        return list(launch(*args, *[scal[s.name] for s in ir.scalars], interpret=interpret))

    return impl


def triton_impl(name: str, call=None, empty=None, interpret: bool = False):
    """The generated Triton kernel's ``launch_xla`` on the primitive's operands, with the
    launch parameters measured for this GPU and shape (else the defaults). ``call`` /
    ``empty`` bind a stage and allocate a workspace (default: jax_triton, ``lax.empty``;
    the CPU test passes the interpreter's)."""
    from tileflow.emit import autotune
    from tileflow.runtime import triton_xla

    call = call or triton_xla.jax_call
    empty = empty or triton_xla.jax_empty

    kernel = KERNELS[name]

    def impl(*ops, sizes, scalars, target):
        s = dict(sizes)
        storage = storage_dtype(name, sizes, ops)
        dname = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[jnp.dtype(storage).name]
        tuned = autotune.lookup(name, s, dname, jax.devices()[0].device_kind) or {}
        ir = kernel.build({**kernel.default_params(s), **tuned, **kernel.structural_sizes(s)})
        it = iter(ops)
        outs = iter(output_avals(name, sizes, storage))
        args = []
        for v in ir.arguments:
            if v.role in ("input", "inout"):
                args.append(next(it))
                if v.role == "inout":
                    next(outs)
            else:
                a = next(outs)
                args.append(jax.lax.empty(a.shape, a.dtype))
        scal = dict(scalars)
        return list(triton_xla.xla_launcher(ir, interpret)(call, empty, *args, *[scal[x.name] for x in ir.scalars]))

    return impl


def _no_triton(name: str, platform: str):
    def rule(ctx, *args, **params):
        raise NotImplementedError(
            f"tileflow_{name}: TILEFLOW_JAX_TARGET=triton runs the generated Triton kernels on CUDA / ROCm "
            f"GPUs only (this is {platform}); use auto, pallas or reference")

    return rule


def _rule(name: str, platform: str):
    ref = mlir.lower_fun(reference_impl(name), multiple_results=True)
    interp = mlir.lower_fun(pallas_impl(name, interpret=True), multiple_results=True)
    compiled = mlir.lower_fun(pallas_impl(name, interpret=False), multiple_results=True)
    gpu = platform in ("cuda", "rocm")
    triton = mlir.lower_fun(triton_impl(name), multiple_results=True) if gpu else _no_triton(name, platform)

    def rule(ctx, *args, sizes, scalars, target):
        params = dict(sizes=sizes, scalars=scalars, target=target)
        if target == "reference" or (platform == "cpu" and target == "auto"):
            return ref(ctx, *args, **params)
        if target == "triton" or (gpu and target == "auto" and not _interpret_on_accelerator() and triton_available()):
            return triton(ctx, *args, **params)
        if platform == "cpu" or _interpret_on_accelerator():
            return interp(ctx, *args, **params)
        return compiled(ctx, *args, **params)

    return rule


def register(prim, name: str) -> None:
    """Register the lowerings of ``prim`` (suite kernel ``name``) on every platform."""
    for platform in ("cpu", "cuda", "rocm", "tpu"):
        mlir.register_lowering(prim, _rule(name, platform), platform=platform)


def triton_available() -> bool:
    """Whether the generated Triton kernels can run under JAX here (jax_triton importable)."""
    from tileflow.runtime.triton_xla import jax_triton_missing

    return not jax_triton_missing()


# the measurements behind the choice of target on a GPU: docs/performance.md (JAX)
_CUDA_MEASURED = ("on a GPU the Pallas (Triton backend) kernels measured slower than jax.jit, the generated "
                  "Triton kernels through jax_triton faster: docs/performance.md")


def keep_xla_reason() -> str:
    """Why ``optimize`` keeps XLA's own code on the default backend, or "" to rewrite.

    Only under the ``auto`` target on CUDA / ROCm without jax_triton (where the kernels
    would run through Pallas's Triton backend, measured slower than XLA):
    ``TILEFLOW_JAX_TARGET=pallas`` (or ``triton``, ``reference``) rewrites everywhere."""
    if jax_target() != "auto":
        return ""
    if jax.default_backend() in ("gpu", "cuda", "rocm") and not triton_available():
        return (f"on CUDA without jax_triton the generated kernels run through Pallas, measured slower than XLA "
                f"({_CUDA_MEASURED}); install jax-triton, or options={{'jax_target': 'pallas'}} swaps them in anyway")
    return ""
