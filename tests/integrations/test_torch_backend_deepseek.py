"""torch.compile(model.forward, backend="tileflow") on tiny DeepSeek-V2 / V3 models (random
fp32 weights): per layer the latent cache write runs as tileflow::mla_latent_cache (each of
the three rope forms), the MLA attention as tileflow::mla_attention over the latent cache,
rotating the query's rope part itself (no traced rotation left in the graph), the router as
moe_router and the grouped experts as moe_experts (explain says so, and the ops are counted
running every step); greedy tokens over a static cache equal eager's and so do the latent
rows written; a rope form, an experts form or a router the kernels do not take keeps the
traced code, with the reason."""

import pytest
import torch
from transformers import StaticCache

import tileflow  # noqa: F401  (the backend's entry point)
from tests.integrations.test_patch_deepseek import prompt, tiny
from tests.integrations.test_torch_backend import STEPS, _decode, _explain_step
from tileflow.integrations.shared.hf import cache_keyword
from tileflow.integrations.torch import decode_graph, deepseek_graph
from tileflow.runtime import ops

KERNELS = ("mla_latent_cache", "mla_attention", "moe_router", "moe_experts")


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
    assert report.matches["mla_attention"] == layers and report.matches["mla_latent_cache"] == layers, report
    assert report.matches[deepseek_graph.QUERY_ROPE] == layers, report  # mla_attention rotates the query
    assert report.matches["moe_router"] == moe and report.matches["moe_experts"] == moe, report
    # per layer: the MLP's norm-fused gate/up (dense, or the shared experts'), q_a_layernorm + q_b_proj with
    # q_lora_rank; and the final norm
    assert report.matches["rms_norm"] == layers * (1 + lora) + 1, report
    assert report.matches["gate_up_silu"] == layers, report
    assert report.matches["matvec_residual"] == 2 * layers, report  # o_proj, down_proj (shared experts: + routed)
    # q_proj, or q_a_proj and q_b_proj (kv_a_proj_with_mqa is mla_latent_cache's); the lm_head
    assert report.matches["matvec"] == layers * (1 + lora) + 1, report
    assert report.matches["cache_counters"] == layers, report
    assert not report.fallbacks, report


def _decode_into(step, model, ids, steps=STEPS):
    """``_decode``'s tokens, and the static cache the steps wrote."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    kw = {cache_keyword(model): cache}
    with torch.no_grad():
        tok = model(ids, **kw, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for i in range(steps):
            pos = torch.tensor([[ids.shape[1] + i]])
            tok = step(input_ids=tok, position_ids=pos, use_cache=True, **kw).logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
    return torch.cat(toks, 1), cache


@pytest.fixture
def rewritten(monkeypatch):
    """The graphs as the DeepSeek pass leaves them (before inductor)."""
    graphs = []

    def spy(gm, report, architectures=(), _real=decode_graph.rewrite_decode_graph):
        rows = _real(gm, report, architectures)
        graphs.append(gm.graph)
        return rows

    monkeypatch.setattr(decode_graph, "rewrite_decode_graph", spy)
    return graphs


def rotations(graph):
    """The nodes of a traced rope: the tables' cos / sin (V3) or freqs_cis and the complex product (V2)."""
    return [n for n in graph.nodes if n.target in ("cos", "sin", torch.polar, torch.view_as_complex)]


def assert_same_latent_rows(got, want, filled):
    for g, w in zip(got.layers, want.layers):
        torch.testing.assert_close(g.keys[:, :, :filled], w.keys[:, :, :filled], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.values[:, :, :filled], w.values[:, :, :filled], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["v2", "v2_lora", "v3", "v3_halves"])
def test_deepseek_compiled_tokens_identical_to_eager(kind, cpu_target, kernel_calls, rewritten):
    """v2: q_proj, greedy softmax routing, YaRN, complex-pair rope; v2_lora: q_lora_rank,
    group-limited greedy routing; v3: q_lora_rank, sigmoid routing with the correction bias
    in 2 of 4 groups, normalised and scaled, interleaved rope; v3_halves: rotate-half rope.
    The latent rows mla_latent_cache writes are the ones eager writes; with the key's and
    the query's rope in the kernels no traced rotation is left."""
    torch._dynamo.reset()
    model, ids = tiny(kind), prompt()
    expected, want = _decode_into(model.forward, model, ids)
    report = _explain_step(model, ids)
    assert_every_layer(report, model)
    assert len(rewritten) == 1 and not rotations(rewritten[0]), rotations(rewritten[0])
    assert "mla_attention" in str(report) and "mla_latent_cache" in str(report)
    kernel_calls.update(dict.fromkeys(KERNELS, 0))
    compiled = torch.compile(model.forward, backend="tileflow", mode="default")
    got, cache = _decode_into(compiled, model, ids)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert len(set(expected[0].tolist())) > 5  # the model does not just repeat a token
    assert_same_latent_rows(cache, want, ids.shape[1] + STEPS)
    # the kernels ran in every compiled step (the prompt runs eagerly in _decode_into)
    layers, moe = layers_of(model)
    assert kernel_calls == {"mla_latent_cache": STEPS * layers, "mla_attention": STEPS * layers,
                            "moe_router": STEPS * moe, "moe_experts": STEPS * moe}


