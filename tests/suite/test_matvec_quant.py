"""The low-precision weight matvecs against their dequantize-then-matmul references.

``matvec_int4`` and ``matvec_fp8`` run through the suite harness (every case x target x dtype: fresh random
inputs, NaN-poisoned outputs, float64 reference of ``x @ dequant(W).T``; norm-wise relative
error under tileflow.verify.BOUNDS: fp32 2e-5, i.e. fp32 rounding of K-term sums; bf16 1e-2,
the output's rounding, 2^-9 a value, and the interpreter's truncating bf16 store). Beside it:
the quantize helpers' round trips, and the kernels fed by the helpers on real-looking weights.
The harness holds matvec_fp8's fp8 weight values in fp32 tensors (its input draw converts
every non-storage float to fp32); the tests below pass real torch.float8_e4m3fn tensors.

matvec_fp8 against transformers: ``FP8Linear.forward`` has no CPU path (it loads the Hub's
finegrained-fp8 Triton kernel, CUDA only, or fails), so the kernels are checked against
``quantize.fp8_linear_torch``, a torch re-implementation of that kernel's math, and the
quantizer against transformers' own ``Fp8Quantize`` / ``_dequantize_fp8_weight``.
"""

import pytest
import torch

from tests.suite.harness import make_test
from tileflow.suite import KERNELS
from tileflow.suite.quantize import (GROUP, dequantize_fp8, dequantize_int4, fp8_linear_torch, quantize_fp8,
                                     quantize_int4, unpack_int4)
from tileflow.verify import poisoned_outputs, run_target

test_matvec_int4 = make_test("matvec_int4")
test_matvec_fp8 = make_test("matvec_fp8")


