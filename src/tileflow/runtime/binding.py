"""The calling convention of a suite kernel, derived from its tile definition.

A kernel's IR says everything a caller has to restate otherwise: its tensor arguments
(inputs, outputs, in-place views) and runtime scalars in the order of the generated
``launch(...)``, the symbolic shape of each tensor, and which sizes the shapes bind.
:func:`convention` reads that once per kernel and structural flags (``HAS_BIAS``,
``ROPE_KIND``, ... : the launch parameters that decide which arguments exist), and a
:class:`Convention` turns NAMED tensors and scalars into what a runtime launches:

- :meth:`Convention.sizes`: every size from the tensors' shapes (plus the flags and the
  sizes no given tensor has), with one-line errors for missing / unknown names, wrong
  ranks and shapes that disagree;
- :meth:`Convention.arguments`: the launch arguments in the kernel's order, outputs that
  are not given allocated by the caller's ``allocate``;
- :meth:`Convention.operands` / :meth:`Convention.shape`: the operands a functional
  runtime (a JAX primitive) takes and the shapes of what it returns.

Framework-agnostic: tensors are anything with a ``.shape``; allocation is the
runtime's. The runtimes resolve a binding once per kernel and sizes and cache it
(``tileflow.runtime.ops``): nothing here runs per call on a hot path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from tileflow.tile.ir import KernelIR


class BindingError(TypeError):
    """A kernel called with names it does not take, or without one it needs."""


class ShapeError(ValueError):
    """A kernel called with tensors whose shapes disagree with its definition."""


@dataclass(frozen=True)
class Operand:
    """A tensor argument: its name, symbolic shape (size names), IR dtype and role
    ("input", "output" or "inout")."""

    name: str
    shape: tuple
    dtype: str
    role: str


def _key(mapping: Optional[Mapping]) -> tuple:
    return tuple(sorted(mapping.items())) if mapping else ()


@dataclass(frozen=True, eq=False)
class Convention:
    """How suite kernel ``kernel`` is called at the structural ``flags``."""

    kernel: str
    flags: tuple  # sorted (name, value) pairs: the sizes that chose the arguments
    tensors: tuple  # Operand per tensor argument, in launch order
    scalars: tuple  # runtime scalar names, in launch order
    dims: tuple  # the sizes the tensor shapes bind

    @classmethod
    def from_ir(cls, ir: KernelIR, flags: Optional[Mapping] = None) -> "Convention":
        tensors = tuple(Operand(v.name, tuple(v.shape), v.dtype, v.role) for v in ir.arguments)
        return cls(ir.name, _key(flags), tensors, tuple(s.name for s in ir.scalars), tuple(ir.dims))

    # ------------------------------------------------------------------ order
    @property
    def order(self) -> tuple:
        """The positional parameters of the generated ``launch`` / ``launch_xla``
        (after ``call, empty``): tensors, then scalars."""
        return tuple(t.name for t in self.tensors) + self.scalars

    @property
    def inputs(self) -> tuple:
        """The tensors a caller must give: inputs and in-place views, in order (what a
        JAX primitive takes as operands)."""
        return tuple(t.name for t in self.tensors if t.role != "output")

    @property
    def outputs(self) -> tuple:
        """The outputs a caller may give or have allocated, in order."""
        return tuple(t.name for t in self.tensors if t.role == "output")

    @property
    def written(self) -> tuple:
        """Outputs and in-place views, in order: what a functional launch returns."""
        return tuple(t.name for t in self.tensors if t.role != "input")

    def operand(self, name: str) -> Operand:
        for t in self.tensors:
            if t.name == name:
                return t
        raise BindingError(f"tileflow: {self.kernel} has no tensor {name!r}; it takes {', '.join(self.order)}")

    def _where(self) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in self.flags)
        return f"{self.kernel}" + (f" ({flags})" if flags else "")

    # ------------------------------------------------------------------ checks
    def check_names(self, values: Mapping) -> None:
        """One-line errors for names the kernel does not take and for inputs or scalars
        that are missing (``None`` counts as not given)."""
        known = set(self.order)
        unknown = [n for n, v in values.items() if n not in known and v is not None]
        if unknown:
            raise BindingError(f"tileflow: {self._where()} takes no {', '.join(map(repr, unknown))}; "
                               f"its arguments are {', '.join(self.order)}")
        missing = [n for n in self.inputs + self.scalars if values.get(n) is None]
        if missing:
            raise BindingError(f"tileflow: {self._where()} is missing {', '.join(map(repr, missing))}; "
                               f"its arguments are {', '.join(self.order)}")
        for n in self.scalars:
            if hasattr(values[n], "shape") and len(values[n].shape):
                raise BindingError(f"tileflow: {self._where()}: scalar {n!r} is a tensor of shape "
                                   f"{tuple(values[n].shape)}")
        for t in self.tensors:
            v = values.get(t.name)
            if v is not None and not hasattr(v, "shape"):
                raise BindingError(f"tileflow: {self._where()}: {t.name!r} must be a tensor, got {type(v).__name__}")

    def sizes(self, values: Mapping, given: Optional[Mapping] = None) -> dict:
        """Every size of the kernel from the shapes of the given tensors, with the
        flags and ``given`` (sizes that no given tensor has, such as the head count of
        an output that is allocated here). Checks names, ranks and that every shape
        agrees; raises one-line :class:`BindingError` / :class:`ShapeError`."""
        self.check_names(values)
        sizes = dict(self.flags)
        origin = {n: "the flags" for n in sizes}
        for n, v in (given or {}).items():
            sizes[n] = v
            origin[n] = "the given sizes"
        # inputs first: an output's shape is checked against them, not the other way round
        for t in sorted(self.tensors, key=lambda t: t.role == "output"):
            v = values.get(t.name)
            if v is None:
                continue
            shape = tuple(v.shape)
            if len(shape) != len(t.shape):
                raise ShapeError(f"tileflow: {self._where()}: {t.name} must have {len(t.shape)} dims "
                                 f"{_sym(t.shape)}, got shape {shape}")
            for axis, (d, n) in enumerate(zip(t.shape, shape)):
                if d not in sizes:
                    sizes[d] = n
                    origin[d] = f"{t.name}.shape[{axis}]"
                elif sizes[d] != n:
                    raise ShapeError(f"tileflow: {self._where()}: {t.name} has shape {shape}, expected "
                                     f"{d}={sizes[d]} (from {origin[d]}) at axis {axis} of {_sym(t.shape)}")
        unbound = [d for t in self.tensors for d in t.shape if d not in sizes]
        if unbound:
            raise ShapeError(f"tileflow: {self._where()}: no given tensor has the size {unbound[0]}; give it "
                             f"(sizes={{{unbound[0]!r}: ...}}) or the output that has it")
        return sizes

    def shape(self, name: str, sizes: Mapping) -> tuple:
        """The concrete shape of tensor ``name`` at ``sizes``."""
        return tuple(sizes[d] for d in self.operand(name).shape)

    # ------------------------------------------------------------------ binding
    def arguments(self, values: Mapping, sizes: Mapping, allocate: Callable[[str, tuple, str], Any]) -> list:
        """The launch arguments in the kernel's order; an output not given is
        ``allocate(name, shape, ir_dtype)``."""
        args = []
        for t in self.tensors:
            v = values.get(t.name)
            args.append(allocate(t.name, self.shape(t.name, sizes), t.dtype) if v is None else v)
        return args + [values[n] for n in self.scalars]

    def operands(self, values: Mapping) -> list:
        """The given inputs and in-place views, in the kernel's order."""
        return [values[n] for n in self.inputs]

    def scalar_values(self, values: Mapping) -> dict:
        """The runtime scalars, by name, in the kernel's order."""
        return {n: values[n] for n in self.scalars}

    def storage(self, values: Mapping):
        """The first given storage-dtype ("T") tensor: what outputs are allocated like."""
        for t in self.tensors:
            if t.dtype == "T" and values.get(t.name) is not None:
                return values[t.name]
        raise BindingError(f"tileflow: {self._where()}: no floating tensor given")

    def matches(self, ir: KernelIR) -> None:
        """Raise unless ``ir`` (the kernel built at some launch parameters) takes the same
        arguments: a definition whose arguments depend on more than its flags."""
        other = Convention.from_ir(ir)
        if other.tensors != self.tensors or other.scalars != self.scalars:
            raise RuntimeError(f"tileflow: {ir.name} at parameters {ir.params} takes {', '.join(other.order)}, "
                               f"but its convention at {self._where()} is {', '.join(self.order)}")


