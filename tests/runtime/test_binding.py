"""The calling convention derived from each kernel's IR (``tileflow.runtime.binding``):
for every registered suite kernel and test case, the binder's order is the generated
``launch`` / ``launch_xla`` signature, misuse is a one-line error, and a kernel called
through the binder (the generated Triton code under the interpreter, the reference, and
the torch runtime's ``ops.launch``) equals its float64 reference, outputs poisoned first."""

from __future__ import annotations

import inspect

import pytest
import torch

from tileflow.runtime import binding
from tileflow.suite import KERNELS
from tileflow.verify import make_inputs

CASES = [pytest.param(name, case, id=f"{name}-{case.label}") for name, k in KERNELS.items() for case in k.test_cases
         if case.runs_on("triton")]
ALL_CASES = [pytest.param(name, case, id=f"{name}-{case.label}") for name, k in KERNELS.items()
             for case in k.test_cases]
_INDEX = {"i32": torch.int32, "i64": torch.int64}
# the generated Triton code runs compiled on a GPU, under the interpreter on CPU (conftest)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# storage dtypes and the suite's norm-wise error bounds (tileflow.verify's)
_DTYPES = {"fp32": (torch.float32, 2e-5), "fp16": (torch.float16, 2e-3), "bf16": (torch.bfloat16, 1e-2)}


def dtype_of(case) -> tuple:
    """fp32 where the case is checked in it (the far-position RoPE cases are not), else
    the first dtype it is checked in, with its bound."""
    return _DTYPES["fp32" if not case.dtypes or "fp32" in case.dtypes else case.dtypes[0]]


def flags_of(name: str, case) -> dict:
    return KERNELS[name].structural_sizes(case.sizes)


def draw(name: str, case, conv, params: dict, seed: int = 0, dtype=torch.float32) -> dict:
    """Random inputs and in-place views for every tensor the convention takes, and the
    case's scalars, by name (the suite's verification draws them: ``verify.make_inputs``),
    on ``DEVICE``."""
    kernel, gen = KERNELS[name], torch.Generator().manual_seed(seed)
    values = make_inputs(kernel, kernel.build(params), case, dtype, gen, DEVICE)
    assert set(values) == {t.name for t in conv.tensors if t.role != "output"}
    return {**values, **case.scalars}


def poisoned(conv, sizes: dict, dtype=torch.float32) -> dict:
    out = {}
    for t in conv.tensors:
        if t.role == "output":
            shape = conv.shape(t.name, sizes)
            out[t.name] = (torch.full(shape, -1, dtype=_INDEX[t.dtype], device=DEVICE) if t.dtype in _INDEX
                           else torch.full(shape, float("nan"), dtype=dtype if t.dtype == "T" else torch.float32,
                                           device=DEVICE))
    return out


def reference(name: str, conv, values: dict) -> dict:
    import array_api_compat

    args = {n: (v.cpu().double() if v.is_floating_point() else v.cpu()) if isinstance(v, torch.Tensor) else v
            for n, v in values.items() if n in conv.inputs or n in conv.scalars}
    xp = array_api_compat.array_namespace(*[v for v in args.values() if isinstance(v, torch.Tensor)])
    return KERNELS[name].run_reference(xp, **args)


def check_against_reference(name: str, conv, got: dict, ref: dict, bound: float = 2e-5) -> None:
    for n in conv.written:
        out, want = got[n].cpu(), ref[n]
        if not out.is_floating_point():
            assert torch.equal(out, want.to(out.dtype)), f"{name}: {n} differs from the reference"
            continue
        assert not out.isnan().any(), f"{name}: {n} has NaN (unwritten elements)"
        o, r = out.double(), want.double()
        err = (o - r).norm().item() / max(r.norm().item(), 1e-30)
        assert err <= bound, f"{name}: {n} relative error {err:.2e} over {bound:.0e}"


# ---------------------------------------------------------------------- the order
@pytest.mark.parametrize("name,case", ALL_CASES)
def test_the_binders_order_is_the_generated_launch_signature(name, case):
    from tileflow.emit.cache import load_generated

    kernel = KERNELS[name]
    conv = binding.convention(name, flags_of(name, case))
    ir = kernel.build(kernel.params_for(case))
    conv.matches(ir)  # the arguments depend on the flags only, not on the case's other parameters
    module = load_generated(ir, "triton", variant="_interp")

    def positional(fn, skip=0):
        return tuple(p.name for p in list(inspect.signature(fn).parameters.values())[skip:]
                     if p.kind == p.POSITIONAL_OR_KEYWORD)

    assert positional(module.launch) == conv.order
    assert positional(module.launch_xla, skip=2) == conv.order  # after (call, empty)
    assert conv.written == tuple(v.name for v in ir.outputs)  # what launch_xla returns
    assert conv.inputs == tuple(v.name for v in ir.arguments if v.role in ("input", "inout"))
    # the sizes it derives are the case's (those the tensors carry)
    sizes = conv.sizes(draw(name, case, conv, ir.params), {d: case.sizes[d] for d in ir.dims
                                                          if d in case.sizes and not any(
                                                              d in t.shape for t in conv.tensors
                                                              if t.role != "output")})
    assert {d: sizes[d] for d in ir.dims} == {d: case.sizes[d] for d in ir.dims}


