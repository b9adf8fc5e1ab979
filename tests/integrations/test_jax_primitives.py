"""Every tileflow.jax primitive against the float64 reference, the way
tileflow.verify checks the suite: fresh random inputs each run, outputs poisoned
(NaN / -1) inside the primitive, relative error under the bound of the dtype, any
NaN fails. Both CPU lowerings run: the jax.numpy reference and the generated Pallas
code under the interpreter (the option jax_target="pallas"). Plus jit / vmap."""

import dataclasses
import secrets

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from tileflow import settings  # noqa: E402
from tileflow.integrations.jax import primitives  # noqa: E402
from tileflow.suite import KERNELS  # noqa: E402
from tileflow.suite.rope import ROPE_SCALARS  # noqa: E402
from tileflow.verify import BOUNDS, DTYPES, compare, make_inputs, reference_outputs  # noqa: E402

def _sizes(kernel, case) -> dict:
    """The case's sizes a caller passes: the views' dims and the structural sizes."""
    params = kernel.params_for(case)
    ir = kernel.build(params)
    dims = {d for v in ir.arguments for d in v.shape}
    # a dim that is also a fixed parameter (moe_experts' GATE_UP = 2) is in no case's sizes
    sizes = {d: case.sizes[d] if d in case.sizes else params[d] for d in dims}
    return {**sizes, **kernel.structural_sizes(case.sizes)}


def _to_jax(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(t.numpy())


def _operand(inputs: dict, view):
    """The JAX operand of ``view``: tileflow.verify makes fp8 weights as fp32 tensors of fp8
    values (torch has no numpy float8), the primitive takes float8_e4m3fn (an exact cast)."""
    a = _to_jax(inputs[view.name])
    return a.astype(jnp.float8_e4m3fn) if view.dtype == "f8e4m3" else a


def _to_torch(a) -> torch.Tensor:
    if a.dtype == jnp.float8_e4m3fn:  # numpy float8 has no torch twin: through fp32, exactly
        return torch.from_numpy(np.asarray(a.astype(jnp.float32)).copy()).to(torch.float8_e4m3fn)
    a = np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)
    return torch.from_numpy(a.copy())


def _target(monkeypatch, target: str) -> None:
    """The option ``jax_target`` for this test (the environment's options are read once)."""
    monkeypatch.setattr(settings, "ENVIRONMENT", dataclasses.replace(settings.ENVIRONMENT, jax_target=target))


def check(name, case, dtype, target, monkeypatch, seed=None):
    """Relative errors of the primitive's outputs vs float64; raises on failure."""
    _target(monkeypatch, target)
    kernel = KERNELS[name]
    sizes = _sizes(kernel, case)
    key = tuple(sorted(sizes.items()))
    seed = secrets.randbits(31) if seed is None else seed
    ir = kernel.build(kernel.params_for(case))
    inputs = make_inputs(kernel, ir, case, DTYPES[dtype], torch.Generator().manual_seed(seed))
    views = primitives.input_views(name, key)
    outs = jax.jit(lambda *ops: primitives.bind(name, ops, sizes, dict(case.scalars)))(
        *[_operand(inputs, v) for v in views])
    ref = reference_outputs(kernel, inputs, dict(case.scalars))
    errors = {}
    for v, got in zip(primitives.kernel_ir(name, key).outputs, outs):
        err, problem = compare(_to_torch(got), ref[v.name])
        assert not problem, f"{name}/{case.label}/{dtype}/{target} seed={seed}: {v.name}: {problem}"
        if got.dtype != jnp.int32 and got.dtype != jnp.int64:
            assert err <= BOUNDS[dtype], f"{name}/{case.label}/{dtype}/{target} seed={seed}: {v.name} {err:.2e}"
        errors[v.name] = err
    return errors


# Added under a CI time budget: by default each of their cases runs one dtype per target,
# alternating, so every case x target and every target x dtype still runs; --full runs all.
ROTATED = ("mla_latent_cache", "mla_attention", "moe_router", "moe_experts", "matvec_int4", "matvec_fp8")


