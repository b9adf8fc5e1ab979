"""Tile IR -> Triton source (NVIDIA and AMD GPUs; the Triton interpreter on CPU).

The output is one self-contained module: one ``@triton.jit`` function per stage and
a ``launch(*inputs, *outputs, *scalars)`` that checks shapes and dtypes, allocates
workspaces, computes grids and launches every stage in order.

Two interpreter facts shape the text (seen with triton 3.9's ``TRITON_INTERPRET=1``):
bf16 arithmetic is wrong unless values are cast to fp32 right after loading, so
every floating load ends in ``.to(tl.float32)`` (also the fp32-accumulation
policy of the suite), and tiles kept in bf16 for a tensor-core dot are upcast under
``if UPCAST:`` (a constexpr the launcher sets in interpreter mode only, so one text
serves both); and float runtime scalars arrive as Python floats, which have no
tensor methods, so each is wrapped with ``tl.full((), x, tl.float32)`` at entry.

On Hopper and newer, kernels are launched with programmatic dependent launch: each
may start while its predecessor drains, and waits (``gdc_wait``) before touching
memory, so every kernel still sees all earlier writes (``launch(..., pdl=False)`` turns
it off; the launchers pass the option ``pdl``). Weight loads a definition marks
``k.before_wait()`` are issued before that wait when they come first in a stage (the
``EARLY`` constexpr: on whenever dependent launch is). Index arithmetic and a
definition's weight prefetches (``k.prefetch``: L2 hints for inputs no earlier kernel
writes; qkv_rope_cache has them, the matvecs measured slower with them) run before that
wait (the ``PREFETCH`` constexpr, likewise on with dependent launch). Each program lets
the next launch in (``gdc_launch_dependents``) right after its wait; with the launch
parameter ``LAUNCH_AT_START`` (absent: 0; set by the caller, never by a tuning table)
it does so as its first statement instead, so the next launch may start while this one
still waits for the launch before it: that next launch may then load only step
constants before its own wait (the caller's rule: no ``EARLY_INPUTS`` after it).

The launchers are built once per kernel and device; what they take from the process
(interpreter mode, the ``pdl`` option) comes in as arguments of ``launch`` /
``launch_xla``, so the generated module reads no environment.
"""

from __future__ import annotations

from tileflow.emit.walker import INFIX, Walker, Writer, expand_key, literal
from tileflow.tile.ir import FLOAT_DTYPES, WIDENED, KernelIR, Loop, Op, RangeValue, Stage, ops_in

LAUNCH_OPTIONS = ("num_warps", "num_stages")

_UNARY = {
    "exp": "tl.exp({})", "exp2": "tl.exp2({})", "log2": "tl.log2({})", "rsqrt": "tl.rsqrt({})",
    "sqrt": "tl.sqrt({})", "sigmoid": "tl.sigmoid({})", "cos": "tl.cos({})", "sin": "tl.sin({})",
    "neg": "-({})", "abs": "tl.abs({})",
}
_BINARY = {**INFIX, "maximum": "tl.maximum({}, {})", "minimum": "tl.minimum({}, {})"}
_TL_DTYPE = {"f32": "tl.float32", "i32": "tl.int32", "i64": "tl.int64"}
_TORCH_DTYPE = {"f32": "torch.float32", "i32": "torch.int32", "i64": "torch.int64"}


# The fixed part of every generated Triton module, after its banner.
_PRELUDE = '''import torch
import triton
import triton.language as tl


def cdiv(a, b):
    return (a + b - 1) // b


_PDL_LAUNCH = {"launch_pdl": True}
_PDL_DEVICES = {}
_COUNTERS = {}


def _counters(name, shape, device):
    """A kernel's persistent int32 counters: zeroed once, put back to zero by each launch."""
    key = (name, shape, device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(shape, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _rowmajor(shape):
    """Element strides of a contiguous row-major array (what XLA hands a custom call)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def _strides(t, shape):
    """Element strides: a torch tensor's own (it may be a view), else row-major (XLA's arrays)."""
    return list(t.stride()) if hasattr(t, "stride") else _rowmajor(shape)


def _use_pdl(t, pdl, interpret):
    """Programmatic dependent launch: Hopper or newer, compiled, not turned off (``pdl``)."""
    if not pdl or interpret or not t.is_cuda:
        return False
    if t.device.index not in _PDL_DEVICES:
        _PDL_DEVICES[t.device.index] = torch.cuda.get_device_capability(t.device)[0] >= 9
    return _PDL_DEVICES[t.device.index]


'''

