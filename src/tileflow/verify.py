"""Checking a suite kernel against its float64 reference.

Used by the tests (CPU: Triton interpreter, Pallas interpret mode, the reference CPU
path) and by the GPU leaderboard alike, so both check the same way:

- inputs are fresh random draws every call (never zeros; the seed is recorded);
- outputs are poisoned first (NaN for floats, -1 for indices), so an element the
  kernel never wrote shows up as NaN / a wrong index;
- the error is ``||out - ref|| / ||ref||`` against the reference run in float64 on
  the same (storage-dtype) inputs, and must be under the bound of the dtype;
- any NaN fails, whatever the error figure says.

What is checked (``verification_matrix``): the default run (the test suite, CI, plain
``tileflow verify``) checks every kernel x target x dtype at least once and every test
case once on every target; ``tileflow verify --full`` (``pytest --full``) checks every
test case x target x dtype. docs/testing.md lists what only the full sweep runs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Optional

import torch

from tileflow.suite.registry import TARGETS, Case, SuiteKernel
from tileflow.tile.ir import KernelIR

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative-error bounds (norm-wise) per storage dtype. Outputs are rounded to the
# storage dtype, so the bound sits a few roundings above its unit roundoff:
# bf16 2^-9 = 2.0e-3, fp16 2^-12 = 2.4e-4, fp32 2^-24 = 6e-8 (fp32 sums of K terms).
BOUNDS = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 2e-5}
_INDEX_DTYPES = {"i32": torch.int32, "i64": torch.int64}
# what run_target runs: the suite's targets and the custom-call form of the Triton kernels
RUN_TARGETS = ("triton", "triton_xla", "pallas", "reference")


def verification_matrix(kernel: SuiteKernel, targets=TARGETS, dtypes=tuple(DTYPES),
                        full: bool = False) -> list[tuple[Case, str, str]]:
    """The (case, target, dtype) checks of ``kernel``, in test-case order.

    ``full``: every test case on every target it runs on, in every dtype it allows.
    Otherwise (the default run) a covering subset of those, about a third: on each
    target every test case once, in a dtype that rotates with the case and the target,
    plus, for a dtype that rotation left out, the first (smallest) case that allows it.
    So every kernel x target x dtype and every case x target is still checked."""
    every = [(i, case, target, dtype) for i, case in enumerate(kernel.test_cases) for target in targets
             if case.runs_on(target) for dtype in dtypes if not (case.dtypes and dtype not in case.dtypes)]
    if full:
        return [(case, target, dtype) for _, case, target, dtype in every]
    order = tuple(DTYPES)
    picked = set()
    for target in targets:
        shift = TARGETS.index(target) if target in TARGETS else 0
        mine = [(i, case) for i, case in enumerate(kernel.test_cases) if case.runs_on(target)]
        for n, (i, case) in enumerate(mine):
            rotated = order[(n + shift) % len(order):] + order[:(n + shift) % len(order)]
            allowed = [d for d in rotated if d in dtypes and not (case.dtypes and d not in case.dtypes)]
            if allowed:
                picked.add((i, target, allowed[0]))
        for dtype in dtypes:  # a dtype the rotation missed: the smallest case that allows it
            if not any(t == target and d == dtype for _, t, d in picked):
                first = next((i for i, case in mine if not (case.dtypes and dtype not in case.dtypes)), None)
                if first is not None:
                    picked.add((first, target, dtype))
    return [(case, target, dtype) for i, case, target, dtype in every if (i, target, dtype) in picked]


@dataclass
class VerifyResult:
    kernel: str
    case: str
    target: str
    dtype: str
    params: dict
    seed: int
    errors: dict = field(default_factory=dict)  # output -> relative error (or mismatches)
    bound: float = 0.0
    ok: bool = False
    detail: str = ""

    @property
    def max_error(self) -> float:
        return max(self.errors.values()) if self.errors else float("nan")

    def line(self) -> str:
        status = "ok " if self.ok else "FAIL"
        return (f"{status} {self.kernel:<22} {self.target:<9} {self.dtype:<4} {self.case:<12} "
                f"rel_err={self.max_error:.2e} bound={self.bound:.0e} seed={self.seed} {self.detail}")


def view_shape(view, sizes: dict, params: dict) -> tuple:
    return tuple(int(sizes[d]) if d in sizes else int(params[d]) for d in view.shape)


def make_inputs(kernel: SuiteKernel, ir: KernelIR, case: Case, dtype: torch.dtype,
                gen: torch.Generator, device="cpu") -> dict:
    """Fresh random inputs for every input view of ``ir`` at ``case``'s sizes."""
    out = {}
    for v in ir.inputs + [v for v in ir.outputs if v.role == "inout"]:
        shape = view_shape(v, case.sizes, ir.params)
        maker = kernel.input_makers.get(v.name)
        if maker is not None:
            t = maker(gen, shape, case.sizes)
        elif v.dtype in _INDEX_DTYPES:
            t = torch.randint(0, 1 << 15, shape, generator=gen, dtype=_INDEX_DTYPES[v.dtype])
        else:
            t = torch.randn(shape, generator=gen)
        if t.is_floating_point():
            t = t.to(dtype if v.dtype == "T" else torch.float32)
        out[v.name] = t.to(device)
    return out