def _matrix():
    out = []
    for name, kernel in sorted(KERNELS.items()):
        if name not in primitives_names():
            continue
        for i, case in enumerate(kernel.test_cases):
            if not case.runs_on("pallas"):  # the reference runs what Pallas can express
                continue
            dtypes = [d for d in ("fp32", "bf16") if not case.dtypes or d in case.dtypes]
            for dtype in dtypes:
                for j, (target, tag) in enumerate((("reference", "ref"), ("pallas", "pallas"))):
                    swept = name in ROTATED and len(dtypes) > 1 and dtype != ("fp32", "bf16")[(i + j) % 2]
                    out.append(pytest.param(name, case, dtype, target, id=f"{name}-{case.label}-{tag}-{dtype}",
                                            marks=[pytest.mark.full] if swept else []))
                if _TRITON_ON_GPU and not case.targets:  # compiled, through jax_triton (the GPU machine)
                    out.append(pytest.param(name, case, dtype, "triton", id=f"{name}-{case.label}-triton-{dtype}"))
    return out


def _triton_on_gpu() -> bool:
    from tileflow.runtime.triton_xla import jax_triton_missing

    return jax.default_backend() in ("gpu", "cuda", "rocm") and not jax_triton_missing()


_TRITON_ON_GPU = _triton_on_gpu()


def primitives_names():
    return ("rms_norm", "embedding_lookup", "matvec", "matvec_pair", "rope_q", "rope_k",
            "gqa_attention", "matvec_residual", "gate_up_silu",
            "silu_mul", "residual_add", "argmax_greedy", "mla_latent_cache", "mla_attention", "moe_router",
            "moe_experts", "matvec_int4", "matvec_fp8")


def test_every_suite_kernel_has_a_case():
    assert {p.values[0] for p in _matrix()} == set(primitives_names())


def test_every_registered_kernel_has_a_jax_function():
    """Each suite kernel is a ``tileflow.jax`` function of its name (a kernel registered
    without one fails here), and the matrix above runs its primitive."""
    from tileflow import jax as tfj

    missing = sorted(n for n in KERNELS if not callable(getattr(tfj, n, None)) or n not in tfj.__all__)
    assert not missing, f"suite kernels without a tileflow.jax function: {', '.join(missing)}"
    fused = {"qkv_rope_cache", "rms_norm_gate_up_silu", "rms_norm_matvec"}  # test_jax_optimize.py runs these
    assert set(KERNELS) - set(primitives_names()) == fused | set(QUANT_FUSED)


# the quantized matvecs' fused forms: name -> the function's arguments from the kernel's named inputs
# (their kernels' Triton and Pallas code is what tests/suite/test_matvec_quant_fused.py checks)
def _weight(t, suffix):
    return tuple(t[n + suffix] for n in (("qw", "scales", "zeros") if f"qw{suffix}" in t else ("w", "ws")))


QUANT_FUSED = {
    **{f"rms_norm_gate_up_silu_{kind}": lambda t, s: (t["x"], t["ln_w"], s["eps"], _weight(t, "_g"), _weight(t, "_u"))
       for kind in ("int4", "fp8")},
    **{f"matvec_residual_{kind}": lambda t, s: (t["x"], _weight(t, ""), t["r"]) for kind in ("int4", "fp8")},
    **{f"rms_norm_qkv_rope_cache_{kind}": lambda t, s: (
        t["x"], t["ln_w"], s["eps"], *(_weight(t, x) for x in ("_q", "_k", "_v")), t.get("b_q"), t.get("b_k"),
        t.get("b_v"), t["pos"], t["k_cache"], t["v_cache"]) for kind in ("int4", "fp8")},
}


@pytest.mark.parametrize("name,case", [pytest.param(name, case, id=f"{name}-{case.label}")
                                       for name in sorted(QUANT_FUSED) for case in KERNELS[name].test_cases
                                       if case.sizes["M"] > 1])
