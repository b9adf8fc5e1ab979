"""A jaxpr as a flat dataflow graph: nested ``jit`` calls inlined, producers and
users of every value indexed, constants folded on request, and an evaluator that
runs the graph with some equations replaced (and the dead ones dropped).

Only ``jit`` calls are inlined (``jax.nn.silu``, ``jnp.where`` and friends are
jitted functions, so a pattern spans their boundaries); other higher-order
primitives (scan, cond, while, custom_jvp/vjp calls) stay whole, their bodies not
searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal

_CALLS = ("jit", "pjit", "closed_call", "core_call")
_RANDOM = ("rng_bit_generator", "random_bits", "random_seed", "random_wrap", "random_unwrap", "iota_2x32_shape",
           "threefry2x32")


class Value:
    """One value of the flattened graph. Inlining the same cached jaxpr twice (the
    body of ``jnp.where`` in every layer) reuses its Vars, so each inlined copy gets
    fresh Values instead."""

    __slots__ = ("aval",)

    def __init__(self, aval):
        self.aval = aval

    def __repr__(self) -> str:
        return f"Value({self.aval.str_short()})"


@dataclass(eq=False)
class Node:
    """One equation of the flattened graph."""

    idx: int
    prim: Any
    params: dict
    ins: list  # Value or Literal
    outs: list  # Value
    effects: Any = frozenset()
    ctx: Any = None  # the equation's JaxprEqnContext (compute_on, metadata), re-entered on evaluation

    @property
    def name(self) -> str:
        return self.prim.name

    def where(self) -> str:
        outs = ", ".join(str(o.aval.str_short()) for o in self.outs if hasattr(o, "aval"))
        return f"eqn {self.idx} {self.name} -> {outs}"


@dataclass
class Replacement:
    """Equation ``anchor``'s outputs come from ``fn(values of inputs)`` instead; or, with
    ``outs``, those values do (a fused subgraph with several results, K and V caches
    and q: ``anchor`` is then the last equation producing one of them, so every input is
    computed before it, and the rewrite checks that no equation reads a result earlier)."""

    anchor: int
    inputs: list  # atoms read from the graph
    fn: Callable[..., list]
    outs: Optional[list] = None  # the Values fn returns; None: the anchor's outputs


@dataclass
class Graph:
    invars: list
    outvars: list
    nodes: list
    consts: dict = field(default_factory=dict)  # Var -> concrete value
    producer: dict = field(default_factory=dict)  # Var -> (Node, out index)
    users: dict = field(default_factory=dict)  # Var -> [Node]
    _folded: dict = field(default_factory=dict)
    _foldable: set = field(default_factory=set)

    @classmethod
    def from_jaxpr(cls, closed: ClosedJaxpr) -> "Graph":
        nodes: list[Node] = []
        consts: dict = {}

        def resolve(env, a):
            return a if isinstance(a, Literal) else env[a]

        def walk(jaxpr, env):
            for eqn in jaxpr.eqns:
                ins = [resolve(env, a) for a in eqn.invars]
                inner = eqn.params.get("jaxpr") if eqn.primitive.name in _CALLS else None
                if isinstance(inner, ClosedJaxpr):
                    sub = dict(zip(inner.jaxpr.invars, ins))
                    for v, c in zip(inner.jaxpr.constvars, inner.consts):
                        sub[v] = Value(v.aval)
                        consts[sub[v]] = c
                    walk(inner.jaxpr, sub)
                    for o, io in zip(eqn.outvars, inner.jaxpr.outvars):
                        env[o] = resolve(sub, io)
                    continue
                outs = [Value(o.aval) for o in eqn.outvars]
                env.update(zip(eqn.outvars, outs))
                nodes.append(Node(len(nodes), eqn.primitive, dict(eqn.params), ins, outs, eqn.effects,
                                  getattr(eqn, "ctx", None)))

        env = {v: Value(v.aval) for v in list(closed.jaxpr.constvars) + list(closed.jaxpr.invars)}
        consts.update((env[v], c) for v, c in zip(closed.jaxpr.constvars, closed.consts))
        walk(closed.jaxpr, env)
        g = cls([env[v] for v in closed.jaxpr.invars], [resolve(env, o) for o in closed.jaxpr.outvars], nodes,
                consts)
        foldable = set(consts)
        for n in nodes:
            if not _has_subjaxpr(n) and not n.effects and n.name not in _RANDOM and \
                    all(isinstance(a, Literal) or a in foldable for a in n.ins):
                foldable.update(n.outs)
            for i, o in enumerate(n.outs):
                g.producer[o] = (n, i)
            for a in n.ins:
                if isinstance(a, Value):
                    g.users.setdefault(a, []).append(n)
        g._foldable = foldable
        return g

    # ---------------------------------------------------------------- queries
    def prod(self, a) -> Optional[Node]:
        """The node computing ``a`` (None for inputs, constants, literals)."""
        if isinstance(a, Literal):
            return None
        p = self.producer.get(a)
        return p[0] if p else None

    def op(self, a, *names) -> Optional[Node]:
        """The producer of ``a`` when it is one of ``names``."""
        n = self.prod(a)
        return n if n is not None and n.name in names else None

    def uses(self, a) -> list:
        return self.users.get(a, [])

    def only_user(self, a) -> Optional[Node]:
        us = self.uses(a)
        return us[0] if len(us) == 1 and a not in self.outvars else None

    def peel(self, a, names=("convert_element_type", "broadcast_in_dim", "reshape", "squeeze",
                             "expand_dims", "stop_gradient")) -> tuple:
        """Follow ``a`` back through single-operand ops of ``names``: (root, nodes passed)."""
        passed = []
        while True:
            n = self.op(a, *names)
            if n is None:
                return a, passed
            passed.append(n)
            a = n.ins[0]

    def const(self, a) -> Optional[np.ndarray]:
        """The concrete value of ``a`` when it depends on constants only, else None."""
        if isinstance(a, Literal):
            return np.asarray(a.val)
        if a in self.consts:
            return np.asarray(self.consts[a])
        if a in self._folded:
            return self._folded[a]
        if a not in self._foldable:
            return None
        n = self.prod(a)
        val = None
        if n is not None:
            ins = [self.const(x) for x in n.ins]
            if all(x is not None for x in ins):
                with jax.ensure_compile_time_eval():
                    outs = n.prim.bind(*[jax.numpy.asarray(x) for x in ins], **n.params)
                outs = outs if n.prim.multiple_results else [outs]
                for o, v in zip(n.outs, outs):
                    self._folded[o] = np.asarray(v)
                val = self._folded[a]
        self._folded[a] = val
        return val

    # ------------------------------------------------------------- evaluation
    def run(self, args: list, replacements: dict) -> list:
        """Evaluate with ``replacements`` (anchor index -> Replacement); equations no
        output depends on are not run."""
        live = self._live(replacements)
        env: dict = dict(zip(self.invars, args))
        env.update(self.consts)

        def read(a):
            return a.val if isinstance(a, Literal) else env[a]

        for n in self.nodes:
            if n.idx not in live:
                continue
            rep = replacements.get(n.idx)
            if rep is not None:
                outs = rep.fn(*[read(a) for a in rep.inputs])
            else:
                outs = _bind(n, [read(a) for a in n.ins])
                outs = outs if n.prim.multiple_results else [outs]
            for o, v in zip(_provided(n, rep), outs):
                env[o] = v
        return [read(a) for a in self.outvars]

    def _live(self, replacements: dict) -> set:
        """The equations to run. A value is needed until the (reverse) walk reaches what
        provides it: a replacement providing values of earlier equations (``outs``)
        leaves those equations dead."""
        needed = {a for a in self.outvars if isinstance(a, Value)}
        live = set()
        for n in reversed(self.nodes):
            rep = replacements.get(n.idx)
            outs = _provided(n, rep)
            if not any(o in needed for o in outs) and not _effectful(n):
                continue
            live.add(n.idx)
            needed.difference_update(outs)
            for a in (rep.inputs if rep is not None else n.ins):
                if isinstance(a, Value):
                    needed.add(a)
        return live


def _provided(n: Node, rep: Optional[Replacement]) -> list:
    """The values evaluating ``n`` (or its replacement) sets."""
    return rep.outs if rep is not None and rep.outs is not None else n.outs


def _bind(n: Node, args: list):
    # get_bind_params returns (subfuns, params) in older JAX, the params alone in newer
    bp = n.prim.get_bind_params(n.params)
    subfuns, bp = bp if isinstance(bp, tuple) else ((), bp)
    ctx = getattr(n.ctx, "manager", None)
    if ctx is None:
        return n.prim.bind(*subfuns, *args, **bp)
    with ctx:
        return n.prim.bind(*subfuns, *args, **bp)


def _has_subjaxpr(n: Node) -> bool:
    return any(isinstance(v, ClosedJaxpr) or type(v).__name__ == "Jaxpr" for v in n.params.values())


def _effectful(n: Node) -> bool:
    return bool(n.effects)