class TritonEmitter(Walker):
    target = "triton"
    ns, iota, binary, unary, dtypes = "tl", "tl.arange(0, {})", _BINARY, _UNARY, _TL_DTYPE
    dot, cast_like = "tl.dot({}, {}, input_precision=DOT_PREC)", "{}.to({}.dtype)"

    def constexprs(self) -> list[str]:
        names = [k for k in sorted(self.ir.params) if k not in LAUNCH_OPTIONS]
        if self.uses("dot"):
            names += ["DOT_PREC", "UPCAST"]
        return (names + ["USE_PDL"] + (["PREFETCH"] if self.uses("prefetch") else [])
                + (["EARLY"] if self._uses_early() else []))

    def signature(self) -> list[str]:
        args = [f"{v.name}_ptr" for v in self.ir.views]
        args += [f"{v.name}_s{a}" for v in self.ir.views for a in range(v.rank)]
        args += list(self.ir.dims)
        args += [s.name for s in self.ir.scalars]
        return args

    # ops ------------------------------------------------------------------
    def op_program_id(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = tl.program_id({op.attrs['axis']})")

    def op_cast(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = tl.cast({self.operand(op.args[0])}, {_TL_DTYPE[op.attrs['dtype']]})")

    def op_bitcast(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = {self.operand(op.args[0])}.to({_TL_DTYPE[op.attrs['dtype']]}, bitcast=True)")

    def op_reduce(self, op: Op, w: Writer):
        a, axis, kind = self.operand(op.args[0]), op.attrs["axis"], op.attrs["op"]
        extra = ", tie_break_left=True" if kind == "argmax" else ""
        w(f"{self.name(op.result)} = tl.{kind}({a}, axis={axis}{extra})")

    def op_trans(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = tl.trans({self.operand(op.args[0])})")

    def _address(self, view, index, range_expr=None, base: str = "") -> str:
        """Pointer tile of ``view`` at ``index``; ``range_expr(axis, range)`` may give
        another index expression for a range axis (the prefetch's line addresses), and
        ``base`` another base pointer with the view's strides (a picked one)."""
        ranges = [i for i in index if isinstance(i, RangeValue)]
        terms, pos = [], 0
        for axis, i in enumerate(index):
            if isinstance(i, RangeValue):
                expr = range_expr(axis, i) if range_expr else self.name(i.index)
                terms.append(f"{expr}{expand_key(pos, len(ranges))} * {view.name}_s{axis}")
                pos += 1
            elif not (isinstance(i, int) and i == 0):
                terms.append(f"{self.operand(i)} * {view.name}_s{axis}")
        return f"{base or view.name + '_ptr'} + " + (" + ".join(terms) if terms else "0")

    def _guarded(self, mask: str, op: Op) -> str:
        when = op.attrs.get("when")
        if when is None:
            return mask
        # "!= 0": the triton 3.9 interpreter turns scalar-bool & block-bool into int32,
        # which it then refuses as a mask
        return f"(({self.operand(when)}) & {mask}) != 0" if mask else self.operand(when)

    def op_atomic_add(self, op: Op, w: Writer):
        view, index = op.args
        # the barrier first: every thread's earlier stores happen before the one atomic
        # (acq_rel at device scope), which releases them to the program that counts last
        w("tl.debug_barrier()")
        w(f'{self.name(op.result)} = tl.atomic_add({self._address(view, index)}, {op.attrs["value"]}, '
          'sem="acq_rel", scope="gpu")')

    def op_accumulate(self, op: Op, w: Writer):
        view, index, value = op.args
        mask = self._guarded(self.mask_expr(view, index, op.attrs["limits"]), op)
        extra = f", mask={mask}" if mask else ""
        # relaxed: the count that says a program is last (atomic_add, acq_rel after a
        # barrier) orders every program's adds before the last one reads the sums
        w(f'tl.atomic_add({self._address(view, index)}, {self.operand(value)}{extra}, sem="relaxed", scope="gpu")')

    def op_signal(self, op: Op, w: Writer):
        view, index, value = op.args
        # the barrier first: every thread's stores happen before the one release
        w("tl.debug_barrier()")
        w(f'tl.atomic_add({self._address(view, index)}, {self.operand(value)}, sem="release", scope="gpu")')

    def op_launch_dependents(self, op: Op, w: Writer):
        if self._at_start():
            w("pass  # k.launch_dependents: let in at the program's start (LAUNCH_AT_START)")
            return
        w("if USE_PDL:  # from here the next launch's programs may start (k.launch_dependents)")
        with w.indent():
            w("tl.extra.cuda.gdc_launch_dependents()")

    def op_wait_ready(self, op: Op, w: Writer):
        view, lo, hi, chunk, total, rows = (op.args[0], *(self.operand(a) for a in op.args[1:]))
        c = f"chunk_c{self._stage_ops.index(op)}"
        w(f"for {c} in range(({lo}) // ({chunk}), tl.cdiv({hi}, {chunk})):")
        with w.indent():
            need = f"({rows}) * tl.minimum({chunk}, ({total}) - {c} * ({chunk}))"
            # an atomic that adds nothing: an acquire load the compiler cannot hoist
            w(f'while tl.atomic_add({view.name}_ptr + {c} * {view.name}_s0, 0, sem="acquire", scope="gpu") < {need}:')
            with w.indent():
                w("pass")

    def op_load(self, op: Op, w: Writer):
        view, index = op.args
        mask = self._guarded(self.mask_expr(view, index, op.attrs["limits"]), op)
        extra = f", mask={mask}, other={literal(op.attrs['other'])}" if mask else ""
        if (view.role == "workspace" and not view.persistent and self._counting
                or view.name in self._guarded_views or view.name in self._accumulated_views):
            # written by other programs of this launch (or of the launch just before, behind
            # ready counters; or summed at L2 by atomics): read past L1, which may hold
            # stale lines of the same buffer
            extra += ', cache_modifier=".cg"'
        conv = ".to(tl.float32)" if view.dtype in FLOAT_DTYPES and op.result.dtype == "f32" else ""
        if view.dtype in WIDENED and op.result.dtype == "i32":  # packed bytes widen to i32
            conv = ".to(tl.int32)"
        name = self.name(op.result)
        w(f"{name} = tl.load({self._address(view, index)}{extra}){conv}")
        if op.result.dtype == "T":  # kept for a dot; the interpreter still needs fp32
            w("if UPCAST:")
            with w.indent():
                w(f"{name} = {name}.to(tl.float32)")

    def op_load_pick(self, op: Op, w: Writer):
        # one base pointer chosen by scalar selects: a single (vectorised) load where
        # predicated loads of every view would each cost instructions and registers
        picks, index = op.args
        first = picks[0][1]
        base = f"base{op.result.id}"
        _, view, off = picks[-1]
        w(f"{base} = {view.name}_ptr + ({self.operand(off)}) * {view.name}_s0")
        for cond, view, off in reversed(picks[:-1]):
            w(f"{base} = tl.where({self.operand(cond)}, {view.name}_ptr + ({self.operand(off)}) * {view.name}_s0, {base})")
        mask = self.mask_expr(first, index, op.attrs["limits"])
        w(f"{self.name(op.result)} = tl.load({self._address(first, index, base=base)}, mask={mask}, other=0.0)"
          ".to(tl.float32)")

    def op_prefetch(self, op: Op, w: Writer):
        # one address per 64 elements (a 128-byte line in bf16) of the last range, every
        # index clamped into the view: a prefetch must never name memory outside it
        view, index = op.args
        last = index[-1]
        block = self.ir.params[last.block]
        lines = max(1, block // 64)

        def clamped(axis, r):
            idx = f"({self.operand(r.start)} + tl.arange(0, {lines}) * {block // lines})" if r is last \
                else self.name(r.index)
            return f"tl.minimum({idx}, {view.shape[axis]} - 1)"

        w("if PREFETCH:  # L2 prefetch of a weight tile while the previous kernel drains")
        with w.indent():
            w(f"tl.inline_asm_elementwise(\"prefetch.global.L2 [$1]; mov.u32 $0, 0;\", \"=r,l\", "
              f"[{self._address(view, index, clamped)}], dtype=tl.int32, is_pure=False, pack=1)")

    def op_store(self, op: Op, w: Writer):
        view, index, value = op.args
        mask = self._guarded(self.mask_expr(view, index, op.attrs["limits"]), op)
        extra = f", mask={mask}" if mask else ""
        val = f"tl.cast({self.operand(value)}, {view.name}_ptr.dtype.element_ty)"
        w(f"tl.store({self._address(view, index)}, {val}{extra})")

    def loop(self, loop: Loop, w: Writer):
        for c, init in zip(loop.carried, loop.init):
            w(f"{self.name(c)} = {self.operand(init)}")
        lo, hi, step = (self.operand(x) for x in (loop.lo, loop.hi, loop.step))
        w(f"for {self.name(loop.index)} in range({lo}, {hi}, {step}):")
        with w.indent():
            self.block(loop.body, w)
            for c, y in zip(loop.carried, loop.yielded):
                w(f"{self.name(c)} = {self.operand(y)}")
        for c, r in zip(loop.carried, loop.results):
            self.bind(r, self.name(c))

    # module ---------------------------------------------------------------
    _guarded_views: frozenset = frozenset()
    _accumulated_views: frozenset = frozenset()

    def stage_kernel(self, stage: Stage, w: Writer):
        self._counting = any(op.name == "atomic_add" for op in ops_in(stage.body))
        self._stage = stage
        self._stage_ops = list(ops_in(stage.body))
        waits = [op for op in self._stage_ops if op.name == "wait_ready"]
        self._guarded_views = frozenset(op.attrs["guards"] for op in waits)
        self._accumulated_views = frozenset(op.args[0].name for op in self._stage_ops if op.name == "accumulate")
        # behind ready counters every read of the previous launch's output waits for its
        # chunk: the stage starts without waiting for the whole launch
        gdc_wait = "pass  # ready counters instead of gdc_wait" if waits else "tl.extra.cuda.gdc_wait()"
        # a definition that places k.launch_dependents itself: no launch right after the wait
        launch = "pass" if any(op.name == "launch_dependents" for op in self._stage_ops) \
            else "tl.extra.cuda.gdc_launch_dependents()"
        self._jit_def(w, f"{self.ir.name}_{stage.name}",
                      self.signature() + [f"{c}: tl.constexpr" for c in self.constexprs()])
        with w.indent():
            if self._at_start():
                # the next launch's programs may start once every program of this one has
                # started, before this one's wait: what they load before their own wait must
                # be step constants (the caller turns their early inputs off)
                w("if USE_PDL and LAUNCH_AT_START:  # let the next launch in now, before this program's wait")
                with w.indent():
                    w("tl.extra.cuda.gdc_launch_dependents()")
                launch = None  # none after the wait
            for s in self.ir.scalars:
                if s.dtype == "f32":
                    w(f"{s.name} = tl.full((), {s.name}, tl.float32)")
            # index arithmetic, prefetches and weight loads (k.before_wait) may run before
            # the wait; any other load, a store or a loop may not (it could read what the
            # previous kernel writes)
            body, lead = self._lead(stage)
            if self._early(body[:lead]):
                if not waits:
                    w("if USE_PDL and not EARLY:")
                    with w.indent():
                        w(gdc_wait)
                self.block(body[:lead], w)
                w("if USE_PDL:  # launched early: weights are in flight; now wait for the previous kernel's writes")
                with w.indent():
                    w("if EARLY:")
                    with w.indent():
                        w(gdc_wait)
                    if launch:
                        w(launch)
            else:
                self.block(body[:lead], w)
                w("if USE_PDL:  # launched early: wait until the previous kernel's writes are visible")
                with w.indent():
                    w(gdc_wait)
                    if launch:
                        w(launch)
            self.block(body[lead:], w)
        w()

    def _at_start(self) -> bool:
        """``LAUNCH_AT_START``: the next launch is let in at the program's start."""
        return bool(self.ir.params.get("LAUNCH_AT_START", 0))

    @staticmethod
    def _lead(stage: Stage) -> tuple[list, int]:
        """The stage's body and how many of its first ops may precede the PDL wait."""
        body = list(stage.body)
        lead = 0
        while lead < len(body) and not isinstance(body[lead], Loop) and (
                body[lead].name not in ("load", "load_pick", "store", "launch_dependents")
                or body[lead].attrs.get("early")):
            lead += 1
        return body, lead

    @staticmethod
    def _early(ops: list) -> bool:
        return any(isinstance(op, Op) and op.attrs.get("early") for op in ops)

    def _uses_early(self) -> bool:
        return any(self._early(body[:lead]) for body, lead in map(self._lead, self.ir.stages))

    def _pick_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for stage in self.ir.stages:
            for op in ops_in(stage.body):
                if op.name == "load_pick":
                    views = [v.name for _, v, _ in op.args[0]]
                    pairs += [(views[0], o) for o in views[1:] if (views[0], o) not in pairs]
        return pairs

    def launch(self, w: Writer):
        ins, scal = self.launch_def(w, "launch", "", "pdl=True, interpret=False", [
            f'"""Launch {self.ir.name}: inputs, outputs (written in place), runtime scalars; ``pdl``:',
            'dependent launch where the device has it; ``interpret``: under the Triton interpreter."""'])
        with w.indent():
            tviews = [v for v in self.ir.views if v.role != "workspace" and v.dtype == "T"]
            if tviews:
                first = tviews[0].name
                w(f"if {first}.dtype not in (torch.bfloat16, torch.float16, torch.float32):")
                with w.indent():
                    w(f'raise TypeError(f"{self.ir.name}: storage dtype {{{first}.dtype}} is not bf16/fp16/fp32")')
                for v in tviews[1:]:
                    w(f"if {v.name}.dtype != {first}.dtype:")
                    with w.indent():
                        w(f'raise TypeError(f"{self.ir.name}: {v.name} is {{{v.name}.dtype}}, expected {{{first}.dtype}} like {first}")')
            for v in self.ir.inputs:
                if v.dtype == "u8":  # packed bytes: another dtype would be read as other bits
                    w(f"if {v.name}.dtype != torch.uint8:")
                    with w.indent():
                        w(f'raise TypeError(f"{self.ir.name}: {v.name} must be torch.uint8, got {{{v.name}.dtype}}")')
            for first, other in self._pick_pairs():
                w(f"if {other}.stride() != {first}.stride():")
                with w.indent():
                    w(f'raise ValueError(f"{self.ir.name}: {other} has strides {{{other}.stride()}}, '
                      f'{first} {{{first}.stride()}}; they are read through one pointer")')
            for v in self.ir.views:
                if v.role in ("output", "inout") and v.dtype in _TORCH_DTYPE:
                    w(f"if {v.name}.dtype != {_TORCH_DTYPE[v.dtype]}:")
                    with w.indent():
                        w(f'raise TypeError(f"{self.ir.name}: {v.name} must be {_TORCH_DTYPE[v.dtype]}, got {{{v.name}.dtype}}")')
            self.bind_params(w)
            dev = ins[0]
            for v in self.ir.workspaces:
                shape = ", ".join(v.shape) + ("," if v.rank == 1 else "")
                if v.persistent:
                    w(f'{v.name} = _counters("{v.name}", ({shape}), {dev}.device)')
                    continue
                # torch.empty: every element a later stage reads was written by an earlier one
                w(f"{v.name} = torch.empty(({shape}), device={dev}.device, dtype={_TORCH_DTYPE[v.dtype]})")
            if self.uses("dot"):
                first = tviews[0].name
                w(f'DOT_PREC = "ieee" if {first}.dtype == torch.float32 else "tf32"')
                w("UPCAST = interpret")
            w(f"USE_PDL = _use_pdl({ins[0]}, pdl, interpret)")
            if self.uses("prefetch"):  # only useful, and only tested, with dependent launch
                w("PREFETCH = USE_PDL")
            if self._uses_early():
                w("EARLY = USE_PDL")
            call = [v.name for v in self.ir.views]
            call += [f"{v.name}.stride({a})" for v in self.ir.views for a in range(v.rank)]
            call += list(self.ir.dims) + scal
            kw = [f"{c}={c}" for c in self.constexprs()]
            kw += [f"{o}={o}" for o in LAUNCH_OPTIONS if o in self.ir.params]
            for stage in self.ir.stages:
                grid = ", ".join(stage.grid) + ("," if len(stage.grid) == 1 else "")
                w(f"{self.ir.name}_{stage.name}[({grid})](")
                with w.indent():
                    w(", ".join(call) + ",")
                    w(", ".join(kw) + ", **(_PDL_LAUNCH if USE_PDL else {}),")
                w(")")

    @staticmethod
    def _jit_def(w: Writer, name: str, params: list) -> None:
        w("@triton.jit")
        w(f"def {name}(")
        with w.indent():
            for a in params:
                w(a + ",")
        w("):")

    def _static_args(self) -> list[str]:
        """The strides and sizes of the signature (between the pointers and the scalars)."""
        sig = self.signature()
        return sig[len(self.ir.views):len(sig) - len(self.ir.scalars)]

    def xla_wrappers(self, w: Writer):
        """Per stage, the same kernel with its pointers reordered for an XLA custom call:
        inputs, the written views as aliased operands (the same buffers as the outputs;
        unused), the runtime scalars, then the written views. Strides and sizes are
        compile-time constants: an XLA program has static shapes, and a constant stride
        is what lets Triton prove 16-byte alignment (XLA's launcher, unlike Triton's own,
        passes no divisibility hints for integer arguments)."""
        writes = [v for v in self.ir.views if v.role != "input"]
        for stage in self.ir.stages:
            params = ([f"{v.name}_ptr" for v in self.ir.inputs] + [f"{v.name}_alias" for v in writes]
                      + [s.name for s in self.ir.scalars] + [f"{v.name}_ptr" for v in writes]
                      + [f"{c}: tl.constexpr" for c in self._static_args() + self.constexprs()])
            self._jit_def(w, f"{self.ir.name}_{stage.name}_xla", params)
            with w.indent():
                w(f"{self.ir.name}_{stage.name}(")
                with w.indent():
                    w(", ".join(self.signature()) + ",")
                    w(", ".join(self.constexprs()) + ",")
                w(")")
            w()

    def launch_xla(self, w: Writer):
        """``launch_xla(call, empty, *arguments, *scalars)``: every stage through ``call``
        (the caller's custom-call binding), on arrays that are values, not buffers: the
        written views thread from stage to stage and come back as the outputs."""
        _, scal = self.launch_def(w, "launch_xla", "call, empty, ", "pdl=False, interpret=False", [
            f'"""{self.ir.name} as custom calls: ``call(kernel, grid, reads, writes, scalars, meta)``',
            "returns the new ``writes``; ``empty(shape, dtype)`` allocates a workspace. Strides (a",
            "tensor's own, else row-major) and sizes compiled in as constants; ``pdl``: the stages may use dependent",
            "launch (a torch caller on Hopper; XLA's launcher has none); ``interpret``: under the Triton",
            'interpreter. Returns the outputs."""'])
        with w.indent():
            self.bind_params(w)
            for v in self.ir.workspaces:
                shape = ", ".join(v.shape) + ("," if v.rank == 1 else "")
                if v.persistent:
                    w(f'raise NotImplementedError("{self.ir.name}: persistent counters ({v.name}) '
                      f'have no XLA launch; use a variant without them")')
                    break
                w(f'{v.name} = empty(({shape}), "{v.dtype}")')
            tviews = [v for v in self.ir.views if v.role != "workspace" and v.dtype == "T"]
            if self.uses("dot"):
                w(f'DOT_PREC = "ieee" if str({tviews[0].name}.dtype).endswith("float32") else "tf32"')
                w("UPCAST = interpret")
            w("USE_PDL = pdl")
            if self.uses("prefetch"):
                w("PREFETCH = USE_PDL")
            if self._uses_early():
                w("EARLY = USE_PDL")
            for v in self.ir.views:
                shape = ", ".join(f"{v.name}.shape[{a}]" if v.role != "workspace" else v.shape[a]
                                  for a in range(v.rank)) + ("," if v.rank == 1 else "")
                names = ", ".join(f"{v.name}_s{a}" for a in range(v.rank)) + ("," if v.rank == 1 else "")
                w(f"{names} = _strides({v.name}, ({shape}))")
            reads = [v.name for v in self.ir.inputs]
            writes = [v.name for v in self.ir.views if v.role != "input"]
            w(f"scalars = ({', '.join(scal)}{',' if len(scal) == 1 else ''})")
            meta = [f'"{c}": {c}' for c in self._static_args() + self.constexprs()]
            meta += [f'"{o}": {o}' for o in LAUNCH_OPTIONS if o in self.ir.params]
            w(f"meta = {{{', '.join(meta)}}}")
            wtuple = ", ".join(writes) + ","
            for stage in self.ir.stages:
                grid = ", ".join(stage.grid) + ("," if len(stage.grid) == 1 else "")
                w(f"{wtuple} = call({self.ir.name}_{stage.name}_xla, ({grid}), "
                  f"({', '.join(reads)}{',' if len(reads) == 1 else ''}), ({wtuple}), scalars, meta)")
            outs = ", ".join(v.name for v in self.ir.outputs) + ","
            w(f"return ({outs})")

    def module(self) -> str:
        w = self.start_module(_PRELUDE, spaced=True)
        self.launch(w)
        w()
        self.xla_wrappers(w)
        self.launch_xla(w)
        return w.text()


def emit_triton(ir: KernelIR) -> str:
    """Triton source for ``ir``: deterministic text, a pure function of the IR."""
    return TritonEmitter(ir).module()