def test_the_quantized_fused_functions(name, case, monkeypatch):
    """Each fused quantized form's ``tileflow.jax`` function (the reference lowering, jit) on its
    cases of several rows (the rope form's: a batch written at its cache rows, a verify step's
    tokens): its arguments reach the kernel by name, its outputs match float64."""
    from tileflow import jax as tfj

    _target(monkeypatch, "reference")
    kernel = KERNELS[name]
    ir = kernel.build(kernel.params_for(case))
    inputs = make_inputs(kernel, ir, case, torch.float32, torch.Generator().manual_seed(secrets.randbits(31)))
    views = ir.inputs + [v for v in ir.outputs if v.role == "inout"]
    args = QUANT_FUSED[name]({v.name: _operand(inputs, v) for v in views}, case.scalars)
    kwargs = {}
    if "ROPE_KIND" in ir.params:  # the rotation as the kernel's kind and scalars, the cache rows where given
        kind = ir.params["ROPE_KIND"]
        kwargs["rope"] = (kind, {n: case.scalars[n] for n in ROPE_SCALARS[kind]})
        if "cache_pos" in inputs:
            kwargs["cache_pos"] = _operand(inputs, ir.view("cache_pos"))
    # jit over the arrays; the scalars, kinds and absent biases as constants
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]

    def call(*given):
        filled = list(leaves)
        for i, a in zip(arrays, given):
            filled[i] = a
        a, kw = jax.tree_util.tree_unflatten(tree, filled)
        return getattr(tfj, name)(*a, **kw)

    outs = jax.jit(call)(*[leaves[i] for i in arrays])
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref = reference_outputs(kernel, inputs, dict(case.scalars))
    for v, got in zip(ir.outputs, outs):
        err, problem = compare(_to_torch(got), ref[v.name])
        assert not problem and err <= BOUNDS["fp32"], (name, v.name, problem, err)


@pytest.mark.parametrize("name,case,dtype,target", _matrix())
def test_primitive_matches_reference(name, case, dtype, target, monkeypatch):
    check(name, case, dtype, target, monkeypatch)


def test_the_check_fails_on_a_wrong_result(monkeypatch):
    """A primitive lowered to a wrong function is caught (so the tests above can fail)."""
    from tileflow.integrations.jax import lowering

    real = lowering.reference_impl

    def wrong(name):
        impl = real(name)
        return lambda *ops, **p: [o * 1.01 for o in impl(*ops, **p)]

    monkeypatch.setattr(lowering, "reference_impl", wrong)
    monkeypatch.setattr(primitives, "PRIMITIVES", {})  # fresh primitives pick up the wrong lowering
    with pytest.raises(AssertionError, match="rms_norm"):
        check("rms_norm", KERNELS["rms_norm"].test_cases[0], "fp32", "reference", monkeypatch, seed=1)


@pytest.mark.parametrize("target", ["reference", "pallas"])
def test_vmap_merges_rows_and_maps_batched_weights(target, monkeypatch):
    _target(monkeypatch, target)
    from tileflow import jax as tfj

    k = jax.random.split(jax.random.key(secrets.randbits(31)), 3)
    x = jax.random.normal(k[0], (3, 1, 40))
    w = jax.random.normal(k[1], (3, 24, 40))
    r = jax.random.normal(k[2], (3, 1, 24))
    # expectations in float64 numpy: on a GPU, XLA's fp32 matmuls default to TF32
    xf, wf, rf = (np.asarray(a, np.float64) for a in (x, w, r))
    want = np.stack([xf[i] @ wf[i].T + rf[i] for i in range(3)])
    got = jax.jit(jax.vmap(tfj.matvec_residual))(x, w, r)  # weights batched: one call per element
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    got = jax.vmap(tfj.matvec_residual, in_axes=(0, None, 0))(x, w[0], r)  # rows merged
    np.testing.assert_allclose(got, np.einsum("bmk,nk->bmn", xf, wf[0]) + rf, rtol=2e-5, atol=2e-5)
    norm = jax.vmap(lambda v: tfj.rms_norm(v, w[0, 0], 1e-6))(x)
    ref = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-6) * np.asarray(w[0, 0], np.float64)
    np.testing.assert_allclose(norm, ref, rtol=2e-5, atol=2e-5)


def test_eager_equals_jit(monkeypatch):
    _target(monkeypatch, "reference")
    from tileflow import jax as tfj

    x = jax.random.normal(jax.random.key(0), (2, 64))
    assert np.array_equal(tfj.argmax_greedy(x), jax.jit(tfj.argmax_greedy)(x))
    assert np.array_equal(tfj.argmax_greedy(x), jnp.argmax(x, -1))