def test_the_pallas_launch_takes_the_same_order():
    from tileflow.emit.cache import generate

    for name, kernel in KERNELS.items():
        case = kernel.test_cases[0]
        conv = binding.convention(name, flags_of(name, case))
        text = generate(kernel.build(kernel.params_for(case)), "pallas")
        line = next(x for x in text.splitlines() if x.startswith("def launch("))
        assert line.startswith(f"def launch({', '.join(conv.order)}, *,"), (name, line)


# ---------------------------------------------------------------------- misuse
def _one_line_error(exc_type, fn, *needles):
    with pytest.raises(exc_type) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_misuse_is_a_one_line_error(name):
    kernel = KERNELS[name]
    case = kernel.test_cases[0]
    flags = flags_of(name, case)
    conv = binding.convention(name, flags)
    params = kernel.params_for(case)
    values = draw(name, case, conv, params)
    given = {d: case.sizes[d] for t in conv.tensors if t.role == "output" for d in t.shape
             if not any(d in u.shape for u in conv.tensors if u.role != "output")}
    conv.sizes(values, given)  # as drawn: fine

    first = conv.inputs[0]
    _one_line_error(binding.BindingError, lambda: conv.sizes({k: v for k, v in values.items() if k != first}, given),
                    "missing", repr(first))
    if conv.scalars:
        s = conv.scalars[-1]
        _one_line_error(binding.BindingError, lambda: conv.sizes({k: v for k, v in values.items() if k != s}, given),
                        "missing", repr(s))
    _one_line_error(binding.BindingError, lambda: conv.sizes({**values, "bogus": values[first]}, given),
                    "'bogus'", name)
    # every axis of every tensor: a size off by one disagrees with another tensor or an allocated
    # output's given size, or (a size only this axis has) at least reaches the launch as such
    for t in conv.tensors:
        if t.role == "output":
            continue
        for axis, d in enumerate(t.shape):
            others = [u for u in conv.tensors if u.role != "output" and d in u.shape and u is not t]
            if not others and d not in given:
                continue
            bad = list(values[t.name].shape)
            bad[axis] += 1
            wrong = torch.zeros(bad, dtype=values[t.name].dtype)
            _one_line_error(binding.ShapeError, lambda: conv.sizes({**values, t.name: wrong}, given), t.name, d)
    # a wrong rank
    wrong = values[first].reshape(-1, *values[first].shape)
    _one_line_error(binding.ShapeError, lambda: conv.sizes({**values, first: wrong}, given), first, "dims")
    # an output of the wrong shape, given
    for o in conv.outputs:
        ok = conv.sizes(values, given)
        shape = list(conv.shape(o, ok))
        shape[-1] += 1
        _one_line_error(binding.ShapeError, lambda: conv.sizes({**values, o: torch.zeros(shape)}, given), o)
    # an output nothing allocates
    if conv.outputs:
        _one_line_error(binding.BindingError, lambda: binding.bind(name, values, flags, given),
                        "missing the output", conv.outputs[0])


def test_unknown_kernels_and_flags_that_remove_an_argument():
    _one_line_error(binding.BindingError, lambda: binding.convention("no_such_kernel"), "no_such_kernel")
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    conv = binding.convention("matvec", {"HAS_BIAS": 0})
    assert conv.order == ("x", "w", "out")
    _one_line_error(binding.BindingError, lambda: conv.sizes({"x": x, "w": w, "b": torch.randn(4)}),
                    "HAS_BIAS=0", "'b'")
    assert binding.convention("matvec", {"HAS_BIAS": 1}).order == ("x", "w", "b", "out")
    # None counts as not given
    assert conv.sizes({"x": x, "w": w, "b": None}) == {"HAS_BIAS": 0, "M": 2, "K": 8, "N": 4}


def test_the_torch_runtime_reports_misuse_in_one_line():
    from tileflow.runtime import ops

    x, w = torch.randn(1, 8), torch.randn(8)
    _one_line_error(binding.BindingError, lambda: ops.launch("rms_norm", {"x": x, "w": w}), "missing", "'eps'")
    _one_line_error(binding.ShapeError, lambda: ops.launch("rms_norm", {"x": x, "w": torch.randn(9), "eps": 1e-6}),
                    "w", "D=8")
    _one_line_error(binding.BindingError, lambda: ops.launch("rms_norm", {"x": x, "w": w, "eps": 1e-6, "b": None}),
                    "None")
    _one_line_error(binding.ShapeError, lambda: ops.matvec(x, torch.randn(4, 9)), "K=8")