def _sym(shape: tuple) -> str:
    return "[" + ", ".join(shape) + "]"


def _probe_sizes(kernel, flags: Mapping) -> dict:
    """Sizes to build the kernel at for its arguments: its first test case's, less the
    case's own structural flags, with ``flags``. The arguments a definition declares
    depend on the structural flags only (``Convention.matches`` checks each launch)."""
    sizes = dict(kernel.test_cases[0].sizes)
    for k in kernel.structural_sizes(sizes):
        sizes.pop(k)
    sizes.update(flags)
    return sizes


@functools.lru_cache(maxsize=None)
def _convention(kernel: str, flags: tuple) -> Convention:
    from tileflow.suite import KERNELS

    try:
        k = KERNELS[kernel]
    except KeyError:
        raise BindingError(f"tileflow: no suite kernel {kernel!r}; known: {', '.join(sorted(KERNELS))}") from None
    ir = k.build(k.default_params(_probe_sizes(k, dict(flags))))
    return Convention.from_ir(ir, dict(flags))


def convention(kernel: str, flags: Optional[Mapping] = None) -> Convention:
    """The (cached) calling convention of suite kernel ``kernel`` at the structural
    ``flags`` (e.g. ``{"HAS_BIAS": 0}``; absent flags take the definition's defaults)."""
    return _convention(kernel, _key(flags))


@dataclass(frozen=True)
class Bound:
    """A call bound to a kernel: the convention, all sizes, the launch arguments in
    order, and the outputs (given or allocated) by name."""

    convention: Convention
    sizes: dict
    arguments: list
    outputs: dict


def bind(kernel: str, values: Mapping, flags: Optional[Mapping] = None, given: Optional[Mapping] = None,
         allocate: Optional[Callable[[str, tuple, str], Any]] = None) -> Bound:
    """Bind NAMED tensors and scalars ``values`` to suite kernel ``kernel``: the sizes
    (derived from the shapes, checked), the launch arguments in the kernel's order
    (outputs not given made by ``allocate(name, shape, ir_dtype)``; without it they must
    be given) and the outputs by name. Resolve once and cache where it runs per call."""
    conv = convention(kernel, flags)
    sizes = conv.sizes(values, given)
    made = {}

    def alloc(name, shape, dtype):
        if allocate is None:
            raise BindingError(f"tileflow: {conv._where()} is missing the output {name!r} (nothing allocates it)")
        made[name] = allocate(name, shape, dtype)
        return made[name]

    args = conv.arguments(values, sizes, alloc)
    outputs = {n: (made[n] if n in made else values[n]) for n in conv.outputs}
    return Bound(conv, sizes, args, outputs)
