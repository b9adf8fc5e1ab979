"""Verification of the suite kernel `moe_router` on every target and dtype, and its
reference and generated kernel against transformers' DeepSeek-V2 / V3 gates."""

import math

import pytest
import torch

import tileflow.suite.moe_router  # noqa: F401  registers
from tests.suite.harness import make_test

test_moe_router = make_test("moe_router")


def _randomize(module, gen):
    """Random weights at nn.Linear scale (1/sqrt(fan_in)): distinct router logits, so
    top-k has no ties; a small e_score_correction_bias where there is one."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return module


def deepseek_v2_moe(topk_method="greedy", seed=0):
    """A tiny transformers DeepseekV2Moe: 16 experts, 4 a token, 2 shared."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    grouped = topk_method == "group_limited_greedy"
    config = DeepseekV2Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16,
                              num_experts_per_tok=4, n_shared_experts=2, topk_method=topk_method,
                              n_group=4 if grouped else None, topk_group=2 if grouped else None,
                              routed_scaling_factor=16.0 if grouped else 1.0)
    return _randomize(DeepseekV2Moe(config), torch.Generator().manual_seed(seed)).eval(), config


def deepseek_v3_moe(seed=0):
    """A tiny transformers DeepseekV3MoE: 32 experts in 4 groups, 2 groups kept, 4 a token."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=32,
                              num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
    return _randomize(DeepseekV3MoE(config), torch.Generator().manual_seed(seed)).eval(), config


def router_args(moe, config):
    """moe_router's weight inputs, sizes and scalars for a transformers MoE block."""
    gate = moe.gate
    sigmoid = hasattr(gate, "e_score_correction_bias")
    grouped = sigmoid or config.topk_method == "group_limited_greedy"
    inputs = {"w": gate.weight.detach()}
    if sigmoid:
        inputs["bias"] = gate.e_score_correction_bias.detach()
    scalars = dict(scale=float(config.routed_scaling_factor), top_k=config.num_experts_per_tok,
                   n_group=config.n_group if grouped else 1, topk_group=config.topk_group if grouped else 1,
                   # transformers' DeepSeek-V2 gate never normalises (norm_topk_prob unused)
                   norm_topk=int(sigmoid and bool(config.norm_topk_prob)))
    sizes = dict(E=gate.weight.shape[0], K=config.num_experts_per_tok, D=gate.weight.shape[1],
                 METHOD=int(sigmoid))
    return inputs, sizes, scalars


def run_generated(name, sizes, inputs, outputs, scalars, **params):
    """The generated Triton kernel (interpreted on CPU) on these tensors; ``params``
    override the defaults (wider tiles: fewer interpreted programs)."""
    from tileflow.runtime.torch_triton import triton_launcher
    from tileflow.suite import KERNELS

    kernel = KERNELS[name]
    ir = kernel.build({**kernel.default_params(sizes), **params})
    tensors = {**inputs, **outputs}
    triton_launcher(ir, "cpu")(*[tensors[v.name] for v in ir.arguments], *[scalars[s.name] for s in ir.scalars])
    return outputs


def by_expert(idx, weight):
    """(indices, weights) of each row ordered by expert: transformers' top-k is unsorted."""
    order = torch.argsort(idx, dim=-1)
    return torch.gather(idx, 1, order), torch.gather(weight, 1, order)


MODELS = {"v2-greedy": lambda: deepseek_v2_moe("greedy"),
          "v2-group-limited": lambda: deepseek_v2_moe("group_limited_greedy"),
          "v3-noaux-tc": deepseek_v3_moe}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("m", [1, 3])
def test_router_matches_transformers(model, m):
    from array_api_compat import array_namespace

    from tileflow.suite.moe_router import reference

    moe, config = MODELS[model]()
    x = torch.randn(m, config.hidden_size, generator=torch.Generator().manual_seed(m))
    with torch.no_grad():
        _, want_w, want_idx = moe.gate(x)
    inputs, sizes, scalars = router_args(moe, config)
    ref = reference(array_namespace(x), x, **inputs, **scalars)
    want = by_expert(want_idx, want_w)
    got_idx, got_w = by_expert(ref["topk_idx"], ref["topk_weight"])
    assert torch.equal(got_idx, want[0])
    torch.testing.assert_close(got_w, want[1], rtol=1e-5, atol=1e-6)
    # the reference picks best first: the weights of a row come in descending scores
    if scalars["n_group"] == 1:
        assert torch.all(ref["topk_weight"][:, :-1] >= ref["topk_weight"][:, 1:])
    k = config.num_experts_per_tok
    out = {"topk_idx": torch.full((m, k), -1, dtype=torch.int64),
           "topk_weight": torch.full((m, k), float("nan"))}
    run_generated("moe_router", dict(sizes, M=m), {"x": x, **inputs}, out, scalars, BLOCK_N=8)
    assert torch.equal(out["topk_idx"], ref["topk_idx"])
    torch.testing.assert_close(out["topk_weight"], ref["topk_weight"], rtol=1e-5, atol=1e-6)
