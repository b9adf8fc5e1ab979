"""The tile IR: what a suite kernel is, once, independent of any target.

A kernel is a list of *stages* (one launch each, e.g. split-K partials then their
reduction). Each stage has a grid and a body of ops in SSA form. Values are either
scalars (program ids, runtime sizes, runtime parameters such as eps or the filled
cache length) or tiles (blocks whose shape is a tuple of compile-time block sizes).
Memory is reached only through views: named tensors with a symbolic shape and a
dtype. Loads and stores address rectangular blocks of a view (one scalar index or
one block range per dimension), which is the access that both Triton pointer
arithmetic and Pallas ref slicing express directly.

The IR knows nothing of torch, jax or triton; the emitters in ``tileflow.emit``
turn it into source text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

# dtype names used by views and values. "T" is the kernel's storage dtype
# (bf16 / fp16 / fp32), chosen at launch from the tensors passed in.
STORAGE = "T"
DTYPES = ("T", "f32", "i32", "i64", "bool", "u8", "f8e4m3")
FLOAT_DTYPES = ("T", "f32", "f8e4m3")
INT_DTYPES = ("i32", "i64")
# storage-only dtypes of input views (packed low-precision weights): a load widens them,
# uint8 to i32 and float8 e4m3 (torch.float8_e4m3fn) to f32, and no value has them
WIDENED = {"u8": "i32", "f8e4m3": "f32"}


@dataclass(frozen=True)
class View:
    """A tensor argument of a kernel: name, symbolic shape, dtype, role.

    ``shape`` holds size names (bound at launch from the tensors passed) or, for
    workspaces, names of kernel parameters. ``role`` is "input", "output" or
    "workspace" (an intermediate between stages, allocated by the launcher).
    """

    name: str
    shape: tuple[str, ...]
    dtype: str
    role: str
    # a workspace that outlives the launch: zero when a launch starts, and put back to
    # zero by the launch that changed it (the counters of ``TileBuilder.counter``)
    persistent: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class ScalarArg:
    """A runtime scalar parameter (eps, theta, position, filled length)."""

    name: str
    dtype: str  # "f32" or "i32"
    value_id: int = 0  # the Value that stands for it inside stage bodies


@dataclass(eq=False)
class Value:
    """An SSA value. ``shape`` is () for scalars, else a tuple of block names or 1."""

    id: int
    dtype: str
    shape: tuple
    hint: str = "v"
    builder: object = field(default=None, repr=False)

    @property
    def is_scalar(self) -> bool:
        return self.shape == ()

    # Operator overloads delegate to the builder that made the value, so kernel
    # definitions read like array code.
    def _b(self, op, other, reverse=False):
        a, b = (other, self) if reverse else (self, other)
        return self.builder.binary(op, a, b)

    def __add__(self, o):
        return self._b("add", o)

    def __radd__(self, o):
        return self._b("add", o, True)

    def __sub__(self, o):
        return self._b("sub", o)

    def __rsub__(self, o):
        return self._b("sub", o, True)

    def __mul__(self, o):
        return self._b("mul", o)

    def __rmul__(self, o):
        return self._b("mul", o, True)

    def __truediv__(self, o):
        return self._b("div", o)

    def __rtruediv__(self, o):
        return self._b("div", o, True)

    def __floordiv__(self, o):
        return self._b("floordiv", o)

    def __rfloordiv__(self, o):
        return self._b("floordiv", o, True)

    def __mod__(self, o):
        return self._b("mod", o)

    def __lt__(self, o):
        return self._b("lt", o)

    def __le__(self, o):
        return self._b("le", o)

    def __gt__(self, o):
        return self._b("gt", o)

    def __ge__(self, o):
        return self._b("ge", o)

    def __and__(self, o):
        return self._b("and", o)

    def __or__(self, o):
        return self._b("or", o)

    def __lshift__(self, o):
        return self._b("shl", o)

    def __rshift__(self, o):
        return self._b("shr", o)

    def __neg__(self):
        return self.builder.unary("neg", self)

    def __getitem__(self, key):
        """``t[:, None]`` / ``t[None, :]``: insert a unit axis (broadcasting)."""
        if not isinstance(key, tuple):
            key = (key,)
        return self.builder.reshape_index(self, key)

    __hash__ = object.__hash__


@dataclass(frozen=True)
class Range:
    """A block of consecutive indices ``start + [0, block)`` along one view dim."""

    start: Union[Value, int]
    block: str  # name of the block-size parameter


class RangeValue(Range):
    """The :class:`Range` that ``k.range(...)`` returns and load / store indices hold:
    also carries the Value of its index vector (``index``) and whether ``start`` is a
    multiple of the block size (``aligned``). Compared by identity."""

    def __init__(self, start, block, aligned, index: Value):
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "aligned", aligned)
        object.__setattr__(self, "index", index)

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


@dataclass
class Op:
    """One operation: ``result = name(*args, **attrs)``."""

    name: str
    result: Union[Value, tuple, None]
    args: tuple
    attrs: dict


@dataclass
class Loop:
    """``for start in range(lo, hi, step)`` carrying values, like scf.for."""

    index: Value
    lo: object
    hi: object
    step: object
    init: tuple  # initial carried values
    carried: tuple  # placeholders for the carried values inside the body
    body: list
    yielded: tuple = ()
    results: tuple = ()


def ops_in(seq):
    """Every op of a block, depth first: loop bodies, and the ``fallback`` block an op
    such as ``load_pick`` carries for targets that do not write it natively."""
    for op in seq:
        if isinstance(op, Loop):
            yield from ops_in(op.body)
        else:
            yield op
            if "fallback" in op.attrs:
                yield from ops_in(op.attrs["fallback"])


@dataclass
class Stage:
    """One launch: a grid (tuple of host expressions) and a body."""

    name: str
    grid: tuple[str, ...]
    body: list


@dataclass
class KernelIR:
    """A whole kernel as the emitters see it."""

    name: str
    views: list[View]
    scalars: list[ScalarArg]
    dims: list[str]  # runtime sizes, bound from the shapes of input views
    params: dict  # compile-time parameters (block sizes, split factors)
    stages: list[Stage]
    doc: str = ""

    def view(self, name: str) -> View:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def inputs(self) -> list[View]:
        return [v for v in self.views if v.role == "input"]

    @property
    def outputs(self) -> list[View]:
        """Views the kernel writes: outputs and in-place (inout) views."""
        return [v for v in self.views if v.role in ("output", "inout")]

    @property
    def arguments(self) -> list[View]:
        """The tensor arguments of ``launch``, in declaration order."""
        return [v for v in self.views if v.role != "workspace"]

    @property
    def workspaces(self) -> list[View]:
        return [v for v in self.views if v.role == "workspace"]
