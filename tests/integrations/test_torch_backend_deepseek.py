"""torch.compile(model.forward, backend="tileflow") on tiny DeepSeek-V2 / V3 models (random
fp32 weights): per layer the MLA attention runs as tileflow::mla_attention over the latent
cache, the router as moe_router and the grouped experts as moe_experts (explain says so,
and the ops are counted running every step), the latent cache write stays as traced with
its reason; greedy tokens over a static cache equal eager's; an experts form or a router
the kernels do not take keeps the traced code, with the reason."""

import pytest
import torch

import tileflow  # noqa: F401  (the backend's entry point)
from tests.integrations.test_patch_deepseek import prompt, tiny
from tests.integrations.test_torch_backend import STEPS, _decode, _explain_step
from tileflow.integrations.torch import deepseek_graph
from tileflow.runtime import ops

KERNELS = ("mla_attention", "moe_router", "moe_experts")


# the interpreted-Triton run takes ~4 min on 2 cores (twice the patch's, which runs the same kernels in
# the default run): only under --full
@pytest.fixture(params=["reference", pytest.param("triton", marks=pytest.mark.full)])
def cpu_target(request, tileflow_options):
    tileflow_options(cpu_target=request.param)
    ops._LAUNCHERS.clear()
    yield request.param
    ops._LAUNCHERS.clear()


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often each DeepSeek kernel ran (the custom ops call ``ops.<name>`` at run time)."""
    calls = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        def spy(*args, _name=name, _real=getattr(ops, name), **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls


def layers_of(model):
    cfg = model.config
    return cfg.num_hidden_layers, cfg.num_hidden_layers - cfg.first_k_dense_replace


def assert_every_layer(report, model):
    layers, moe = layers_of(model)
    lora = model.config.q_lora_rank is not None
    assert report.matches["mla_attention"] == layers, report
    assert report.matches["moe_router"] == moe and report.matches["moe_experts"] == moe, report
    # per layer: the MLP's norm-fused gate/up (dense, or the shared experts'), q_a_layernorm + q_b_proj with
    # q_lora_rank; and the final norm
    assert report.matches["rms_norm"] == layers * (1 + lora) + 1, report
    assert report.matches["gate_up_silu"] == layers, report
    assert report.matches["matvec_residual"] == 2 * layers, report  # o_proj, down_proj (shared experts: + routed)
    # q_proj, or q_a_proj and q_b_proj; kv_a_proj_with_mqa; the lm_head
    assert report.matches["matvec"] == layers * (2 + lora) + 1, report
    assert report.matches["cache_counters"] == layers, report
    kept = [(p, r) for p, _, r in report.fallbacks]
    assert kept == [("mla_latent_cache", deepseek_graph.LATENT_REASON)] * layers, report


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_deepseek_compiled_tokens_identical_to_eager(kind, cpu_target, kernel_calls):
    """v2: q_proj, greedy softmax routing, YaRN, complex-pair rope; v3: q_lora_rank,
    sigmoid routing with the correction bias in 2 of 4 groups, normalised and scaled."""
    torch._dynamo.reset()
    model, ids = tiny(kind), prompt()
    expected = _decode(model.forward, model, ids)
    report = _explain_step(model, ids)
    assert_every_layer(report, model)
    assert "mla_attention" in str(report) and "mla_latent_cache" in str(report)
    kernel_calls.update(dict.fromkeys(KERNELS, 0))
    compiled = torch.compile(model.forward, backend="tileflow", mode="default")
    got = _decode(compiled, model, ids)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert len(set(expected[0].tolist())) > 5  # the model does not just repeat a token
    # the kernels ran in every compiled step (the prompt runs eagerly in _decode)
    layers, moe = layers_of(model)
    assert kernel_calls == {"mla_attention": STEPS * layers, "moe_router": STEPS * moe, "moe_experts": STEPS * moe}


def test_group_limited_greedy_routing_matches():
    """DeepSeek-V2's group_limited_greedy (softmax, groups scored by their best expert,
    masked with 0) with q_lora_rank: every layer's patterns (its tokens: tileflow.patch's
    test runs the same kernels on this model)."""
    torch._dynamo.reset()
    model, ids = tiny("v2_lora"), prompt()
    report = _explain_step(model, ids)
    assert_every_layer(report, model)


def test_batched_mm_experts_are_kept_with_the_reason(kernel_calls):
    """experts_implementation="batched_mm" gathers K experts' weights and bmm's them: not
    the grouped form the pattern knows, so its experts run as traced; the router still
    becomes moe_router (its choices feed the traced experts) and the tokens equal eager's."""
    torch._dynamo.reset()
    model, ids = tiny("v3"), prompt()
    model.set_experts_implementation("batched_mm")
    expected = _decode(model.forward, model, ids, steps=4)
    report = _explain_step(model, ids)
    assert report.matches["moe_router"] == 1 and not report.matches["moe_experts"], report
    assert ("moe_experts", "model.layers.1.mlp.gate",
            "the experts are not transformers' grouped_mm form (no sort of the choices)") in [
        (p, w.replace("__self__.", ""), r) for p, w, r in report.fallbacks], report
    kernel_calls.update(dict.fromkeys(KERNELS, 0))
    got = _decode(torch.compile(model.forward, backend="tileflow", mode="default"), model, ids, steps=4)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert kernel_calls == {"mla_attention": 2 * 4, "moe_router": 4, "moe_experts": 0}


def test_more_experts_than_the_router_scores_keep_the_router_and_experts():
    """moe_router scores at most 256 experts in one tile: a model with more keeps its
    router and experts as traced, the reason in the report; MLA still matches."""
    torch._dynamo.reset()
    model, ids = tiny("v2", n_routed_experts=264, num_local_experts=264, num_experts=264), prompt()
    report = _explain_step(model, ids)
    torch._dynamo.reset()
    assert report.matches["mla_attention"] == 2 and not report.matches["moe_router"], report
    assert not report.matches["moe_experts"], report
    assert ("moe_router", "264 routed experts (moe_router scores at most 256)") in [
        (p, r) for p, _, r in report.fallbacks], report


def test_prefill_keeps_the_traced_attention_and_router():
    """A prompt's 9 tokens: mla_attention takes one query a sequence, the router and experts
    one decode row (or a matched step's rows): all stay as traced, with the reasons."""
    torch._dynamo.reset()
    model, ids = tiny("v3"), prompt()
    report = tileflow.explain(model.forward, input_ids=ids, use_cache=False)
    torch._dynamo.reset()
    assert not any(report.matches[k] for k in KERNELS), report
    kept = [(p, r) for p, _, r in report.fallbacks]
    assert kept.count(("mla_attention", "9 queries a sequence: mla_attention takes one new token a sequence")) == 2
    assert ("moe_router", "9 rows: not one decode row, nor the rows of a decode step's matched attention") in kept