def poisoned_outputs(ir: KernelIR, case: Case, dtype: torch.dtype, device="cpu") -> dict:
    """NaN / -1 filled outputs. In-place views get fresh random contents instead:
    the reference updates the same contents, so an element the kernel should have
    written but did not keeps a random value that differs from the reference."""
    out = {}
    for v in ir.outputs:
        if v.role == "inout":
            continue
        shape = view_shape(v, case.sizes, ir.params)
        if v.dtype in _INDEX_DTYPES:
            out[v.name] = torch.full(shape, -1, dtype=_INDEX_DTYPES[v.dtype], device=device)
        else:
            out[v.name] = torch.full(shape, float("nan"), dtype=dtype if v.dtype == "T" else torch.float32,
                                     device=device)
    return out


def reference_outputs(kernel: SuiteKernel, inputs: dict, scalars: dict, compute=torch.float64) -> dict:
    """Run the reference with floating inputs upcast to ``compute``."""
    import array_api_compat

    args = {k: (v.to(compute) if v.is_floating_point() else v) for k, v in inputs.items()}
    xp = array_api_compat.array_namespace(*args.values())
    return kernel.run_reference(xp, **args, **scalars)


def run_target(kernel: SuiteKernel, ir: KernelIR, target: str, inputs: dict, outputs: dict,
               scalars: dict) -> dict:
    """Run ``target`` on (poisoned) ``outputs``; return the outputs as torch tensors."""
    order_out = [v.name for v in ir.outputs]
    tensors = {**inputs, **outputs}
    args = [tensors[v.name] for v in ir.arguments]
    scal = [scalars[s.name] for s in ir.scalars]
    if target == "triton":
        from tileflow.runtime.torch_triton import triton_launcher

        device_type = next(iter(inputs.values())).device.type
        triton_launcher(ir, device_type)(*args, *scal)
        return outputs
    if target == "triton_xla":  # the custom-call form (JAX on GPUs), here on torch tensors
        import functools

        from tileflow.runtime.torch_triton import use_interpreter_if_no_gpu
        from tileflow.runtime.triton_xla import torch_call, torch_empty, xla_launcher

        device = next(iter(inputs.values())).device
        res = xla_launcher(ir, interpret=use_interpreter_if_no_gpu())(
            torch_call, functools.partial(torch_empty, device=device), *args, *scal)
        return dict(zip(order_out, res))
    if target == "pallas":
        return _run_pallas(ir, args, outputs, scal)
    if target == "reference":
        inplace = {v.name: outputs[v.name] for v in ir.outputs if v.role == "inout"}
        res = reference_outputs(kernel, {**inputs, **inplace}, scalars, compute=torch.float32)
        for n in order_out:
            outputs[n].copy_(res[n].to(outputs[n].dtype))
        return outputs
    raise ValueError(f"unknown target {target!r}")


def _to_jax(t: torch.Tensor):
    import jax.numpy as jnp

    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().cpu().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(t.cpu().numpy())


def _run_pallas(ir: KernelIR, args: list, outputs: dict, scal: list) -> dict:
    import numpy as np

    from tileflow.runtime.jax_pallas import default_interpret, pallas_launcher

    launch = pallas_launcher(ir)
    res = launch(*[_to_jax(a) for a in args], *scal, interpret=default_interpret())
    out = {}
    for v, r in zip(ir.outputs, res):
        arr = np.asarray(r.astype("float32") if str(r.dtype) == "bfloat16" else r)
        out[v.name] = torch.from_numpy(arr.copy()).to(outputs[v.name].dtype)
    return out


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, str]:
    """(relative error, problem) of one output; problem is "" when none."""
    if not out.is_floating_point():
        bad = int((out.cpu() != ref.cpu().to(out.dtype)).sum())
        return float(bad), (f"{bad} wrong indices" if bad else "")
    o, r = out.detach().cpu().double(), ref.detach().cpu().double()
    if torch.isnan(o).any():
        n = int(torch.isnan(o).sum())
        return float("nan"), f"{n} NaN (unwritten or invalid) of {o.numel()}"
    denom = r.norm().item()
    err = (o - r).norm().item() / (denom if denom > 0 else 1.0)
    return err, ""


def verify(kernel: SuiteKernel, case: Case, dtype: str, target: str, params: Optional[dict] = None,
           device="cpu", seed: Optional[int] = None) -> VerifyResult:
    """Check one kernel x case x dtype x target against the float64 reference."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if target not in RUN_TARGETS:
        raise ValueError(f"target {target!r}: expected one of {', '.join(RUN_TARGETS)}")
    params = dict(params or kernel.params_for(case))
    ir = kernel.build(params)
    seed = secrets.randbits(31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    tdtype = DTYPES[dtype]
    inputs = make_inputs(kernel, ir, case, tdtype, gen, device)
    outputs = poisoned_outputs(ir, case, tdtype, device)
    for v in ir.outputs:  # in-place views: their random contents are the output buffer
        if v.role == "inout":
            outputs[v.name] = inputs.pop(v.name)
    before = {n: t.detach().cpu().clone() for n, t in outputs.items()}
    res = VerifyResult(kernel.name, case.label, target, dtype, params, seed, bound=BOUNDS[dtype])
    got = run_target(kernel, ir, target, inputs, outputs, dict(case.scalars))
    ref_in = {k: v.cpu() for k, v in inputs.items()}
    ref_in.update({v.name: before[v.name] for v in ir.outputs if v.role == "inout"})
    ref = reference_outputs(kernel, ref_in, dict(case.scalars))
    problems = []
    for name in (v.name for v in ir.outputs):
        err, problem = compare(got[name], ref[name])
        res.errors[name] = err
        if problem:
            problems.append(f"{name}: {problem}")
        elif got[name].is_floating_point() and not err <= res.bound:
            problems.append(f"{name}: error {err:.2e} over bound {res.bound:.0e}")
    res.ok = not problems
    res.detail = "; ".join(problems)
    return res
