"""What a tileflow primitive's call is, read off the suite kernel's tile definition:
the kernel's IR at the launch parameters of its sizes, its operand views, the
abstract values of its outputs, its storage dtype, and the target a bind names.

Read by ``primitives.py`` (abstract evaluation, batching, ``bind``) and by
``lowering.py`` (what each platform runs); the imports go one way:
primitives -> lowering -> signature.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from tileflow import settings
from tileflow.suite import KERNELS

try:  # public in jax 0.10; jax.core keeps shedding names, so fall back to its home
    from jax.core import ShapedArray
except ImportError:  # pragma: no cover
    from jax._src.core import ShapedArray

TARGETS = ("auto", "pallas", "triton", "reference")
_TARGET: contextvars.ContextVar = contextvars.ContextVar("tileflow_jax_target", default=None)
MATVEC_KERNELS = ("matvec", "matvec_pair", "matvec_residual", "gate_up_silu",
                  "rms_norm_gate_up_silu", "rms_norm_matvec")


def jax_target() -> str:
    """``auto`` (on CUDA / ROCm the generated Triton kernels where jax_triton is
    importable, else Pallas compiled; Pallas on TPU; the reference on CPU), ``pallas`` (also on
    CPU, under the Pallas interpreter: how the tests run the generated kernels),
    ``triton`` (CUDA / ROCm: the generated Triton kernels with the torch side's tuned
    launch parameters, as custom calls through jax_triton) or ``reference`` (the
    jax.numpy reference everywhere): the option ``jax_target`` (``TILEFLOW_JAX_TARGET``),
    or the one a :func:`targeting` block in force names."""
    t = _TARGET.get()
    return settings.ENVIRONMENT.jax_target if t is None else t


@contextlib.contextmanager
def targeting(target: str):
    """Within the block (in this thread or task), primitives bind with ``target`` instead
    of the option ``jax_target``: wrap the *tracing* of a function (the first call of its
    ``jax.jit``, or ``optimize``'s), as the target is a static parameter of each bind."""
    if target not in TARGETS:
        raise ValueError(f"tileflow.jax: target {target!r}: expected one of {', '.join(TARGETS)}")
    token = _TARGET.set(target)
    try:
        yield
    finally:
        _TARGET.reset(token)


def index_dtype():
    """The dtype of token ids / positions / lengths: int64 under ``jax_enable_x64``,
    else int32 (what the generated code's ``_I64`` is)."""
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def _divisor_block(n: int, block: int, least: int = 1) -> int:
    """The largest power of two <= ``block`` dividing ``n`` (at least ``least``), or
    ``block`` when none does."""
    b = block
    while b >= max(1, least):
        if n % b == 0:
            return b
        b //= 2
    return block


@functools.lru_cache(maxsize=None)
def launch_params(name: str, sizes: tuple) -> dict:
    """Launch parameters for the generated Pallas kernel at these sizes.

    The defaults, with block sizes shrunk to divisors of the weight dimensions: the
    generated ``launch`` pads every array to whole blocks, and a padded weight (or KV
    cache) is a full copy on every call. Reductions that must sit in one block
    (RMSNorm's row, argmax's partials) keep their size: padding those is small."""
    s = dict(sizes)
    p = dict(KERNELS[name].default_params(s))
    if name in MATVEC_KERNELS:
        p["BLOCK_K"] = _divisor_block(s["K"], p["BLOCK_K"], 16)
        p["BLOCK_N"] = _divisor_block(s["N"], p["BLOCK_N"])
    elif name == "embedding_lookup":
        p["BLOCK_D"] = _divisor_block(s["D"], p["BLOCK_D"], 16)
    elif name == "gqa_attention":
        p["BLOCK_N"] = _divisor_block(s["S"], p["BLOCK_N"], 16)  # tl.dot wants >= 16 rows
    return p


@functools.lru_cache(maxsize=None)
def kernel_ir(name: str, sizes: tuple):
    return KERNELS[name].build(launch_params(name, sizes))


def view_shape(view, sizes: dict) -> tuple:
    return tuple(int(sizes[d]) for d in view.shape)


def input_views(name: str, sizes: tuple) -> list:
    """The views a primitive takes as operands: inputs and in-place views, in the
    order of the tile definition."""
    return [v for v in kernel_ir(name, sizes).arguments if v.role in ("input", "inout")]


def output_avals(name: str, sizes: tuple, storage) -> list:
    out = []
    for v in kernel_ir(name, sizes).outputs:
        dtype = {"T": storage, "f32": jnp.float32}.get(v.dtype, index_dtype())
        out.append(ShapedArray(view_shape(v, dict(sizes)), dtype))
    return out


def storage_dtype(name: str, sizes: tuple, avals: Sequence) -> jnp.dtype:
    """The "T" dtype of a call: that of its first floating operand."""
    for v, a in zip(input_views(name, sizes), avals):
        if v.dtype == "T":
            return a.dtype
    raise ValueError(f"{name}: no floating operand")