def _weight(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) / k ** 0.5


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_int4_round_trip_is_within_half_a_step(dtype):
    w = _weight(48, 512, 0).to(dtype)
    packed, scales, zeros = quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 256)
    assert scales.dtype == zeros.dtype == dtype and scales.shape == zeros.shape == (48, 512 // GROUP)
    err = (dequantize_int4(packed, scales, zeros) - w.float()).abs()
    step = scales.float().repeat_interleave(GROUP, dim=1)
    # round to nearest of the 16 levels: half a step, plus the rounding of the bf16 zero point
    slack = 0 if dtype == torch.float32 else 2.0 ** -8 * zeros.float().abs().repeat_interleave(GROUP, dim=1)
    assert (err <= step / 2 * (1 + 1e-5) + slack).all()
    # every group uses its whole range: the smallest and the largest code both occur
    q = unpack_int4(packed).reshape(48, -1, GROUP)
    assert (q.amin(-1) == 0).all() and (q.amax(-1) == 15).all()


def test_int4_packing_pairs_column_j_with_column_j_plus_half():
    q = torch.randint(0, 16, (3, 512), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    scales = torch.ones(3, 4)
    w = (q - 8).float()  # zero point 0 (min + 8 * scale with min = -8): codes come back as drawn
    w[:, ::GROUP] = -8
    w[:, 1::GROUP] = 7
    packed, s, z = quantize_int4(w)
    assert torch.equal(s, scales) and torch.equal(z, torch.zeros(3, 4))
    want = (w + 8).to(torch.int32)
    assert torch.equal(packed.to(torch.int32), want[:, :256] | (want[:, 256:] << 4))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_int4(torch.randn(2, 384))


def _launch(name, target, inputs, dtype, sizes, **params):
    """The kernel's ``out`` on poisoned outputs; Pallas gets fp8 tensors as jax float8 arrays."""
    from tileflow.suite.registry import Case

    kernel = KERNELS[name]
    case = Case("helper", sizes)
    ir = kernel.build({**kernel.params_for(case), **params})
    out = poisoned_outputs(ir, case, dtype)
    if target != "pallas":
        return run_target(kernel, ir, target, inputs, out, {})["out"]
    import jax.numpy as jnp
    import numpy as np

    from tileflow.runtime.jax_pallas import pallas_launcher

    def to_jax(t):
        if t.dtype == torch.float8_e4m3fn:  # numpy has no fp8: the bytes, viewed as jax's
            return jnp.asarray(t.view(torch.uint8).numpy()).view(jnp.float8_e4m3fn)
        if t.dtype == torch.bfloat16:
            return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
        return jnp.asarray(t.numpy())

    tensors = {**inputs, **out}
    (res,) = pallas_launcher(ir)(*[to_jax(tensors[v.name]) for v in ir.arguments], interpret=True)
    return torch.from_numpy(np.asarray(res.astype(jnp.float32)).copy()).to(dtype)


@pytest.mark.parametrize("target", ("triton", "pallas"))
def test_int4_kernel_on_quantized_weights_equals_dequantized_matmul(target):
    n, k = 40, 1024
    w = _weight(n, k, 2)
    packed, scales, zeros = quantize_int4(w)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    got = _launch("matvec_int4", target, dict(x=x, qw=packed, scales=scales, zeros=zeros), torch.float32,
                  dict(M=2, N=n, K=k, KH=k // 2, G=k // GROUP))
    want = x.double() @ dequantize_int4(packed, scales, zeros).double().T
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-6


def test_fp8_quantizer_is_transformers_fp8_quantize():
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight

    w = _weight(256, 384, 4).to(torch.bfloat16)
    w[:128, 128:256] = 0  # an all-zero block: scale_inv 1, codes 0
    config = SimpleNamespace(weight_block_size=[128, 128], scale_fmt="float")
    theirs = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("l.weight", w)
    q, scale_inv = quantize_fp8(w)
    assert torch.equal(q.view(torch.uint8), theirs["l.weight"].view(torch.uint8))
    assert torch.equal(scale_inv, theirs["l.weight_scale_inv"]) and scale_inv[0, 1] == 1
    deq = _dequantize_fp8_weight(q, scale_inv, [128, 128], torch.float32)
    assert torch.equal(dequantize_fp8(q, scale_inv), deq)
    # a block's largest weight lands on 448, and dequantizing is within half an fp8 step
    assert (q.float().abs().reshape(2, 128, 3, 128).amax(dim=(1, 3))[scale_inv != 1] == 448).all()
    err = (deq - w.float()).abs()
    assert (err <= 2.0 ** -4 * w.float().abs() + 2.0 ** -10 * scale_inv.max()).all()


def test_fp8_quantizer_takes_ragged_blocks():
    w = _weight(150, 200, 5)
    q, scale_inv = quantize_fp8(w)
    assert q.shape == (150, 200) and scale_inv.shape == (2, 2)
    assert ((dequantize_fp8(q, scale_inv) - w).abs() <= 2.0 ** -4 * w.abs() + 2.0 ** -10 * scale_inv.max()).all()


def _activations(m, k, seed, dtype):
    """bf16-representable activations with outliers, an all-zero group, and exact fp8 ties
    (x = 0.75 amax: x / a_s = 336, halfway between 320 and 352)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).float()
    x[:, 5] = 20.0
    x[:, 6] = 15.0
    x[:, GROUP:2 * GROUP] = 0
    return x.to(dtype)


@pytest.mark.parametrize("target", ("triton", "pallas"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_fp8_kernel_on_fp8_weights_equals_transformers_math(target, dtype):
    """Real float8 weights from the quantizer. fp32: within fp32 rounding of the faithful
    re-implementation (an fp8 rounding of x the other way would cost about 1e-3); bf16: each
    output within a bf16 step of the sum and one of the output (transformers rounds the sum
    and then the sum plus bias, the kernel once, truncating under the Triton interpreter)."""
    m, n, k = 2, 200, 640
    w_fp8, scale_inv = quantize_fp8(_weight(n, k, 6))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(dtype)
    x = _activations(m, k, 8, dtype)
    sizes = dict(M=m, N=n, K=k, NB=2, KB=5, HAS_BIAS=1)
    got = _launch("matvec_fp8", target, dict(x=x, w=w_fp8, ws=scale_inv, b=bias), dtype, sizes, BLOCK_N=32)
    want = fp8_linear_torch(x, w_fp8, scale_inv, bias)
    exact = fp8_linear_torch(x.double(), w_fp8, scale_inv.double(), bias.double())
    if dtype == torch.float32:
        assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 1e-6
    else:  # a step of the sum before the bias (transformers' first rounding) and one of the output
        tol = 2.0 ** -7 * ((exact - bias.double()).abs() + want.double().abs())
        assert ((got.double() - want.double()).abs() <= tol).all()
    bound = 2e-6 if dtype == torch.float32 else 1e-2
    assert ((got.double() - exact).norm() / exact.norm()).item() < bound


@pytest.mark.parametrize("target", ("triton", "pallas"))
def test_fp8_activation_rounding_is_torchs_on_every_target(target):
    """The kernel's x quantization alone (weights: identity-like rows), over values that hit
    every e4m3 binade, subnormals, ties and the 448 ceiling: equal to torch's own cast."""
    k = 4 * GROUP
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, k, generator=gen) * torch.logspace(-4, 2, k)[None, :]
    x[0, ::GROUP] = 448 * 2.0 ** -9 * 1000  # group amax: a_s = 1000 * 2^-9, exactly
    x[0, 1:9] = torch.tensor([1.5, 2.5, 3.5, 0.75, 336 / 448 * 2, 1e-3, -2.5, 2 ** -7]) * 1000 * 2.0 ** -9
    n = k  # row n reads column n only: out[n] = xq[n] * a_s * w_s
    w = torch.eye(n, k).to(torch.float8_e4m3fn)
    ws = torch.ones(n // GROUP, k // GROUP)
    got = _launch("matvec_fp8", target, dict(x=x, w=w, ws=ws), torch.float32,
                  dict(M=1, N=n, K=k, NB=n // GROUP, KB=k // GROUP))
    xg = x.reshape(1, -1, GROUP)
    a_s = xg.abs().amax(-1) / 448
    want = ((xg / a_s[..., None]).to(torch.float8_e4m3fn).float() * a_s[..., None]).reshape(1, k)
    assert torch.equal(got, want)