def _deinterleaved_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """DeepSeek-V3's interleaved rope as its reference code (and earlier transformers releases)
    computes it: the pairs permuted into halves, then rotate-half."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import rotate_half

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def halves(x):
        b, h, s, d = x.shape
        return x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)

    q, k = halves(q), halves(k)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_a_rope_form_the_pattern_does_not_know_keeps_the_latent_write(monkeypatch, kernel_calls, rewritten):
    """The interleaved rope computed by permuting the pairs into halves (the same values):
    the rotation is rotate-half of a permutation of the rope key (and of the query's rope
    part), none of the three forms, so each layer's latent write and query rope stay as
    traced with the reason (every form's own), MLA and the MoE still match and the tokens
    and the latent rows are eager's."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    monkeypatch.setattr(modeling_deepseek_v3, "apply_rotary_pos_emb_interleave", _deinterleaved_rope)
    torch._dynamo.reset()
    model, ids = tiny("v3"), prompt()
    expected, want = _decode_into(model.forward, model, ids, steps=4)
    report = _explain_step(model, ids)
    assert report.matches["mla_attention"] == 2 and not report.matches["mla_latent_cache"], report
    assert not report.matches[deepseek_graph.QUERY_ROPE], report
    assert report.matches["moe_router"] == 1 and report.matches["moe_experts"] == 1, report

    def reason(why, rotated):
        return (f"{why} (V2's complex product: not view_as_real(k * freqs_cis).flatten(3).type_as(k); V3's "
                f"rotate-half: the rotated {rotated}; V3's interleaved pairs: not cat([k1 * cos - k2 * sin, "
                "k2 * cos + k1 * sin], -1))")

    query = reason(deepseek_graph.QUERY_REASON, "query is not the query's rope part as split [B, NH, 1, DR]")
    key = reason(deepseek_graph.LATENT_REASON, "key is not kv_a_proj_with_mqa's rope part as split and viewed "
                                               "[B, 1, 1, DR]")
    assert [(p, r) for p, _, r in report.fallbacks] == [(deepseek_graph.QUERY_ROPE, query),
                                                        ("mla_latent_cache", key)] * 2, report
    assert rotations(rewritten[-1]), "the traced rotations are kept"
    kernel_calls.update(dict.fromkeys(KERNELS, 0))
    got, cache = _decode_into(torch.compile(model.forward, backend="tileflow", mode="default"), model, ids, steps=4)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert_same_latent_rows(cache, want, ids.shape[1] + 4)
    assert kernel_calls["mla_latent_cache"] == 0 and kernel_calls["mla_attention"] == 2 * 4


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
    assert kernel_calls == {"mla_latent_cache": 2 * 4, "mla_attention": 2 * 4, "moe_router": 4, "moe_experts": 0}


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


def test_a_router_weight_in_the_models_dtype_becomes_moe_router(kernel_calls):
    """transformers 5.17 keeps gate.weight in the model's dtype (5.25: fp32): the graph's
    ``W.type(f32)`` upcast of a bf16 weight matches too, and moe_router reads the weight
    where it lies; the compiled step's logits stay within bf16 reach of eager's."""
    torch._dynamo.reset()
    model, ids = tiny("v2"), prompt()
    model = model.to(torch.bfloat16)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight.data = layer.mlp.gate.weight.data.to(torch.bfloat16)
    report = _explain_step(model, ids)
    assert report.matches["moe_router"] == 1 and report.matches["moe_experts"] == 1, report
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 2)
    kw = {cache_keyword(model): cache}
    step = dict(input_ids=ids[:, -1:], position_ids=torch.tensor([[ids.shape[1] - 1]]), use_cache=True, **kw)
    with torch.no_grad():
        model(ids[:, :-1], use_cache=True, **kw)
        want = model(**step).logits.float()
        cache.reset()
        model(ids[:, :-1], use_cache=True, **kw)
        kernel_calls.update(dict.fromkeys(KERNELS, 0))
        got = torch.compile(model.forward, backend="tileflow", mode="default")(**step).logits.float()
    torch._dynamo.reset()
    assert kernel_calls["moe_router"] == 1 and kernel_calls["moe_experts"] == 1, kernel_calls
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item(), (got - want).abs().max().item()
