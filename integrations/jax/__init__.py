"""JAX integration (``tileflow.jax``): the suite's kernels as JAX primitives, and
``optimize``, which rewrites the decode subgraphs of plain JAX code into them.

::

    from tileflow import jax as tfj
    y = tfj.rms_norm(x, w, eps=1e-6)          # a primitive: jit / vmap / eager
    step = tfj.optimize(decode_step)          # same signature, decode subgraphs swapped
    logits, cache = jax.jit(step)(params, token, cache, pos)
    print(tfj.explain(decode_step, params, token, cache, pos))

Each primitive lowers to the generated Pallas kernel on TPU and CUDA (compiled), to
the jax.numpy reference on CPU, or to the Pallas interpreter on CPU with
``TILEFLOW_JAX_TARGET=pallas`` (see ``lowering.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from tileflow.integrations.jax.ops import (argmax, attention_decode, down_proj_residual, embedding,  # noqa: F401
                                           gate_up_silu, kv_proj, linear, o_proj_residual, residual_add,
                                           qkv_rope_cache, rms_norm, rms_norm_gate_up_silu, rms_norm_linear, rope,
                                           rope_k_into_cache, rope_scalars, silu_mul)
from tileflow.integrations.jax.lowering import keep_xla_reason
from tileflow.integrations.jax.primitives import PRIMITIVES, jax_target, primitive  # noqa: F401
from tileflow.report import Report

__all__ = ["optimize", "explain", "Optimized", "rms_norm", "embedding", "linear", "kv_proj", "o_proj_residual",
           "down_proj_residual", "gate_up_silu", "silu_mul", "residual_add", "rope", "rope_k_into_cache",
           "qkv_rope_cache", "rms_norm_gate_up_silu", "rms_norm_linear", "attention_decode", "argmax", "primitive", "jax_target", "rope_scalars"]


class _Program:
    """``fn`` traced at one set of argument types, with its rewrite."""

    def __init__(self, fn: Callable, flat_args: list, in_tree):
        from tileflow.integrations.jax.graph import Graph
        from tileflow.integrations.jax.rewrite import rewrite

        def flat_fn(*flat):
            args, kwargs = jax.tree_util.tree_unflatten(in_tree, flat)
            out = fn(*args, **kwargs)
            leaves, self.out_tree = jax.tree_util.tree_flatten(out)
            return leaves

        closed = jax.make_jaxpr(flat_fn)(*flat_args)
        self.graph = Graph.from_jaxpr(closed)
        self.replacements, self.report = rewrite(self.graph, Report(f"tileflow.jax: {getattr(fn, '__name__', fn)}"))
        why = keep_xla_reason()
        if why and self.replacements:  # slower here than what it would replace: never swap silently
            for pattern, n in list(self.report.matches.items()):
                self.report.fallback(pattern, f"{n} matches", why)
            self.report.matches.clear()
            self.replacements = {}

    def __call__(self, flat_args: list):
        return jax.tree_util.tree_unflatten(self.out_tree, self.graph.run(flat_args, self.replacements))


def _key(flat: list, in_tree) -> tuple:
    return in_tree, tuple(jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x) for x in flat)


class Optimized:
    """What :func:`optimize` returns: call it like the original function."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._programs: dict = {}
        functools.update_wrapper(self, fn)

    def program(self, *args, **kwargs) -> _Program:
        flat, tree = jax.tree_util.tree_flatten((args, kwargs))
        key = _key(flat, tree)
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = _Program(self.fn, flat, tree)
        return prog

    def __call__(self, *args, **kwargs) -> Any:
        prog = self.program(*args, **kwargs)
        if not prog.replacements:  # nothing to swap: the original function, untouched
            return self.fn(*args, **kwargs)
        return prog(jax.tree_util.tree_leaves((args, kwargs)))

    def report(self, *args, **kwargs) -> Report:
        """The rewrite report for these argument types."""
        return self.program(*args, **kwargs).report


def optimize(fn: Callable) -> Optimized:
    """``fn`` with its decode subgraphs replaced by tileflow primitives.

    On each call with new argument types (shapes, dtypes, pytree structure) ``fn`` is
    traced to a jaxpr, the catalogue's patterns (``tileflow.patterns``: rms_norm,
    rope, gqa_attention, gate_up_silu, matvec_residual, matvec) are matched under
    their exactness conditions, and the jaxpr is evaluated with the matched
    subgraphs swapped; everything else runs as written. Where a norm's only readers are
    the matvecs after it, the fused kernels the torch path runs are swapped in instead
    (qkv_rope_cache, rms_norm_gate_up_silu, rms_norm_matvec: five launches a layer).
    Use it under ``jax.jit``
    (the rewrite then happens once per compilation). With no match, ``fn`` itself
    runs. On CUDA without jax_triton, where the generated kernels run through Pallas
    and measured slower than XLA's own code, nothing is swapped under the default
    target and ``explain`` says why (``TILEFLOW_JAX_TARGET=pallas`` swaps anyway). Arguments must be pytrees of
    arrays (bind static ones with ``functools.partial``).

    Put the decode loop inside the jit (``lax.fori_loop`` / ``lax.scan``) where you can:
    on an H100 a Python loop calling the jitted step once a token ran the swapped step
    slower than plain ``jax.jit`` (180.2 against 273.4 tok/s; 681.3 against 562.2 with the
    loop inside the jit); with XLA's command buffers off the order flipped (the step
    by hand: 344.4 against 215.6), so they are the likely cause, not yet confirmed
    (benchmarks/NOTES.md, seventeenth session)."""
    return Optimized(fn)


def explain(fn: Callable, *args, **kwargs) -> Report:
    """Which decode patterns ``optimize(fn)`` swaps on these arguments (name -> count)
    and, for each near miss, where and why the original stays."""
    target = fn if isinstance(fn, Optimized) else Optimized(fn)
    return target.report(*args, **kwargs)