def test_compiled_lowering_allocates_outputs_instead_of_filling(monkeypatch):
    """Compiled, a primitive's outputs start as ``lax.empty`` (an allocation, no fill
    kernel); interpreted they start poisoned. The launch is stubbed: this checks what
    the lowering hands it (the compiled path cannot run on a CPU)."""
    from tileflow.integrations.jax import lowering
    from tileflow.integrations.jax.primitives import kernel_ir
    from tileflow.runtime import jax_pallas

    seen, empties = {}, []
    real_empty = jax.lax.empty

    def spy_empty(shape, dtype, **kw):
        empties.append((tuple(shape), jnp.dtype(dtype)))
        return real_empty(shape, dtype, **kw)

    def fake_launcher(ir):
        def launch(*args, interpret):
            seen[interpret] = args
            return [args[-1]]  # matvec_residual's output argument comes last
        return launch

    monkeypatch.setattr(jax.lax, "empty", spy_empty)
    monkeypatch.setattr(jax_pallas, "pallas_launcher", fake_launcher)
    x, w, r = jnp.ones((1, 16)), jnp.ones((8, 16)), jnp.ones((1, 8))
    sizes = tuple(sorted({"M": 1, "N": 8, "K": 16}.items()))
    assert [v.name for v in kernel_ir("matvec_residual", sizes).outputs] == ["out"]
    for interpret in (False, True):
        lowering.pallas_impl("matvec_residual", interpret)(x, w, r, sizes=sizes, scalars=(), target="pallas")
    assert empties == [((1, 8), jnp.dtype(jnp.float32))]
    assert np.isnan(np.asarray(seen[True][-1])).all()


def _torch_stage_call(kernel, grid, reads, writes, scalars, meta):
    """A stage of ``launch_xla`` on JAX arrays: on a GPU with jax_triton the real custom
    call (eagerly), else Triton's own launcher on torch copies (the interpreter on CPU)."""
    from tileflow.runtime.triton_xla import jax_call, jax_triton_missing, torch_call

    if jax.default_backend() != "cpu" and not jax_triton_missing():
        return jax_call(kernel, grid, reads, writes, scalars, meta)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    to_t = [_to_torch(a).to(dev) for a in reads], [_to_torch(a).to(dev) for a in writes]
    outs = torch_call(kernel, grid, *to_t, scalars, meta)
    return tuple(jnp.asarray(o.cpu().numpy()).astype(w.dtype) for o, w in zip(outs, writes))


def _poisoned_empty(shape, dtype, **kw):
    dtype = jnp.dtype({"f32": "float32", "i32": "int32", "i64": "int64"}.get(dtype, dtype))
    return jnp.full(shape, jnp.nan if jnp.issubdtype(dtype, jnp.floating) else -1, dtype)


@pytest.mark.parametrize("name", primitives_names())
def test_triton_target_lowering_runs_the_triton_kernel(name, monkeypatch):
    """``TILEFLOW_JAX_TARGET=triton`` (CUDA / ROCm) lowers to the generated Triton
    kernel's ``launch_xla``; here the custom call is replaced by Triton's own launcher
    (the interpreter on CPU), with the primitive's outputs and workspaces poisoned,
    against the float64 reference. The compiled custom calls are the matrix's ``triton``
    cases, on a GPU with jax_triton."""
    from tileflow.integrations.jax import lowering
    from tileflow.runtime.torch_triton import use_interpreter_if_no_gpu

    interpret = use_interpreter_if_no_gpu()
    monkeypatch.setattr(jax.lax, "empty", _poisoned_empty)
    kernel = KERNELS[name]
    case = next((c for c in kernel.test_cases if not c.targets), None) or kernel.test_cases[0]
    sizes = _sizes(kernel, case)
    key = tuple(sorted(sizes.items()))
    ir = kernel.build(kernel.params_for(case))
    seed = secrets.randbits(31)
    inputs = make_inputs(kernel, ir, case, torch.float32, torch.Generator().manual_seed(seed))
    ops = [_operand(inputs, v) for v in primitives.input_views(name, key)]
    impl = lowering.triton_impl(name, call=_torch_stage_call, empty=_poisoned_empty, interpret=interpret)
    outs = impl(*ops, sizes=key, scalars=tuple(sorted(case.scalars.items())), target="triton")
    ref = reference_outputs(kernel, inputs, dict(case.scalars))
    for v, got in zip(primitives.kernel_ir(name, key).outputs, outs):
        err, problem = compare(_to_torch(got), ref[v.name])
        assert not problem and (got.dtype in (jnp.int32, jnp.int64) or err <= BOUNDS["fp32"]), (name, seed, v.name,
                                                                                                err, problem)


def test_triton_target_is_refused_on_cpu(monkeypatch):
    _target(monkeypatch, "triton")
    cpu = jax.devices("cpu")[0]
    x, w = jax.device_put(jnp.ones((1, 16)), cpu), jax.device_put(jnp.ones((16,)), cpu)
    with jax.default_device(cpu), pytest.raises(NotImplementedError, match="CUDA / ROCm GPUs only"):
        jax.jit(lambda a, b: primitives.bind("rms_norm", (a, b), {"M": 1, "D": 16}, {"eps": 1e-6}))(x, w)


