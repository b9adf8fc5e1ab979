"""ROWS = R > 1 (speculative decoding's verify step: R consecutive new tokens of one
sequence): gqa_attention's new rows are causal among themselves (row i equals the R == 1
reference at filled length p0 + 1 + i, and never sees a later new row), and
qkv_rope_cache writes exactly cache rows p0 .. p0 + R - 1 of each sequence."""

import pytest
import torch

from tileflow.suite import KERNELS
from tileflow.suite.registry import Case
from tileflow.verify import make_inputs, poisoned_outputs, reference_outputs, run_target

TARGETS = ("triton", "pallas")


def _run(kernel, params, case, inputs, target):
    """The kernel's outputs on ``target`` (fp32), outputs poisoned, in-place views as given."""
    ir = kernel.build(params)
    ins = {n: t.clone() for n, t in inputs.items()}
    outs = poisoned_outputs(ir, case, torch.float32)
    for v in ir.outputs:
        if v.role == "inout":
            outs[v.name] = ins.pop(v.name)
    return run_target(kernel, ir, target, ins, outs, dict(case.scalars))


def _attention_case(rows, splits, masked, nh=6, nkv=3):
    sizes = dict(B=2, NH=nh, NKV=nkv, DH=16, S=64, ROWS=rows, HAS_MASK=masked)
    params = dict(BLOCK_N=16, SPLITS=splits, SPLITS_BLOCK=splits)
    return Case(f"rows{rows}", sizes, dict(scale=0.3), params=params)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rows,splits,masked", [(5, 1, 0), (8, 4, 1)])
def test_new_rows_equal_the_one_row_kernel_at_growing_lengths(target, rows, splits, masked):
    kernel = KERNELS["gqa_attention"]
    case = _attention_case(rows, splits, masked)
    params = kernel.params_for(case)
    gen = torch.Generator().manual_seed(rows)
    inputs = make_inputs(kernel, kernel.build(params), case, torch.float32, gen)
    p0 = torch.tensor([23, 41])  # cache rows before the new ones, per sequence
    inputs["lengths"] = p0 + rows
    out = _run(kernel, params, case, inputs, target)["out"]
    for i in range(rows):
        one = dict(q=inputs["q"][:, i], k_cache=inputs["k_cache"], v_cache=inputs["v_cache"], lengths=p0 + 1 + i)
        if masked:
            one["key_mask"] = inputs["key_mask"]
        ref = reference_outputs(kernel, one, dict(case.scalars))["out"]
        torch.testing.assert_close(out[:, i].double(), ref, rtol=1e-5, atol=1e-5, msg=f"new row {i}")


@pytest.mark.parametrize("target", TARGETS)
def test_a_new_row_never_sees_a_later_one(target):
    # cache row p0 + i + 1 (new row i + 1's own K/V) made huge: rows 0..i must not move at all
    kernel = KERNELS["gqa_attention"]
    rows = 3
    case = _attention_case(rows, 2, 0, nh=2, nkv=1)
    params = kernel.params_for(case)
    inputs = make_inputs(kernel, kernel.build(params), case, torch.float32, torch.Generator().manual_seed(7))
    p0 = torch.tensor([30, 17])
    inputs["lengths"] = p0 + rows
    base = _run(kernel, params, case, inputs, target)["out"]
    for i in range(rows - 1):
        bent = {n: t.clone() for n, t in inputs.items()}
        for b in range(2):
            bent["k_cache"][b, :, p0[b] + i + 1] = 3.0
            bent["v_cache"][b, :, p0[b] + i + 1] = 1e4
        out = _run(kernel, params, case, bent, target)["out"]
        assert torch.equal(out[:, : i + 1], base[:, : i + 1]), f"row <= {i} saw cache row p0 + {i + 1}"
        assert (out[:, i + 1] - base[:, i + 1]).abs().max() > 1.0, f"row {i + 1} missed its own K/V"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("cache_pos", [0, 1])
def test_qkv_rows_write_exactly_their_cache_rows(target, cache_pos):
    kernel = KERNELS["qkv_rope_cache"]
    rows, bsz, s = 3, 2, 12
    sizes = dict(M=bsz * rows, B=bsz, K=40, NH=4, NKV=2, DH=16, NQ=64, NKD=32, S=s, P=s, ROWS=rows,
                 CACHE_POS=cache_pos)
    case = Case("rows", sizes, dict(eps=1e-6, theta=10000.0))
    params = kernel.params_for(case)
    inputs = make_inputs(kernel, kernel.build(params), case, torch.float32, torch.Generator().manual_seed(3))
    p0 = torch.tensor([2, 9])  # sequence 1's rows end at the cache's last row
    written = (p0[:, None] + torch.arange(rows)).reshape(-1)
    inputs["pos"] = written + 100 if cache_pos else written  # rotation position apart from the cache row
    if cache_pos:
        inputs["cache_pos"] = written
    for name in ("k_cache", "v_cache"):
        inputs[name] = torch.full((bsz, 2, s, 16), float("nan"))
    got = _run(kernel, params, case, inputs, target)
    ref = reference_outputs(kernel, {**inputs, **{n: torch.zeros(bsz, 2, s, 16) for n in ("k_cache", "v_cache")}},
                            dict(case.scalars))
    for name in ("k_cache", "v_cache"):
        mine = torch.zeros(bsz, s, dtype=torch.bool)
        for b in range(bsz):
            mine[b, p0[b]: p0[b] + rows] = True
        cache = got[name].permute(0, 2, 1, 3)  # [B, S, NKV, DH]
        assert torch.isnan(cache[~mine]).all(), f"{name}: a row outside p0..p0+R-1 was written"
        torch.testing.assert_close(cache[mine].double(), ref[name].permute(0, 2, 1, 3)[mine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["q"].double(), ref["q"], rtol=1e-5, atol=1e-5)
