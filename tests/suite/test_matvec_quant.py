"""The low-precision weight matvecs against their dequantize-then-matmul references.

``matvec_int4`` runs through the suite harness (every case x target x dtype: fresh random
inputs, NaN-poisoned outputs, float64 reference of ``x @ dequant(W).T``; norm-wise relative
error under tileflow.verify.BOUNDS: fp32 2e-5, i.e. fp32 rounding of K-term sums; bf16 1e-2,
the output's rounding, 2^-9 a value, and the interpreter's truncating bf16 store). Beside it:
the quantize helpers' round trips, and the kernels fed by the helpers on real-looking weights.
"""

import pytest
import torch

from tests.suite.harness import make_test
from tileflow.suite import KERNELS
from tileflow.suite.quantize import GROUP, dequantize_int4, quantize_int4, unpack_int4
from tileflow.verify import poisoned_outputs, run_target

test_matvec_int4 = make_test("matvec_int4")


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


def _launch(name, target, inputs, dtype, sizes):
    kernel = KERNELS[name]
    from tileflow.suite.registry import Case

    case = Case("helper", sizes)
    ir = kernel.build(kernel.params_for(case))
    out = poisoned_outputs(ir, case, dtype)
    return run_target(kernel, ir, target, inputs, out, {})["out"]


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
