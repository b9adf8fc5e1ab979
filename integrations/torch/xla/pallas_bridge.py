"""The Pallas paths: the suite's generated Pallas ``launch`` on XLA tensors.

- On TPU through torch-xla's Pallas bridge, ``make_kernel_from_pallas``: it lowers the
  jax function, takes the one Mosaic ``tpu_custom_call`` it finds and calls it on the
  torch tensors as given. That is exact only when ``launch`` is a single
  ``pallas_call`` on its own arguments, so launch parameters are chosen for that (one
  stage, blocks that divide the sizes: no padding) and :meth:`PallasKernel.tpu_problem`
  checks it on the TPU lowering before the kernel is used.
- Elsewhere, under the Pallas interpreter, inlined into the XLA graph with
  ``torch_xla.core.xla_builder.call_jax`` (the same generated code, as plain HLO).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from tileflow.integrations.torch.xla.kernels import CALLS, SuiteCall

_KERNELS: dict[tuple, "PallasKernel"] = {}
_TORCH = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}
_JAX = {"f32": "float32", "i32": "int32", "i64": "int64"}


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def tpu_params(call: SuiteCall, sizes: dict) -> dict:
    """The suite's default parameters, made single-stage (no split-K) with block sizes
    that divide N and K, so the launch pads nothing and is one ``pallas_call``."""
    from tileflow.suite import KERNELS

    p = dict(KERNELS[call.kernel].default_params(sizes))
    p["SPLIT_K"] = 1
    p["BLOCK_N"] = _largest_pow2_divisor(sizes["N"], p["BLOCK_N"])
    p["BLOCK_K"] = _largest_pow2_divisor(sizes["K"], p["BLOCK_K"])
    return p


class PallasKernel:
    """One suite kernel at one size and dtype: its generated Pallas ``launch``, and
    the ways to run it on XLA tensors."""

    def __init__(self, call: SuiteCall, sizes: dict, dtype: torch.dtype, convention):
        from tileflow.runtime.jax_pallas import pallas_launcher
        from tileflow.suite import KERNELS

        self.call, self.sizes, self.dtype, self.convention = call, dict(sizes), dtype, convention
        self.params = tpu_params(call, sizes)
        self.ir = KERNELS[call.kernel].build(self.params)
        convention.matches(self.ir)
        launch = pallas_launcher(self.ir)
        # one object per kernel: call_jax and trace_pallas cache their tracing by it
        self.compiled_fn = functools.partial(launch, interpret=False)
        self.interpret_fn = functools.partial(launch, interpret=True)
        self._tpu_problem: Optional[str] = None
        self._tpu_lowering = None
        self._tpu_kernel: Optional[Callable] = None

    def _arguments(self, tensors) -> list:
        """``launch``'s arguments in the kernel's order: the op's tensors by name, then the
        outputs, NaN-filled (the launch takes their initial contents; NaN where nothing
        is written)."""
        values = self.call.named(*tensors)
        device = next(t for t in tensors if t is not None).device
        return self.convention.arguments(values, self.sizes, lambda name, shape, dtype: torch.full(
            shape, float("nan"), dtype=self.dtype if dtype == "T" else _TORCH[dtype], device=device))

    def _output_index(self) -> list:
        return [self.convention.order.index(n) for n in self.convention.outputs]

    def tpu_lowering(self):
        """The MLIR module of ``launch`` lowered for TPU (no TPU needed to lower)."""
        if self._tpu_lowering is None:
            import jax

            self._tpu_lowering = jax.jit(self.compiled_fn).trace(*self.shapes()).lower(
                lowering_platforms=("tpu",)).compiler_ir()
        return self._tpu_lowering

    def tpu_problem(self) -> str:
        """"" when the TPU lowering of ``launch`` is one Mosaic call on ``launch``'s own
        arguments whose result is returned as is (what ``make_kernel_from_pallas``
        assumes), else what is in the way."""
        if self._tpu_problem is None:
            try:
                self._tpu_problem = single_call_problem(self.tpu_lowering())
            except Exception as e:  # noqa: BLE001  (any lowering error means: not this path)
                self._tpu_problem = f"TPU lowering failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return self._tpu_problem

    def tpu_payload(self) -> str:
        """The Mosaic custom call's backend config, as torch-xla's ``trace_pallas``
        extracts it on a TPU host."""
        from torch_xla.experimental.custom_kernel import _extract_backend_config

        return _extract_backend_config(self.tpu_lowering())

    def shapes(self) -> list:
        """``launch``'s arguments as jax shapes: inputs, then the output."""
        import jax

        from torch_xla.experimental.custom_kernel import convert_torch_dtype_to_jax

        dt = convert_torch_dtype_to_jax(self.dtype)
        conv = self.convention
        return [jax.ShapeDtypeStruct(conv.shape(t.name, self.sizes), dt if t.dtype == "T" else _JAX[t.dtype])
                for t in conv.tensors]

    def tpu_kernel(self) -> Callable:
        """The ``make_kernel_from_pallas`` wrapper of the compiled launch (TPU)."""
        if self._tpu_kernel is None:
            from torch_xla.experimental.custom_kernel import make_kernel_from_pallas

            outs = self._output_index()
            self._tpu_kernel = make_kernel_from_pallas(self.compiled_fn,
                                                       lambda *a: [(a[i].shape, a[i].dtype) for i in outs])
        return self._tpu_kernel

    def run_tpu(self, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        return self.tpu_kernel()(*self._arguments(tensors), use_cache=True)

    def run_interpret(self, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        import torch_xla.core.xla_builder as xb

        return xb.call_jax(self.interpret_fn, tuple(self._arguments(tensors)))[0]


def single_call_problem(module) -> str:
    """"" when the lowered ``module`` is one custom call on the function's arguments
    in order, returned as is; else what differs."""
    funcs = list(module.body.operations)
    if len(funcs) != 1:
        return f"the lowering has {len(funcs)} functions, not one"
    block = funcs[0].body.blocks[0]
    ops = list(block.operations)
    names = [o.name for o in ops]
    if names != ["stablehlo.custom_call", "func.return"]:
        return f"the launch is not one kernel call: {', '.join(names)}"
    call, ret = ops
    if [a.get_name() for a in call.operands] != [a.get_name() for a in block.arguments]:
        return "the kernel's operands are not the launch's arguments in order"
    if [v.get_name() for v in ret.operands] != [r.get_name() for r in call.results]:
        return "the launch does not return the kernel's results as they are"
    return ""


def kernel_for(op: str, *tensors) -> PallasKernel:
    """The cached :class:`PallasKernel` for ``op`` at these tensors' sizes and dtype."""
    call = CALLS[op]
    values = call.named(*tensors)
    conv = call.convention(values)
    sizes = conv.sizes(values)
    dtype = conv.storage(values).dtype
    key = (op, tuple(sorted(sizes.items())), dtype)
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = PallasKernel(call, sizes, dtype, conv)
    return k


def _entry(op: str, interpret: bool) -> Callable:
    def run(*tensors):
        k = kernel_for(op, *tensors)
        return k.run_interpret(*tensors) if interpret else k.run_tpu(*tensors)

    run.__name__ = run.__qualname__ = f"pallas{'_interpret' if interpret else ''}_{op}"
    run.__doc__ = f"torch.ops.tileflow.{op} by its generated Pallas kernel" + (" (interpreted)" if interpret else "")
    return run


TPU_OPS = {op: _entry(op, False) for op in CALLS}
INTERPRET_OPS = {op: _entry(op, True) for op in CALLS}
