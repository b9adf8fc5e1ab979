"""One JAX primitive per suite kernel.

Every primitive takes the kernel's input (and in-place) arrays in the order of the
tile definition, with the sizes, runtime scalars and target as static parameters,
and returns the kernel's outputs (in-place views come back as new arrays: JAX is
functional, XLA aliases them when the caller donates the buffer). Abstract
evaluation reads the output shapes off the tile definition (``signature.py``), so a
primitive traces without running anything; ``lowering.py`` decides per platform what
runs, and each primitive registers its lowering when it is created.

Scalars (eps, theta, scale) are static: they are constants of the model, and a
constant in the jaxpr is what the rewrite's exactness rules compare.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching

from tileflow.integrations.jax import lowering
from tileflow.integrations.jax.signature import (  # noqa: F401 (TARGETS .. launch_params: re-exported)
    TARGETS, MATVEC_KERNELS, index_dtype, input_views, jax_target, kernel_ir, launch_params, output_avals,
    storage_dtype, targeting, view_shape)


PRIMITIVES: dict[str, Primitive] = {}


def primitive(name: str) -> Primitive:
    """The primitive ``tileflow_<kernel>`` (created and registered on first use)."""
    prim = PRIMITIVES.get(name)
    if prim is None:
        prim = _make(name)
        PRIMITIVES[name] = prim
    return prim


def _make(name: str) -> Primitive:
    prim = Primitive(f"tileflow_{name}")
    prim.multiple_results = True

    def abstract(*avals, sizes, scalars, target):
        _check_operands(name, sizes, avals)
        return output_avals(name, sizes, storage_dtype(name, sizes, avals))

    prim.def_abstract_eval(abstract)
    # Eager calls run the same lowering as under jit (one compiled program per
    # static parameter set), so eager and jitted results agree bit for bit.
    prim.def_impl(lambda *args, **params: _jitted(prim, tuple(sorted(params.items())))(*args))
    batching.primitive_batchers[prim] = functools.partial(_batch, prim, name)
    lowering.register(prim, name)
    return prim


@functools.lru_cache(maxsize=None)
def _jitted(prim: Primitive, params: tuple):
    return jax.jit(lambda *a: prim.bind(*a, **dict(params)))


def _check_operands(name: str, sizes: tuple, avals: Sequence) -> None:
    views = input_views(name, sizes)
    if len(views) != len(avals):
        raise TypeError(f"tileflow_{name}: {len(avals)} operands, expected {len(views)} "
                        f"({', '.join(v.name for v in views)})")
    s = dict(sizes)
    for v, a in zip(views, avals):
        want = view_shape(v, s)
        if tuple(a.shape) != want:
            raise TypeError(f"tileflow_{name}: {v.name} has shape {tuple(a.shape)}, expected {want}")
        if v.dtype in ("i64", "i32") and not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"tileflow_{name}: {v.name} must be integer, got {a.dtype}")
        # packed weights are read bit for bit: a cast would change the codes, so none is made
        packed = {"u8": jnp.uint8, "f8e4m3": jnp.float8_e4m3fn}.get(v.dtype)
        if packed is not None and a.dtype != packed:
            raise TypeError(f"tileflow_{name}: {v.name} must be {jnp.dtype(packed).name}, got {a.dtype}")


def bind(name: str, operands: Sequence, sizes: dict, scalars: dict | None = None) -> list:
    """Call suite kernel ``name`` on ``operands`` (its input views, in order).

    Floating operands must share one dtype (the kernel's storage dtype); index
    operands are cast to :func:`index_dtype` (int32 ones, a key mask, to int32), fp32
    ones to float32; packed weights (uint8, float8_e4m3fn) must come in their dtype."""
    key = tuple(sorted((k, int(v)) for k, v in sizes.items()))
    views = input_views(name, key)
    ops = []
    for v, x in zip(views, operands):
        x = jnp.asarray(x)
        if v.dtype in ("i64", "i32"):
            x = x.astype(index_dtype() if v.dtype == "i64" else jnp.int32)
        elif v.dtype == "f32":  # fp32 by definition (a router weight, rope frequencies, block scales)
            x = x.astype(jnp.float32)
        ops.append(x)
    floats = {str(x.dtype) for v, x in zip(views, ops) if v.dtype == "T"}
    if len(floats) > 1:
        raise TypeError(f"tileflow_{name}: floating operands of several dtypes {sorted(floats)}")
    # integer scalars (moe_router's top_k, group counts) stay ints: the reference loops and reshapes by them
    kinds = {s.name: s.dtype for s in kernel_ir(name, key).scalars}
    scal = tuple((k, int(val) if kinds.get(k) == "i32" else float(val)) for k, val in (scalars or {}).items())
    return primitive(name).bind(*ops, sizes=key, scalars=scal, target=jax_target())


def _row_dim(name: str, sizes: tuple) -> str:
    """The dimension that indexes independent rows (tokens / sequences): the first of
    the first output. Every suite kernel computes each row on its own."""
    return kernel_ir(name, sizes).outputs[0].shape[0]


def _batch(prim, name, args, dims, *, sizes, scalars, target):
    """vmap: an extra batch of rows becomes more rows (operands laid out by row get
    the batch merged into their first axis; unbatched ones are broadcast). When a
    weight itself is batched there is no such merge: one call per batch element."""
    row = _row_dim(name, sizes)
    views = input_views(name, sizes)
    nb = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    by_row = [v.shape[0] == row for v in views]
    if any(d is not None and not r for d, r in zip(dims, by_row)):
        moved = [jnp.moveaxis(a, d, 0) if d is not None else a for a, d in zip(args, dims)]
        mapped = [d is not None for d in dims]

        def one(xs):
            it = iter(xs)
            ops = [next(it) if m else a for a, m in zip(moved, mapped)]
            return prim.bind(*ops, sizes=sizes, scalars=scalars, target=target)

        outs = jax.lax.map(one, [a for a, m in zip(moved, mapped) if m])
        return list(outs), [0] * len(outs)
    s = dict(sizes)
    merged = []
    for a, d, r in zip(args, dims, by_row):
        if not r:
            merged.append(a)
            continue
        a = jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (nb,) + a.shape)
        merged.append(a.reshape((nb * a.shape[1],) + a.shape[2:]))
    s[row] = nb * s[row]
    outs = prim.bind(*merged, sizes=tuple(sorted(s.items())), scalars=scalars, target=target)
    return [o.reshape((nb, o.shape[0] // nb) + o.shape[1:]) for o in outs], [0] * len(outs)
