"""JAX integration (``tileflow.jax``): the suite's kernels as JAX primitives, and
``optimize``, which rewrites the decode subgraphs of plain JAX code into them.

::

    from tileflow import jax as tfj
    y = tfj.rms_norm(x, w, eps=1e-6)          # a primitive: jit / vmap / eager
    step = tfj.optimize(decode_step)          # same signature, decode subgraphs swapped
    logits, cache = jax.jit(step)(params, token, cache, pos)
    print(tfj.explain(decode_step, params, token, cache, pos))

Each primitive lowers to the generated Pallas kernel on TPU and CUDA (compiled), to
the jax.numpy reference on CPU, or to the Pallas interpreter on CPU with the option
``jax_target="pallas"`` (``TILEFLOW_JAX_TARGET=pallas``, or ``with tfj.targeting("pallas"):``
around the tracing; see ``lowering.py``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax

from tileflow import settings

from tileflow.integrations.jax.ops import (argmax_greedy, embedding_lookup, gate_up_silu,  # noqa: F401
                                           gqa_attention, matvec, matvec_fp8, matvec_int4, matvec_pair,
                                           matvec_residual, matvec_residual_fp8, matvec_residual_int4, mla_attention,
                                           mla_latent_cache, moe_experts, moe_router, qkv_rope_cache, residual_add,
                                           rms_norm, rms_norm_gate_up_silu, rms_norm_gate_up_silu_fp8,
                                           rms_norm_gate_up_silu_int4, rms_norm_matvec, rms_norm_qkv_rope_cache_fp8,
                                           rms_norm_qkv_rope_cache_int4, rope_k, rope_q, rope_scalars, silu_mul)
from tileflow.integrations.jax.lowering import keep_xla_reason
from tileflow.integrations.jax.primitives import PRIMITIVES, primitive  # noqa: F401
from tileflow.integrations.jax.signature import jax_target, targeting  # noqa: F401
from tileflow.report import Report

__all__ = ["optimize", "explain", "Optimized", "primitive", "jax_target", "targeting", "rope_scalars",
           # the suite's kernels, by their names
           "argmax_greedy", "embedding_lookup", "gate_up_silu", "gqa_attention", "matvec", "matvec_fp8",
           "matvec_int4", "matvec_pair", "matvec_residual", "mla_attention", "mla_latent_cache", "moe_experts",
           "moe_router", "qkv_rope_cache", "residual_add", "rms_norm", "rms_norm_gate_up_silu",
           "rms_norm_matvec", "rope_k", "rope_q", "silu_mul",
           # the quantized matvecs' fused forms
           "matvec_residual_fp8", "matvec_residual_int4", "rms_norm_gate_up_silu_fp8", "rms_norm_gate_up_silu_int4",
           "rms_norm_qkv_rope_cache_fp8", "rms_norm_qkv_rope_cache_int4"]


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

    def __init__(self, fn: Callable, options=None):
        self.fn = fn
        self._programs: dict = {}
        # the options' jax_target where options are given, else the one in force at each trace
        self.target = None if options is None else settings.resolve(options).jax_target
        functools.update_wrapper(self, fn)

    def _targeting(self):
        return contextlib.nullcontext() if self.target is None else targeting(self.target)

    def program(self, *args, **kwargs) -> _Program:
        flat, tree = jax.tree_util.tree_flatten((args, kwargs))
        key = _key(flat, tree)
        prog = self._programs.get(key)
        if prog is None:
            with self._targeting():
                prog = self._programs[key] = _Program(self.fn, flat, tree)
        return prog

    def __call__(self, *args, **kwargs) -> Any:
        prog = self.program(*args, **kwargs)
        with self._targeting():
            if not prog.replacements:  # nothing to swap: the original function, untouched
                return self.fn(*args, **kwargs)
            return prog(jax.tree_util.tree_leaves((args, kwargs)))

    def report(self, *args, **kwargs) -> Report:
        """The rewrite report for these argument types."""
        return self.program(*args, **kwargs).report


def optimize(fn: Callable, options=None) -> Optimized:
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
    target and ``explain`` says why (``options={"jax_target": "pallas"}`` swaps anyway). Arguments must be
    pytrees of arrays (bind static ones with ``functools.partial``). ``options``: a
    :class:`tileflow.settings.Options` or a mapping of its fields; of them ``jax_target`` applies.

    Put the decode loop inside the jit (``lax.fori_loop`` / ``lax.scan``) where you can:
    a Python loop calling the jitted step once a token ran the swapped step slower than
    plain ``jax.jit``, the loop inside the jit faster; XLA's command buffers are the
    likely cause, not yet confirmed (docs/performance.md)."""
    return Optimized(fn, options)


def explain(fn: Callable, *args, **kwargs) -> Report:
    """Which decode patterns ``optimize(fn)`` swaps on these arguments (name -> count)
    and, for each near miss, where and why the original stays."""
    target = fn if isinstance(fn, Optimized) else Optimized(fn)
    return target.report(*args, **kwargs)
