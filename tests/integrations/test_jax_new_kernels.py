"""tileflow.jax's functions for the DeepSeek kernels (mla_latent_cache, mla_attention,
moe_router, moe_experts) and the low-precision matvecs (matvec_int4, matvec_fp8), called as
a user calls them (named arrays, scalars as keywords), against the kernel's float64
reference on fresh random inputs (tileflow.verify's makers: positions inside the cache,
distinct experts, real int4 codes and fp8 values), on the jax.numpy reference and on the
generated Pallas code under the interpreter; each also under ``jax.jit`` with its options
static. The primitives themselves, every test case, are test_jax_primitives.py's matrix."""

import secrets

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from tileflow import jax as tfj  # noqa: E402
from tileflow.suite import KERNELS  # noqa: E402
from tileflow.verify import BOUNDS, DTYPES, compare, make_inputs, reference_outputs  # noqa: E402

from tests.integrations.test_jax_primitives import _operand, _target, _to_torch  # noqa: E402

NEW = ("mla_latent_cache", "mla_attention", "moe_router", "moe_experts", "matvec_int4", "matvec_fp8")
# two cases a function, between them both sides of its option: rope layouts 0 / 2, no mask / mask,
# softmax / sigmoid+bias scores, no residual / residual, no bias / bias
CASES = {"mla_latent_cache": ("halves", "interleaved_out"), "mla_attention": ("odd", "mask"),
         "moe_router": ("group-limited", "noaux"), "moe_experts": ("odd", "residual"),
         "matvec_int4": ("rows", "bias"), "matvec_fp8": ("odd", "bias")}
# operands laid out by row, which the row-wise functions take with extra leading axes ([..., K])
ROW_OPERANDS = {"moe_router": ("x",), "moe_experts": ("x", "topk_idx", "topk_weight", "residual"),
                "matvec_int4": ("x",), "matvec_fp8": ("x",)}
# the options a jitted call keeps static: the kernel's runtime scalars
STATIC = {"mla_latent_cache": ("eps", "rope_scale", "rope_layout"), "mla_attention": ("scale",),
          "moe_router": ("top_k", "scale", "n_group", "topk_group", "norm_topk"),
          "moe_experts": (), "matvec_int4": (), "matvec_fp8": ()}
JIT_CASE = {"mla_latent_cache": "interleaved", "mla_attention": "split", "moe_router": "noaux-odd",
            "moe_experts": "tiny", "matvec_int4": "splitk-bias", "matvec_fp8": "rows"}


def _case(name, label):
    return next(c for c in KERNELS[name].test_cases if c.label == label)


def _draw(name, case, dtype, seed):
    """(torch inputs for the float64 reference, JAX keyword arguments of the function)."""
    kernel = KERNELS[name]
    ir = kernel.build(kernel.params_for(case))
    inputs = make_inputs(kernel, ir, case, DTYPES[dtype], torch.Generator().manual_seed(seed))
    views = {v.name: v for v in ir.arguments}
    args = {n: _operand(inputs, views[n]) for n in inputs}
    if name == "moe_experts" and case.sizes.get("HAS_RESIDUAL"):  # gate_up_proj as transformers stores it
        e, _, i, d = args["gate_up"].shape
        args["gate_up"] = args["gate_up"].reshape(e, 2 * i, d)
    return inputs, {**args, **case.scalars}


def _check(name, case, dtype, inputs, outs, seed, where):
    kernel = KERNELS[name]
    ref = reference_outputs(kernel, inputs, dict(case.scalars))
    outs = outs if isinstance(outs, tuple) else (outs,)
    names = [v.name for v in kernel.build(kernel.params_for(case)).outputs]
    assert len(outs) == len(names), f"{name}: {len(outs)} results, the kernel writes {names}"
    for n, got in zip(names, outs):
        want = ref[n]
        assert got.size == want.numel(), f"{name}/{case.label} {where}: {n} has shape {got.shape}"
        err, problem = compare(_to_torch(got.reshape(tuple(want.shape))), want)
        assert not problem, f"{name}/{case.label}/{dtype} {where} seed={seed}: {n}: {problem}"
        if jnp.issubdtype(got.dtype, jnp.floating):
            assert err <= BOUNDS[dtype], f"{name}/{case.label}/{dtype} {where} seed={seed}: {n} {err:.2e}"


