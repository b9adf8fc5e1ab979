"""Writing a kernel in the tile language.

A suite kernel's ``define(k, p)`` receives a :class:`TileBuilder` ``k`` and its
compile-time parameters ``p`` and records ops; the result is a
:class:`~tileflow.tile.ir.KernelIR`. Example (the whole RMSNorm)::

    x = k.input("x", ("M", "D")); w = k.input("w", ("D",))
    out = k.output("out", ("M", "D")); eps = k.scalar("eps")
    with k.stage("main", grid=("M",)):
        row = k.program_id(0)
        cols = k.range(0, "BLOCK_D", aligned=True)
        xv = k.load(x, (row, cols))
        ...
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence, Union

from tileflow.tile.ir import (
    DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    WIDENED,
    KernelIR,
    Loop,
    Op,
    RangeValue,
    ScalarArg,
    Stage,
    Value,
    View,
)

Operand = Union[Value, int, float]

_COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
_LOGIC = ("and", "or")
_SHIFTS = ("shl", "shr")  # integer shifts (shr is arithmetic on i32: sign-extending)
UNARY = ("exp", "exp2", "log2", "rsqrt", "sqrt", "sigmoid", "cos", "sin", "neg", "abs")
REDUCTIONS = ("sum", "max", "argmax")


class TileDefinitionError(ValueError):
    """A kernel definition is malformed (shape mismatch, unknown name, ...)."""


def _broadcast(a: tuple, b: tuple) -> tuple:
    if a == ():
        return b
    if b == ():
        return a
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise TileDefinitionError(f"cannot broadcast tile shapes {a} and {b}")
    return tuple(out)


class TileBuilder:
    """Records a kernel definition into a :class:`KernelIR`."""

    def __init__(self, name: str, params: dict):
        self.name = name
        self.params = dict(params)
        self._views: list[View] = []
        self._scalars: list[ScalarArg] = []
        self._dims: list[str] = []
        self._stages: list[Stage] = []
        self._block: Optional[list] = None
        self._next_id = 0
        self._named: dict[str, Value] = {}
        self._early = False
        self._stage_body: Optional[list] = None

    # ----------------------------------------------------------------- values
    def _new(self, dtype: str, shape: tuple, hint: str = "v") -> Value:
        if dtype not in DTYPES:
            raise TileDefinitionError(f"unknown dtype {dtype!r}")
        self._next_id += 1
        return Value(self._next_id, dtype, tuple(shape), hint, self)

    def _emit(self, opname: str, result, args: tuple = (), **attrs):
        if self._block is None:
            raise TileDefinitionError(f"op {opname!r} outside of a stage")
        if self._early:
            if opname in ("load", "load_pick"):
                views = [v for _, v, _ in args[0]] if opname == "load_pick" else [args[0]]
                bad = [v.name for v in views if v.role != "input"]
                if bad:
                    raise TileDefinitionError(f"before_wait: {bad[0]} is not an input; only weights load early")
                attrs["early"] = True
            elif opname == "store":
                raise TileDefinitionError("before_wait: no store before the wait")
        self._block.append(Op(opname, result, args, attrs))
        return result

    def _operand(self, x: Operand, storage_ok: bool = False) -> Operand:
        if isinstance(x, Value):
            if x.builder is not self:
                raise TileDefinitionError("value from another kernel")
            if x.dtype == "T" and not storage_ok:
                raise TileDefinitionError("a storage-dtype tile (load(..., for_dot=True)) only feeds dot/trans/cast")
            return x
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TileDefinitionError(f"unsupported operand {x!r}")
        return x

    @staticmethod
    def _dtype_of(x: Operand) -> str:
        if isinstance(x, Value):
            return x.dtype
        return "f32" if isinstance(x, float) else "i32"

    @staticmethod
    def _shape_of(x: Operand) -> tuple:
        return x.shape if isinstance(x, Value) else ()

    # ------------------------------------------------------------- signature
    def _add_view(self, name: str, shape: Sequence[str], dtype: str, role: str, persistent: bool = False) -> View:
        if any(v.name == name for v in self._views):
            raise TileDefinitionError(f"view {name!r} declared twice")
        if dtype not in DTYPES or dtype == "bool":
            raise TileDefinitionError(f"view dtype {dtype!r}")
        if dtype in WIDENED and role != "input":
            raise TileDefinitionError(f"{name}: {dtype} views are inputs only (packed weights)")
        view = View(name, tuple(shape), dtype, role, persistent)
        self._views.append(view)
        for d in view.shape:
            if role != "workspace" and d not in self._dims and d not in self.params:
                self._dims.append(d)
        return view

    def input(self, name: str, shape: Sequence[str], dtype: str = "T") -> View:
        """A tensor the kernel reads. Size names in ``shape`` become runtime sizes."""
        return self._add_view(name, shape, dtype, "input")

    def output(self, name: str, shape: Sequence[str], dtype: str = "T") -> View:
        """A tensor the kernel writes (allocated, and poisoned in tests, by the caller)."""
        return self._add_view(name, shape, dtype, "output")

    def inout(self, name: str, shape: Sequence[str], dtype: str = "T") -> View:
        """A tensor updated in place (a KV cache): read, and partly written."""
        return self._add_view(name, shape, dtype, "inout")

    def workspace(self, name: str, shape: Sequence[str], dtype: str = "f32") -> View:
        """An intermediate between stages. Its sizes are sizes, parameters, or host
        expressions over them such as ``"cdiv(V, BLOCK_V)"``; accesses along an
        expression-sized dim must pass an explicit limit."""
        return self._workspace(name, shape, dtype, persistent=False)

    def _workspace(self, name: str, shape: Sequence[str], dtype: str, persistent: bool) -> View:
        for d in shape:
            if d not in self.params and d not in self._dims and "(" not in d:
                raise TileDefinitionError(f"workspace size {d!r} is neither a size nor a parameter")
        return self._add_view(name, shape, dtype, "workspace", persistent)

    def counter(self, name: str, shape: Sequence[str]) -> View:
        """int32 counters that outlive a launch (the launcher keeps them per device):
        zero whenever a launch starts, so a launch that counts with
        :meth:`atomic_add` must store zero back before it ends. Lets the last program
        of a group to finish see that it is last (one launch instead of a second
        stage). Triton only; launches of one kernel must not run concurrently."""
        return self._workspace(name, shape, "i32", persistent=True)

    def atomic_add(self, view: View, index: Sequence, value: int) -> Value:
        """Add ``value`` to one element of a :meth:`counter` (or of an int32 in-place view
        that the caller keeps at zero between launches) and return what it held,
        atomically, after every store this program made before it is visible to the
        program that reads the count (acquire-release at device scope)."""
        if not (view.persistent or view.role == "inout" and view.dtype == "i32"):
            raise TileDefinitionError(f"atomic_add on {view.name}: only counters (k.counter, or int32 "
                                      "in-place views the caller keeps at zero between launches)")
        index = self._check_index(view, index)
        if any(isinstance(i, RangeValue) for i in index):
            raise TileDefinitionError("atomic_add: one element (scalar indices)")
        if self._early:
            raise TileDefinitionError("before_wait: no atomic_add before the wait")
        return self._emit("atomic_add", self._new("i32", (), view.name), (view, index), value=int(value))

    def accumulate(self, view: View, index: Sequence, value: Value, limits: Optional[dict] = None,
                   when: Optional[Value] = None) -> None:
        """Add the fp32 tile ``value`` into the block of the fp32 in-place ``view`` at
        ``index``, atomically per element and in no particular order: the programs of one
        launch sum their partial results into one buffer without a second stage. The
        caller hands the buffer in at zero; the program that finds itself last (an
        :meth:`atomic_add` count) reads the sums (past L1) and stores zero back. The sum's
        order varies from run to run (fp32 rounding only). Triton only."""
        if view.role != "inout" or view.dtype != "f32":
            raise TileDefinitionError(f"accumulate on {view.name}: only fp32 in-place views (accumulators)")
        index = self._check_index(view, index)
        shape = tuple(i.block for i in index if isinstance(i, RangeValue))
        value = self._operand(value)
        if self._shape_of(value) != shape:
            raise TileDefinitionError(f"accumulating a {self._shape_of(value)} tile into a {shape} block of {view.name}")
        if self._early:
            raise TileDefinitionError("before_wait: no accumulate before the wait")
        self._emit("accumulate", None, (view, index, value), limits=dict(limits or {}), when=self._guard(when))

    def signal(self, view: View, index: Sequence, value: Operand) -> None:
        """Add ``value`` to one int32 element of the in-place ``view`` (a ready counter the
        caller owns) after every store this program made, with release semantics at
        device scope: a program of a *later* launch that sees the count with
        :meth:`wait_ready` sees those stores. Lets that launch skip the dependent-launch
        wait and start on each chunk of this one's output as soon as it is complete."""
        if view.role != "inout" or view.dtype != "i32":
            raise TileDefinitionError(f"signal on {view.name}: only int32 in-place views (ready counters)")
        index = self._check_index(view, index)
        if any(isinstance(i, RangeValue) for i in index):
            raise TileDefinitionError("signal: one element (scalar indices)")
        if self._early:
            raise TileDefinitionError("before_wait: no signal before the wait")
        self._emit("signal", None, (view, index, self._operand(value)))

    def wait_ready(self, view: View, lo: Operand, hi: Operand, chunk: Operand, total: Operand,
                   rows: Operand, guards: View) -> None:
        """Wait until every chunk ``c`` of ``chunk`` elements that overlaps ``[lo, hi)`` is
        complete: ``view[c] >= rows * min(chunk, total - c * chunk)`` (what the producer's
        :meth:`signal` calls add up to once they all ran). A stage that waits this way
        does not wait for the whole previous launch (no ``gdc_wait``): the definition
        vouches that ``guards`` is the only input the launch just before writes, and
        loads ``guards`` only after the wait that covers it (they read past L1). Triton
        only: the programs of the two launches must run concurrently, or one after the
        other in order (the interpreter)."""
        if view.role != "input" or view.dtype != "i32" or view.rank != 1:
            raise TileDefinitionError(f"wait_ready on {view.name}: only a 1-D int32 input (ready counters)")
        if self._early:
            raise TileDefinitionError("before_wait: no wait_ready before the wait")
        args = tuple(self._operand(a) for a in (lo, hi, chunk, total, rows))
        self._emit("wait_ready", None, (view, *args), guards=guards.name)

    def scalar(self, name: str, dtype: str = "f32") -> Value:
        """A runtime scalar parameter: never baked into the generated source."""
        if dtype not in ("f32", "i32"):
            raise TileDefinitionError("runtime scalars are f32 or i32")
        if any(s.name == name for s in self._scalars):
            raise TileDefinitionError(f"scalar {name!r} declared twice")
        v = self._new(dtype, (), name)
        self._scalars.append(ScalarArg(name, dtype, v.id))
        self._named[name] = v
        return v

    # ------------------------------------------------------------- structure
    @contextlib.contextmanager
    def stage(self, name: str, grid: Sequence[str]):
        """One launch. ``grid`` entries are host expressions over sizes and parameters
        (``cdiv`` is available), e.g. ``("cdiv(N, BLOCK_N)", "M")``."""
        if self._block is not None:
            raise TileDefinitionError("stages do not nest")
        stage = Stage(name, tuple(grid), [])
        self._block = self._stage_body = stage.body
        try:
            yield stage
        finally:
            self._block = None
        self._stages.append(stage)

    def dim(self, name: str) -> Value:
        """The runtime size ``name`` as a scalar (a kernel argument in Triton,
        a static int in Pallas)."""
        if name not in self._dims:
            raise TileDefinitionError(f"unknown size {name!r}")
        return self._emit("dim", self._new("i32", (), name), name=name)

    def param(self, name: str) -> Value:
        """A compile-time parameter (block size, split factor) as a scalar."""
        if name not in self.params:
            raise TileDefinitionError(f"unknown parameter {name!r}")
        return self._emit("param", self._new("i32", (), name), name=name)

    def arg(self, name: str) -> Value:
        """A declared runtime scalar, by name."""
        return self._named[name]

    def program_id(self, axis: int) -> Value:
        return self._emit("program_id", self._new("i32", (), "pid"), axis=axis)

    def range(self, start: Operand, block: str, aligned: bool = False) -> RangeValue:
        """Indices ``start + [0, block)``. ``aligned`` promises ``start`` is a multiple
        of the block size (lets the Pallas launcher skip a pad)."""
        if block not in self.params:
            raise TileDefinitionError(f"block size {block!r} is not a parameter")
        start = self._operand(start)
        idx = self._emit("range", self._new("i32", (block,), "idx"), (start,), block=block)
        return RangeValue(start, block, aligned, idx)

    def full(self, shape: Sequence, value: float, dtype: str = "f32") -> Value:
        for s in shape:
            if not (s == 1 or s in self.params):
                raise TileDefinitionError(f"tile size {s!r} must be a parameter name or 1")
        return self._emit("full", self._new(dtype, tuple(shape), "t"), (), value=value, dtype=dtype)

    # ------------------------------------------------------------ arithmetic
    def binary(self, op: str, a: Operand, b: Operand) -> Value:
        a, b = self._operand(a), self._operand(b)
        shape = _broadcast(self._shape_of(a), self._shape_of(b))
        da, db = self._dtype_of(a), self._dtype_of(b)
        ints = da in INT_DTYPES and db in INT_DTYPES
        if op in _SHIFTS and not ints:
            raise TileDefinitionError(f"{op} takes integer operands, got {da} and {db}")
        if op in _COMPARE or op in _LOGIC and not ints:
            dtype = "bool"
        elif "f32" in (da, db) or op == "div":
            dtype = "f32"
        elif "i64" in (da, db):
            dtype = "i64"
        else:
            dtype = "i32"
        return self._emit("binary", self._new(dtype, shape), (a, b), op=op)

    def maximum(self, a: Operand, b: Operand) -> Value:
        return self.binary("maximum", a, b)

    def minimum(self, a: Operand, b: Operand) -> Value:
        return self.binary("minimum", a, b)

    def eq(self, a: Operand, b: Operand) -> Value:
        return self.binary("eq", a, b)

    def cdiv(self, a: Operand, b: Operand) -> Value:
        return (a + b - 1) // b if isinstance(a, Value) else self.binary("floordiv", a + b - 1, b)

    def unary(self, op: str, a: Value) -> Value:
        if op not in UNARY:
            raise TileDefinitionError(f"unknown unary op {op!r}")
        a = self._operand(a)
        dtype = a.dtype if op in ("neg", "abs") else "f32"
        return self._emit("unary", self._new(dtype, self._shape_of(a)), (a,), op=op)

    def exp(self, a):
        return self.unary("exp", a)

    def exp2(self, a):
        return self.unary("exp2", a)

    def log2(self, a):
        return self.unary("log2", a)

    def rsqrt(self, a):
        return self.unary("rsqrt", a)

    def sigmoid(self, a):
        return self.unary("sigmoid", a)

    def cos(self, a):
        return self.unary("cos", a)

    def sin(self, a):
        return self.unary("sin", a)

    def bitcast(self, a: Value, dtype: str) -> Value:
        """The bits of an f32 tile as i32, or of an i32 tile as f32 (exact float
        manipulation: rounding to a narrower format with integer adds and masks)."""
        a = self._operand(a)
        pair = {("f32", "i32"), ("i32", "f32")}
        if not isinstance(a, Value) or (a.dtype, dtype) not in pair:
            raise TileDefinitionError(f"bitcast from {self._dtype_of(a)} to {dtype!r}: only f32 <-> i32")
        return self._emit("bitcast", self._new(dtype, a.shape), (a,), dtype=dtype)

    def cast(self, a: Value, dtype: str) -> Value:
        """Cast to f32 / i32 / i64 (storage casts happen only on store)."""
        if dtype not in ("f32", "i32", "i64"):
            raise TileDefinitionError(f"cast to {dtype!r}")
        a = self._operand(a, storage_ok=True)
        return self._emit("cast", self._new(dtype, a.shape), (a,), dtype=dtype)

    def where(self, cond: Value, a: Operand, b: Operand) -> Value:
        a, b = self._operand(a), self._operand(b)
        shape = _broadcast(_broadcast(cond.shape, self._shape_of(a)), self._shape_of(b))
        dtype = "f32" if "f32" in (self._dtype_of(a), self._dtype_of(b)) else self._dtype_of(a)
        return self._emit("where", self._new(dtype, shape), (cond, a, b))

    def reshape_index(self, a: Value, key: tuple) -> Value:
        shape, it = [], iter(a.shape)
        for k in key:
            if k is None:
                shape.append(1)
            elif k == slice(None):
                try:
                    shape.append(next(it))
                except StopIteration:
                    raise TileDefinitionError("too many ':' in index") from None
            else:
                raise TileDefinitionError("only ':' and None may index a tile")
        if next(it, None) is not None:
            raise TileDefinitionError("index must name every axis of the tile")
        return self._emit("expand", self._new(a.dtype, tuple(shape)), (a,), key=key)

    def reshape(self, a: Value, shape: Sequence) -> Value:
        """The elements of ``a`` in row-major order under another tile shape (block-size
        names or 1) of the same size: a [ROWS_BLOCK, HEADS_BLOCK, BLOCK_DH] load whose
        rows are not one range of the view becomes one [GROUP_BLOCK, BLOCK_DH] dot operand."""
        a = self._operand(a, storage_ok=True)
        if not isinstance(a, Value):
            raise TileDefinitionError("reshape needs a tile")

        def size(sh):
            n = 1
            for s in sh:
                if s != 1 and s not in self.params:
                    raise TileDefinitionError(f"tile size {s!r} must be a parameter name or 1")
                n *= 1 if s == 1 else int(self.params[s])
            return n

        if not a.shape or size(a.shape) != size(shape):
            raise TileDefinitionError(f"cannot reshape a {a.shape} tile to {tuple(shape)}")
        return self._emit("reshape", self._new(a.dtype, tuple(shape)), (a,))

    def _reduce(self, op: str, a: Value, axis: int) -> Value:
        if not a.shape:
            raise TileDefinitionError("cannot reduce a scalar")
        axis = axis % len(a.shape)
        shape = a.shape[:axis] + a.shape[axis + 1:]
        dtype = "i32" if op == "argmax" else a.dtype
        return self._emit("reduce", self._new(dtype, shape), (a,), op=op, axis=axis)

    def sum(self, a: Value, axis: int) -> Value:
        return self._reduce("sum", a, axis)

    def max(self, a: Value, axis: int) -> Value:
        return self._reduce("max", a, axis)

    def argmax(self, a: Value, axis: int) -> Value:
        """Index of the largest element; ties go to the lowest index (torch.argmax)."""
        return self._reduce("argmax", a, axis)

    def dot(self, a: Value, b: Value) -> Value:
        """``a @ b`` for 2-D tiles, fp32 accumulation, exact for bf16/fp16-valued inputs."""
        a, b = self._operand(a, storage_ok=True), self._operand(b, storage_ok=True)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise TileDefinitionError(f"dot of {a.shape} and {b.shape}")
        return self._emit("dot", self._new("f32", (a.shape[0], b.shape[1])), (a, b))

    def trans(self, a: Value) -> Value:
        a = self._operand(a, storage_ok=True)
        if len(a.shape) != 2:
            raise TileDefinitionError("trans needs a 2-D tile")
        return self._emit("trans", self._new(a.dtype, (a.shape[1], a.shape[0])), (a,))

    # ----------------------------------------------------------------- memory
    def _check_index(self, view: View, index: Sequence) -> tuple:
        if len(index) != view.rank:
            raise TileDefinitionError(f"{view.name} has rank {view.rank}, index has {len(index)}")
        return tuple(i if isinstance(i, RangeValue) else self._operand(i) for i in index)

    def load(self, view: View, index: Sequence, limits: Optional[dict] = None,
             other: float = 0.0, hint: str = "", for_dot: bool = False,
             when: Optional[Value] = None) -> Value:
        """Load the block of ``view`` at ``index`` (one scalar or range per dim).

        Elements whose range index is ``>=`` the limit of that dim (the view's size
        unless ``limits`` names another, e.g. the filled cache length) read ``other``.
        Floating values arrive as fp32 whatever the storage dtype, except with
        ``for_dot``: then a storage-dtype tile comes back that may only feed
        :meth:`dot` / :meth:`trans` (tensor cores take bf16/fp16 as stored; the
        products are exact and accumulate in fp32). Packed-weight views widen: uint8
        ("u8") arrives as i32, float8 e4m3 ("f8e4m3") as f32.

        ``when`` (a scalar bool) reads nothing unless it holds (``other`` instead):
        a program that serves one of several views by its program id reads only
        its own; the index must still lie inside the view.
        """
        index = self._check_index(view, index)
        shape = tuple(i.block for i in index if isinstance(i, RangeValue))
        if for_dot and view.dtype == "T":
            dtype = "T"
        elif view.dtype in WIDENED:
            dtype = WIDENED[view.dtype]
        else:
            dtype = "f32" if view.dtype in FLOAT_DTYPES else view.dtype
        res = self._new(dtype, shape, hint or view.name)
        return self._emit("load", res, (view, index), limits=dict(limits or {}), other=other,
                          when=self._guard(when))

    def store(self, view: View, index: Sequence, value: Operand,
              limits: Optional[dict] = None, when: Optional[Value] = None) -> None:
        """Store ``value`` (cast to the view's dtype) into the block at ``index``;
        with ``when`` (a scalar bool) only if it holds. Unlike a limit of 0, ``when``
        leaves the block untouched on every target (Pallas would otherwise write
        the old values back, racing the program that owns the block)."""
        index = self._check_index(view, index)
        shape = tuple(i.block for i in index if isinstance(i, RangeValue))
        value = self._operand(value)
        vshape = self._shape_of(value)
        if vshape != shape:
            raise TileDefinitionError(f"storing a {vshape} tile into a {shape} block of {view.name}")
        self._emit("store", None, (view, index, value), limits=dict(limits or {}), when=self._guard(when))

    def load_pick(self, picks: Sequence[tuple], index: Sequence, limits: dict) -> Value:
        """Load the block at ``index`` of one of several inputs chosen at run time.

        ``picks`` is ``((cond, view, row_offset), ...)``: scalar-bool conditions of which
        exactly one holds, and the offset of the chosen view's rows (axis 0 of
        ``index``, which is relative to it). The views must share rank, dtype, the sizes
        of every axis but the first, and (checked at launch) their strides. ``limits``
        must bound axis 0 (relative); reads past a limit give 0.

        Triton selects the base pointer, so one load is issued where predicated loads
        of every view would issue one each (a program of qkv_rope_cache serves q, k or
        v by its program id); other targets run the ``fallback`` the op carries: each
        view read under its condition, the reads summed.
        """
        picks = [(self._guard(c), v, self._operand(off)) for c, v, off in picks]
        first = picks[0][1]
        for c, v, _ in picks:
            if c is None:
                raise TileDefinitionError("load_pick: every pick needs its condition")
            if v.role != "input" or (v.rank, v.dtype, v.shape[1:]) != (first.rank, first.dtype, first.shape[1:]):
                raise TileDefinitionError(f"load_pick: {v.name} is not an input shaped like {first.name}")
        if 0 not in (limits or {}):
            raise TileDefinitionError("load_pick: axis 0 needs a (relative) limit")
        index = self._check_index(first, index)
        rel = index[0]
        parent, fallback = self._block, []
        self._block = fallback
        try:
            total = None
            for c, v, off in picks:
                if isinstance(rel, RangeValue):
                    row = self.range(off if isinstance(rel.start, int) and rel.start == 0 else rel.start + off, rel.block)
                else:
                    row = rel + off
                part = self.load(v, (row,) + tuple(index[1:]), limits={**limits, 0: limits[0] + off}, when=c)
                total = part if total is None else total + part
        finally:
            self._block = parent
        shape = tuple(i.block for i in index if isinstance(i, RangeValue))
        res = self._new("f32", shape, first.name)
        return self._emit("load_pick", res, (tuple(picks), index), limits=dict(limits),
                          fallback=fallback, fallback_result=total)

    def prefetch(self, view: View, index: Sequence) -> None:
        """A hint: bring the block of the input ``view`` at ``index`` into L2 before the
        program waits for the kernel before it (programmatic dependent launch), so a
        weight stream starts while the predecessor drains. Only for views no earlier
        kernel of the step writes (model weights); reads no value, changes no result.
        Targets without dependent launch ignore it."""
        if view.role != "input":
            raise TileDefinitionError(f"prefetch of {view.name}: only inputs are prefetched")
        index = self._check_index(view, index)
        if not index or not isinstance(index[-1], RangeValue):
            raise TileDefinitionError("prefetch: the last index must be a range (lines along the row)")
        self._emit("prefetch", None, (view, index))

    def launch_dependents(self) -> None:
        """A hint: the next launch's programs may start from here on (programmatic
        dependent launch) instead of right after this stage's wait. For a stage whose
        early part should have the memory system to itself, e.g. a one-launch attention
        whose last program combines the splits: the next kernel's programs arrive only
        once every program has passed this point. At a stage's top level, after the
        wait; targets without dependent launch ignore it, and results never change."""
        if self._block is None or self._block is not self._stage_body:
            raise TileDefinitionError("launch_dependents: only at a stage's top level, outside loops")
        if self._early:
            raise TileDefinitionError("launch_dependents: not before the wait")
        if any(op.name == "launch_dependents" for op in self._stage_body if not isinstance(op, Loop)):
            raise TileDefinitionError("launch_dependents: once a stage")
        self._emit("launch_dependents", None)

    @contextlib.contextmanager
    def before_wait(self):
        """Loads recorded inside may be issued before the program waits for the kernel
        before it (programmatic dependent launch), so a weight stream starts while the
        predecessor drains instead of after it. Only for inputs the kernel just before
        does not write: model weights, which the definition vouches for, or tensors
        written two or more kernels back where the caller vouches for the order (a
        kernel launched early starts only once its predecessor passed its own wait, so
        everything before that predecessor is complete and visible); only loads, never
        stores. Results are the same on every target; Triton places these loads
        ahead of ``gdc_wait`` when they precede the stage's first other memory access."""
        if self._block is None or self._block is not self._stage_body:
            raise TileDefinitionError("before_wait: only at a stage's top level, before its loops")
        self._early = True
        try:
            yield
        finally:
            self._early = False

    def _guard(self, when: Optional[Value]) -> Optional[Value]:
        if when is not None and (not isinstance(when, Value) or when.shape != () or when.dtype != "bool"):
            raise TileDefinitionError("when= takes a scalar bool value")
        return when

    # ------------------------------------------------------------------ loops
    @contextlib.contextmanager
    def loop(self, lo: Operand, hi: Operand, step: Union[str, int], carry: Iterable[Value]):
        """``for start in range(lo, hi, step)`` carrying ``carry``.

        Inside, ``lp.index`` is ``start`` and ``lp.carry`` the carried values; call
        ``lp.next(*new_values)`` once; after the block, ``lp.results`` holds the
        values at loop exit.
        """
        carry = tuple(carry)
        step_v = self.param(step) if isinstance(step, str) else step
        index = self._new("i32", (), "start")
        placeholders = tuple(self._new(c.dtype, c.shape, "c") for c in carry)
        loop = Loop(index, self._operand(lo), self._operand(hi), step_v, carry, placeholders, [])
        handle = _LoopHandle(loop)
        parent = self._block
        self._block = loop.body
        try:
            yield handle
        finally:
            self._block = parent
        if len(loop.yielded) != len(carry):
            raise TileDefinitionError("loop body must call lp.next() with every carried value")
        for c, y in zip(carry, loop.yielded):
            if (c.dtype, c.shape) != (y.dtype, y.shape):
                raise TileDefinitionError(f"carried value changes from {c.dtype}{c.shape} to {y.dtype}{y.shape}")
        loop.results = tuple(self._new(c.dtype, c.shape, "r") for c in carry)
        self._block.append(loop)
        handle.results = loop.results

    # ---------------------------------------------------------------- result
    def finish(self, doc: str = "") -> KernelIR:
        if not self._stages:
            raise TileDefinitionError("a kernel needs at least one stage")
        return KernelIR(self.name, list(self._views), list(self._scalars), list(self._dims),
                        dict(self.params), list(self._stages), doc)


class _LoopHandle:
    def __init__(self, loop: Loop):
        self._loop = loop
        self.index = loop.index
        self.carry = loop.carried
        self.results: tuple = ()

    def next(self, *values: Value) -> None:
        self._loop.yielded = tuple(values)