@pytest.mark.parametrize("call,needle", [
    (lambda: _tfj().rms_norm(jnp.float32(1.0), jnp.ones(4), 1e-6), "rms_norm: x must have at least 1 dimension"),
    (lambda: _tfj().rms_norm(jnp.ones((2, 4)), jnp.ones((2, 4)), 1e-6), "rms_norm: w must have 1 dimension"),
    (lambda: _tfj().embedding_lookup(jnp.zeros(2, jnp.int32), jnp.ones(4)), "embedding_lookup: table must have 2 dimensions"),
    (lambda: _tfj().matvec(jnp.ones(4), jnp.ones(4)), "matvec: w must have 2 dimensions"),
    (lambda: _tfj().matvec(jnp.float32(1.0), jnp.ones((3, 4))), "matvec: x must have at least 1 dimension"),
    (lambda: _tfj().matvec_pair(jnp.ones(4), jnp.ones(4), jnp.ones(4)), "matvec_pair: wk must have 2 dimensions"),
    (lambda: _tfj().matvec_residual(jnp.ones(4), jnp.ones(4), jnp.ones(3)), "matvec_residual: w must have 2"),
    (lambda: _tfj().gate_up_silu(jnp.ones(4), jnp.ones(4), jnp.ones((3, 4))), "gate_up_silu: wg must have 2"),
    (lambda: _tfj().silu_mul(jnp.float32(1.0), jnp.float32(2.0)), "silu_mul: a must have at least 1 dimension"),
    (lambda: _tfj().residual_add(jnp.ones(3), jnp.ones(4)), "residual_add: a and b have shapes (3,) and (4,)"),
    (lambda: _tfj().rope_q(jnp.ones((2, 4)), jnp.zeros(2, jnp.int32), 1e4), "rope_q: x must have 3 dimensions"),
    (lambda: _tfj().gqa_attention(jnp.ones((2, 4)), jnp.ones((1, 1, 8, 4)), jnp.ones((1, 1, 8, 4)),
                                     jnp.ones(1, jnp.int32), 0.5), "gqa_attention: q must have 3 dimensions"),
    (lambda: _tfj().argmax_greedy(jnp.float32(1.0)), "argmax_greedy: logits must have at least 1 dimension"),
    (lambda: _tfj().rms_norm_matvec(jnp.float32(1.0), jnp.ones(4), 1e-6, jnp.ones((3, 4))),
     "rms_norm_matvec: x must have at least 1 dimension"),
    (lambda: _tfj().mla_latent_cache(jnp.ones((1, 8)), jnp.ones((6, 8)), jnp.ones(4), 1e-6, jnp.zeros(1, jnp.int32),
                                     jnp.ones(1), 1.0, 0, jnp.ones((1, 5, 4)), jnp.ones((5, 2))),
     "mla_latent_cache: pe_cache must have 3 dimensions"),
    (lambda: _tfj().mla_attention(jnp.ones((2, 4)), jnp.ones((1, 2, 4)), jnp.ones((1, 8, 4)), jnp.ones((1, 8, 4)),
                                  jnp.ones(1, jnp.int32), jnp.ones((2, 4, 4)), jnp.ones((2, 4, 4)), 0.5),
     "mla_attention: q_nope must have 3 dimensions"),
    (lambda: _tfj().moe_router(jnp.ones((1, 8)), jnp.ones(8), 2, 1.0), "moe_router: w must have 2 dimensions"),
    (lambda: _tfj().moe_experts(jnp.ones((1, 8)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)),
                                jnp.ones((4, 8)), jnp.ones((4, 8, 2))), "moe_experts: gate_up must have at least 3"),
    (lambda: _tfj().matvec_int4(jnp.ones(256), jnp.zeros(128, jnp.uint8), jnp.ones((1, 2)), jnp.ones((1, 2))),
     "matvec_int4: qw must have 2 dimensions"),
    (lambda: _tfj().matvec_fp8(jnp.float32(1.0), jnp.zeros((8, 256), jnp.float8_e4m3fn), jnp.ones((1, 2))),
     "matvec_fp8: x must have at least 1 dimension"),
])
def test_entry_points_name_the_rank_they_expect(call, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()


def _tfj():
    from tileflow import jax as tfj

    return tfj