def _matrix():
    out = []
    for name in NEW:
        for i, label in enumerate(CASES[name]):
            for j, target in enumerate(("reference", "pallas")):
                dtype = ("fp32", "bf16")[(i + j) % 2]  # each target sees both dtypes over the two cases
                out.append(pytest.param(name, label, target, dtype, id=f"{name}-{label}-{target}-{dtype}"))
    return out


@pytest.mark.parametrize("name,label,target,dtype", _matrix())
def test_function_matches_reference(name, label, target, dtype, monkeypatch):
    _target(monkeypatch, target)
    case = _case(name, label)
    seed = secrets.randbits(31)
    inputs, args = _draw(name, case, dtype, seed)
    lead = {n: a[None] for n, a in args.items() if n in ROW_OPERANDS.get(name, ())}  # a leading batch axis of 1
    outs = getattr(tfj, name)(**{**args, **lead})
    if lead:
        first = outs[0] if isinstance(outs, tuple) else outs
        assert first.shape[0] == 1 and first.ndim == 3, f"{name}: the leading axis is lost: {first.shape}"
    _check(name, case, dtype, inputs, outs, seed, target)


@pytest.mark.parametrize("name", NEW)
def test_function_under_jit(name, monkeypatch):
    """Jitted with the kernel's scalars static: one primitive in the program (the kernel, not
    a re-implementation), the Pallas kernel's result within the bound, and a second call on
    fresh inputs reuses the compiled program."""
    _target(monkeypatch, "pallas")
    case = _case(name, JIT_CASE[name])
    traces = []

    def traced(**kw):
        traces.append(1)
        return getattr(tfj, name)(**kw)

    fn = jax.jit(traced, static_argnames=STATIC[name])
    seed = secrets.randbits(31)
    inputs, args = _draw(name, case, "fp32", seed)
    text = str(fn.trace(**args).jaxpr)
    assert text.count("tileflow_") == 1 and f"tileflow_{name}[" in text, text
    _check(name, case, "fp32", inputs, fn(**args), seed, "jit")
    seed = secrets.randbits(31)
    inputs, args = _draw(name, case, "fp32", seed)
    _check(name, case, "fp32", inputs, fn(**args), seed, "jit, second call")
    assert len(traces) == 1, f"{name}: traced {len(traces)} times (.trace and both calls share one trace)"


def test_packed_weights_must_come_in_their_dtype():
    """A cast would change int4 codes or round fp8 values: the wrong dtype is an error."""
    x = jnp.ones((1, 256))
    with pytest.raises(TypeError, match="qw must be uint8, got int32"):
        tfj.matvec_int4(x, jnp.zeros((8, 128), jnp.int32), jnp.ones((8, 2)), jnp.zeros((8, 2)))
    with pytest.raises(TypeError, match="w must be float8_e4m3fn, got float32"):
        tfj.matvec_fp8(x, jnp.zeros((8, 256)), jnp.ones((1, 2)))


def test_moe_router_integer_options_stay_integers(monkeypatch):
    """top_k / n_group / topk_group reach the reference as ints (it loops and reshapes by
    them), whatever number type the caller used; the result equals numpy's top-k."""
    _target(monkeypatch, "reference")
    k = jax.random.split(jax.random.key(secrets.randbits(31)), 2)
    x, w = jax.random.normal(k[0], (3, 16)), jax.random.normal(k[1], (8, 16))
    idx, wt = tfj.moe_router(x, w, np.int64(3), 1.0, n_group=2.0, topk_group=2)
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.argsort(-p, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_allclose(np.asarray(wt), np.take_along_axis(p, want, -1), rtol=1e-5)
