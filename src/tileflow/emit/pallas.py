"""Tile IR -> Pallas source (TPU; Pallas ``interpret=True`` on CPU).

One self-contained module: one kernel function per stage (refs in, refs out) and a
``launch(*inputs, *outputs, *scalars, interpret=False)`` that returns the outputs.

How the tile IR maps onto Pallas:
- block accesses become ref slices with ``pl.ds(start, BLOCK)``; Pallas has no masked
  load, so the launcher pads each view to whole blocks and the kernel applies the
  bounds mask with ``jnp.where`` (``other`` outside); a partial block is stored as a
  read-modify-write on TPU and under the interpreter (grid steps in sequence), and as
  a masked store when compiled on a GPU, where programs run in parallel;
- on a GPU the tuned ``num_warps`` / ``num_stages`` go to Triton as compiler parameters;
- sizes are static Python ints (JAX shapes are static) bound with functools.partial;
- runtime scalars travel as one f32 and one i32 array (eps, theta, position, filled
  length are values, never constants in the text);
- outputs are passed in and aliased to the results, so an element the kernel never
  writes keeps the caller's poison, as with the Triton launcher.
"""

from __future__ import annotations

from tileflow.emit.walker import INFIX, Walker, Writer, expand_key, literal
from tileflow.tile.ir import FLOAT_DTYPES, WIDENED, KernelIR, Loop, Op, RangeValue, Stage, ops_in

_UNARY = {
    "exp": "jnp.exp({})", "exp2": "jnp.exp2({})", "log2": "jnp.log2({})",
    "rsqrt": "jax.lax.rsqrt({})", "sqrt": "jnp.sqrt({})", "sigmoid": "jax.nn.sigmoid({})",
    "cos": "jnp.cos({})", "sin": "jnp.sin({})", "neg": "-({})", "abs": "jnp.abs({})",
}
_BINARY = {**INFIX, "maximum": "jnp.maximum({}, {})", "minimum": "jnp.minimum({}, {})"}
_JNP_DTYPE = {"f32": "jnp.float32", "i32": "jnp.int32", "i64": "_I64"}


# The fixed part of every generated Pallas module, after its banner.
_PRELUDE = '''import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_I64 = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def cdiv(a, b):
    return (a + b - 1) // b


def _ceil_to(n, b):
    return cdiv(n, b) * b


def _masked_stores_default(interpret):
    return not interpret and jax.default_backend() == "gpu"


def _gpu_compiler_params(interpret, **tuned):
    # the measured warps / stages reach Triton only through its compiler parameters
    if interpret or jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(**tuned)


def _store(ref, idx, val, mask, masked):
    # A block may overlap rows another program owns (a padded head group, a ragged
    # tail). TPU grid steps run one after another, so writing back the old contents
    # outside the mask is exact there; GPU programs run in parallel, where that
    # read-modify-write would race with the owner: the store itself is masked.
    if masked:
        from jax.experimental.pallas import triton as plgpu

        view = ref.at[idx]
        plgpu.store(view, jnp.broadcast_to(val, view.shape), mask=jnp.broadcast_to(mask, view.shape))
    else:
        ref[idx] = jnp.where(mask, val, ref[idx])


def _pad_to(x, shape, fill):
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - n) for n, s in zip(x.shape, shape)], constant_values=fill)


'''

