"""Verification of the suite kernel `moe_experts` on every target and dtype, and of the
whole DeepSeekMoE block: moe_router + moe_experts (references and generated kernels)
plus the shared experts equal transformers' DeepSeek-V2 / V3 MoE output."""

import pytest
import torch
import torch.nn.functional as F

import tileflow.suite.moe_experts  # noqa: F401  registers
from tests.suite.harness import make_test
from tests.suite.test_moe_router import MODELS, router_args, run_generated

test_moe_experts = make_test("moe_experts")


def expert_weights(moe):
    """The experts' weights as transformers keeps them: gate_up_proj [E, 2I, D] viewed
    [E, 2, I, D] (gate rows first, no copy), down_proj [E, D, I]."""
    gate_up, down = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
    e, two_i, d = gate_up.shape
    view = gate_up.view(e, 2, two_i // 2, d)
    assert view.data_ptr() == gate_up.data_ptr()
    return {"gate_up": view, "down": down}


def shared_experts(moe, x):
    """The shared experts, a plain SiLU-gated MLP, in torch."""
    s = moe.shared_experts
    return F.linear(F.silu(F.linear(x, s.gate_proj.weight)) * F.linear(x, s.up_proj.weight), s.down_proj.weight)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("m", [1, 3])
def test_moe_block_matches_transformers(model, m):
    from array_api_compat import array_namespace

    from tileflow.suite import moe_experts, moe_router

    moe, config = MODELS[model]()
    x = torch.randn(m, config.hidden_size, generator=torch.Generator().manual_seed(10 + m))
    with torch.no_grad():
        want = moe(x[None])[0]
        _, _, want_idx = moe.gate(x)
    xp = array_namespace(x)
    r_inputs, r_sizes, scalars = router_args(moe, config)
    routed = moe_router.reference(xp, x, **r_inputs, **scalars)
    assert torch.equal(torch.sort(routed["topk_idx"]).values, torch.sort(want_idx).values)
    weights = expert_weights(moe)
    with torch.no_grad():
        shared = shared_experts(moe, x)
        out = moe_experts.reference(xp, x, routed["topk_idx"], routed["topk_weight"], **weights)["out"]
        # the residual form adds the shared experts' output as the residual
        fused = moe_experts.reference(xp, x, routed["topk_idx"], routed["topk_weight"], **weights,
                                      residual=shared)["out"]
    torch.testing.assert_close(out + shared, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)

    # the generated kernels (Triton, interpreted) on the model's own tensors
    k = config.num_experts_per_tok
    got = run_generated("moe_router", dict(r_sizes, M=m), {"x": x, **r_inputs},
                        {"topk_idx": torch.full((m, k), -1, dtype=torch.int64),
                         "topk_weight": torch.full((m, k), float("nan"))}, scalars, BLOCK_N=8)
    e, _, i, d = weights["gate_up"].shape
    sizes = dict(M=m, E=e, K=k, D=d, I=i, HAS_RESIDUAL=1)
    res = run_generated("moe_experts", sizes, {"x": x, **got, **weights, "residual": shared},
                        {"out": torch.full((m, d), float("nan"))}, {}, BLOCK_N=32, BLOCK_D=32)
    torch.testing.assert_close(res["out"], want, rtol=1e-5, atol=1e-5)