# ---------------------------------------------------------------------- running
@pytest.mark.parametrize("name,case", CASES)
def test_called_through_the_binder_each_target_equals_the_reference(name, case):
    """The case's own parameters, the arguments bound by name: the generated Triton code
    (interpreter) and the fp32 reference launcher, on poisoned outputs."""
    from tileflow.runtime import ops
    from tileflow.runtime.torch_triton import triton_launcher

    kernel = KERNELS[name]
    flags = flags_of(name, case)
    conv = binding.convention(name, flags)
    ir = kernel.build(kernel.params_for(case))
    dtype, bound_ = dtype_of(case)
    values = draw(name, case, conv, ir.params, seed=len(case.label), dtype=dtype)
    ref = reference(name, conv, values)
    for target in ("triton", "reference"):
        inout = {n: values[n].clone() for n in conv.written if n not in conv.outputs}
        given = {**values, **inout}
        sizes = conv.sizes(given, {d: case.sizes[d] for d in ir.dims if d in case.sizes})
        outs = poisoned(conv, sizes, dtype)
        bound = binding.bind(name, {**given, **outs}, flags, {d: case.sizes[d] for d in ir.dims})
        assert [id(a) for a in bound.arguments[:len(conv.tensors)]] == \
            [id(({**given, **outs})[t.name]) for t in conv.tensors]
        run = triton_launcher(ir, DEVICE.type) if target == "triton" else ops._reference_launcher(kernel, ir)
        run(*bound.arguments)
        check_against_reference(f"{name}/{case.label}/{target}", conv, {**inout, **bound.outputs}, ref, bound_)


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_runs_through_the_torch_runtime_by_name(name, target, tileflow_options):
    """``ops.launch(name, named values)``: nothing per kernel in the runtime. The outputs
    are allocated by the binder (first call) or given poisoned (second)."""
    from tileflow.runtime import ops

    tileflow_options(cpu_target=target)
    kernel = KERNELS[name]
    case = next(c for c in kernel.test_cases if c.runs_on("triton") and not c.params
                and (not c.dtypes or "fp32" in c.dtypes))
    flags = flags_of(name, case)
    conv = binding.convention(name, flags)
    ir = kernel.build(kernel.params_for(case))
    # sizes no input has (qkv_rope_cache's head count of q) are the caller's to give
    extra = {d: case.sizes[d] for d in ir.dims if not any(d in t.shape for t in conv.tensors if t.role != "output")}
    values = draw(name, case, conv, ir.params, seed=7)
    ref = reference(name, conv, values)
    inout = {n: values[n].clone() for n in conv.written if n not in conv.outputs}
    outs = ops.launch(name, {**values, **inout}, {**flags, **extra})
    assert len(outs) == len(conv.outputs)
    check_against_reference(f"{name}/{target}", conv, {**inout, **dict(zip(conv.outputs, outs))}, ref)
    # given outputs are written, not replaced
    inout = {n: values[n].clone() for n in conv.written if n not in conv.outputs}
    sizes = conv.sizes({**values, **inout}, extra)
    given = poisoned(conv, sizes)
    again = ops.launch(name, {**values, **inout, **given}, {**flags, **extra})
    assert all(a is given[n] for a, n in zip(again, conv.outputs))
    check_against_reference(f"{name}/{target}/given", conv, {**inout, **given}, ref)


def test_a_call_site_resolves_its_binding_once(tileflow_options, monkeypatch):
    """Per call only the sizes are read and a plan looked up: the convention and the
    launcher are not derived again."""
    from tileflow.runtime import ops

    tileflow_options(cpu_target="reference")
    x, w = torch.randn(1, 16), torch.randn(16)
    ops.rms_norm(x, w, 1e-6)
    calls = []
    monkeypatch.setattr(binding.Convention, "sizes", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(ops, "_launcher", lambda *a, **k: calls.append(1))
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    for _ in range(3):
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), want)
    assert not calls
    monkeypatch.undo()
    # clearing the launchers (the tests, the step tuner) drops the resolved plans with them
    ops._LAUNCHERS.clear()
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), want)
    assert [k[0] for k in ops._LAUNCHERS] == ["rms_norm"]


def test_a_growing_cache_shares_its_launcher_per_power_of_two(tileflow_options):
    from tileflow.runtime import ops

    tileflow_options(cpu_target="reference")
    q = torch.randn(1, 4, 16)
    before = set(ops._LAUNCHERS)
    for s in range(9, 17):
        kc, vc = torch.randn(1, 2, s, 16), torch.randn(1, 2, s, 16)
        ops.gqa_attention(q, kc, vc, torch.tensor([s]), 0.25)
    new = [k for k in ops._LAUNCHERS if k not in before and k[0] == "gqa_attention"]
    assert len(new) <= 1 and all(dict(k[1])["S"] == 16 for k in new)