class PallasEmitter(Walker):
    target = "pallas"
    ns, iota, binary, unary, dtypes = "jnp", "jax.lax.iota(jnp.int32, {})", _BINARY, _UNARY, _JNP_DTYPE
    dot = "jnp.dot({}, {}, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)"
    cast_like = "{}.astype({}.dtype)"

    # ops ------------------------------------------------------------------
    def op_program_id(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = pl.program_id({op.attrs['axis']})")

    def op_cast(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = jnp.asarray({self.operand(op.args[0])}).astype({_JNP_DTYPE[op.attrs['dtype']]})")

    def op_bitcast(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = jax.lax.bitcast_convert_type({self.operand(op.args[0])}, "
          f"{_JNP_DTYPE[op.attrs['dtype']]})")

    def op_reduce(self, op: Op, w: Writer):
        a, axis, kind = self.operand(op.args[0]), op.attrs["axis"], op.attrs["op"]
        if kind == "argmax":  # jnp.argmax returns the first maximal index, as torch.argmax
            w(f"{self.name(op.result)} = jnp.argmax({a}, axis={axis}).astype(jnp.int32)")
        else:
            w(f"{self.name(op.result)} = jnp.{kind}({a}, axis={axis})")

    def op_trans(self, op: Op, w: Writer):
        w(f"{self.name(op.result)} = {self.operand(op.args[0])}.T")

    def _slice(self, index) -> str:
        parts = []
        for i in index:
            if isinstance(i, RangeValue):
                parts.append(f"pl.ds({self.operand(i.start)}, {i.block})")
            else:
                parts.append(self.operand(i))
        return ", ".join(parts)

    def op_prefetch(self, op: Op, w: Writer):
        """No dependent launch on this target: nothing to overlap."""

    def op_launch_dependents(self, op: Op, w: Writer):
        """No dependent launch on this target."""

    def op_load(self, op: Op, w: Writer):
        view, index = op.args
        conv = ".astype(jnp.float32)" if view.dtype in FLOAT_DTYPES and op.result.dtype == "f32" else ""
        if view.dtype in WIDENED and op.result.dtype == "i32":  # packed bytes widen to i32
            conv = ".astype(jnp.int32)"
        name = self.name(op.result)
        w(f"{name} = {view.name}_ref[{self._slice(index)}]{conv}")
        mask = self.mask_expr(view, index, op.attrs["limits"])
        if op.attrs.get("when") is not None:
            mask = f"({self.operand(op.attrs['when'])}) & {mask}" if mask else self.operand(op.attrs["when"])
        if mask:
            other = op.attrs["other"] if view.dtype in FLOAT_DTYPES else int(op.attrs["other"])
            w(f"{name} = jnp.where({mask}, {name}, {literal(other)})")

    def op_store(self, op: Op, w: Writer):
        view, index, value = op.args
        sl = self._slice(index)
        val = f"jnp.asarray({self.operand(value)}).astype({view.name}_ref.dtype)"
        mask = self.mask_expr(view, index, op.attrs["limits"])
        store = (f"_store({view.name}_ref, ({sl},), {val}, {mask}, MASKED_STORES)" if mask
                 else f"{view.name}_ref[{sl}] = {val}")
        when = op.attrs.get("when")
        if when is None:
            w(store)
            return
        # a program that does not own the block must not write it at all (see store's when=)
        w(f"@pl.when({self.operand(when)})")
        w("def _guarded_store():")
        with w.indent():
            w(store)

    def loop(self, loop: Loop, w: Writer):
        body = f"loop{loop.index.id}"
        carried = ", ".join(self.name(c) for c in loop.carried)
        lo, hi, step = (self.operand(x) for x in (loop.lo, loop.hi, loop.step))
        w(f"def {body}(it, carry):")
        with w.indent():
            w(f"{carried}, = carry" if len(loop.carried) == 1 else f"{carried} = carry")
            w(f"{self.name(loop.index)} = {lo} + it * {step}")
            self.block(loop.body, w)
            w("return (" + ", ".join(self.operand(y) for y in loop.yielded) + ",)")
        results = ", ".join(self.name(r) for r in loop.results)
        init = ", ".join(self.operand(i) for i in loop.init)
        w(f"{results}{',' if len(loop.results) == 1 else ''} = jax.lax.fori_loop("
          f"0, ({hi} - {lo} + {step} - 1) // {step}, {body}, ({init},))")

    # module ---------------------------------------------------------------
    def _scalar_arrays(self) -> list[tuple[str, str, list[str]]]:
        out = []
        for dt, jdt in (("f32", "jnp.float32"), ("i32", "jnp.int32")):
            names = [s.name for s in self.ir.scalars if s.dtype == dt]
            if names:
                out.append((f"scalars_{dt}", jdt, names))
        return out

    def stage_kernel(self, stage: Stage, w: Writer):
        read, written = self.views_used(stage.body)
        arrays = self._scalar_arrays()
        refs = [f"{v.name}_ref" for v in read] + [f"{a}_ref" for a, _, _ in arrays]
        refs += [f"_{v.name}_in" for v in written] + [f"{v.name}_ref" for v in written]
        static = list(self.ir.dims) + sorted(self.ir.params) + ["MASKED_STORES"]
        w(f"def {self.ir.name}_{stage.name}({', '.join(refs)}, *, {', '.join(static)}):")
        with w.indent():
            for arr, _, names in arrays:
                for i, n in enumerate(names):
                    w(f"{n} = {arr}_ref[{i}]")
            self.block(stage.body, w)
        w()
        w()

    def _padding(self) -> dict[tuple[str, int], list[tuple[int, bool]]]:
        """(view, axis) -> [(block, aligned)] over every block access."""
        uses: dict[tuple[str, int], list[tuple[int, bool]]] = {}
        for s in self.ir.stages:
            for op in ops_in(s.body):
                if op.name in ("load", "store"):
                    view, index = op.args[0], op.args[1]
                    for axis, i in enumerate(index):
                        if isinstance(i, RangeValue):
                            uses.setdefault((view.name, axis), []).append(
                                (self.ir.params[i.block], i.aligned))
        return uses

    def _padded_shape(self, view, uses) -> str:
        dims = []
        for axis, d in enumerate(view.shape):
            u = uses.get((view.name, axis))
            if not u:
                dims.append(d)
                continue
            parts = {f"_ceil_to({d}, {b})" + ("" if aligned else f" + {b}") for b, aligned in u}
            dims.append(parts.pop() if len(parts) == 1 else "max(" + ", ".join(sorted(parts)) + ")")
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def launch(self, w: Writer):
        uses = self._padding()
        self.launch_def(w, "launch", "", "interpret=False, masked_stores=None", [
            f'"""Run {self.ir.name}; returns the outputs (the output arguments are their initial contents).',
            "",
            "``masked_stores``: write partial blocks with masked stores (default: compiled on a GPU,",
            'where programs run in parallel) rather than a read-modify-write (TPU, interpreter)."""',
            "MASKED_STORES = _masked_stores_default(interpret) if masked_stores is None else masked_stores"])
        with w.indent():
            self.bind_params(w)
            for v in self.ir.views:
                shape = self._padded_shape(v, uses)
                if v.role == "workspace":
                    w(f"{v.name} = jnp.full({shape}, jnp.nan, {_JNP_DTYPE[v.dtype]}) "
                      f"if {_JNP_DTYPE[v.dtype]} == jnp.float32 else jnp.zeros({shape}, {_JNP_DTYPE[v.dtype]})")
                else:
                    fill = "jnp.nan" if v.role == "output" and v.dtype in ("T", "f32") else "0"
                    w(f"{v.name} = _pad_to({v.name}, {shape}, {fill})")
            for arr, jdt, names in self._scalar_arrays():
                w(f"{arr} = jnp.asarray([{', '.join(names)}], {jdt})")
            static = ", ".join(f"{n}={n}" for n in list(self.ir.dims) + sorted(self.ir.params) + ["MASKED_STORES"])
            for stage in self.ir.stages:
                read, written = self.views_used(stage.body)
                args = [v.name for v in read] + [a for a, _, _ in self._scalar_arrays()]
                first_out = len(args)
                args += [v.name for v in written]
                grid = ", ".join(stage.grid) + ("," if len(stage.grid) == 1 else "")
                outs = ", ".join(v.name for v in written) + ","
                shapes = ", ".join(f"jax.ShapeDtypeStruct({v.name}.shape, {v.name}.dtype)" for v in written)
                aliases = ", ".join(f"{first_out + i}: {i}" for i in range(len(written)))
                w(f"{outs} = pl.pallas_call(")
                with w.indent():
                    w(f"functools.partial({self.ir.name}_{stage.name}, {static}),")
                    w(f"out_shape=({shapes},),")
                    w(f"grid=({grid}),")
                    w(f"input_output_aliases={{{aliases}}},")
                    tuned = ", ".join(f"{n}={n}" for n in ("num_warps", "num_stages") if n in self.ir.params)
                    w(f"compiler_params=_gpu_compiler_params(interpret, {tuned}),")
                    w("interpret=interpret,")
                w(f")({', '.join(args)})")
            outs = []
            for v in self.ir.outputs:
                outs.append(f"{v.name}[" + ", ".join(f":{d}" for d in v.shape) + "]")
            w("return (" + ", ".join(outs) + ",)")

    def module(self) -> str:
        counters = [v.name for v in self.ir.workspaces if v.persistent]
        if counters:  # the grid's programs cannot signal one another (sequential on TPU)
            raise NotImplementedError(f"{self.ir.name}: counters ({', '.join(counters)}) and atomics are "
                                      "Triton only; use parameters without them")
        if self.uses("accumulate"):  # a sum over the grid's programs in one buffer, by atomics
            raise NotImplementedError(f"{self.ir.name}: atomic accumulation is Triton only; "
                                      "run the unfused kernels on this target")
        if self.uses("signal") or self.uses("wait_ready"):  # programs of two launches at once
            raise NotImplementedError(f"{self.ir.name}: ready counters are Triton only; "
                                      "use parameters without them")
        w = self.start_module(_PRELUDE, spaced=False)
        self.launch(w)
        return w.text()


def emit_pallas(ir: KernelIR) -> str:
    """Pallas source for ``ir``: deterministic text, a pure function of the IR."""
    return PallasEmitter(ir).module()
