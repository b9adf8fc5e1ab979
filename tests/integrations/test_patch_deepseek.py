"""``tileflow.patch`` on tiny DeepSeek-V2 / V3 models (random fp32 weights): greedy tokens
equal to the unpatched model's over a static cache, every decode step counted as the
DeepSeek program's (MLA over the latent cache, the router and the chosen experts), the
latent cache rows it writes equal to the model's own, a left-padded batch as one program
step; what the kernels do not take (several tokens a step, a dynamic cache, an attention
bias) runs the model's forward or leaves the model unchanged, with the reason in the report."""

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers import StaticCache

import tileflow
from tests.integrations.test_transformers_patch import cpu_target  # noqa: F401  (fixture)
from tileflow.integrations.shared.hf import cache_keyword

NEW = 17  # 16 decode steps after the prompt's token
CPU = {"cpu": True}
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, mscale=0.9,
            mscale_all_dim=0.7, beta_fast=32, beta_slow=1)


def tiny(kind: str, **overrides):
    """A two-layer DeepSeek model, the first layer dense, the second MoE (8 routed experts,
    3 a token, one shared), random weights away from the init's ones and zeros:

    - ``v2``: DeepSeek-V2, q_proj, greedy softmax routing, YaRN (rope as complex pairs);
    - ``v2_lora``: DeepSeek-V2, q_lora_rank, group-limited greedy routing (2 of 4 groups);
    - ``v3``: DeepSeek-V3, q_lora_rank, sigmoid routing with a correction bias in 2 of 4
      groups, normalised and scaled weights, YaRN (mscale on the softmax), interleaved rope;
    - ``v3_halves``: DeepSeek-V3, q_proj, rotate-half rope (``rope_interleave=False``)."""
    sizes = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, vocab_size=128,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
                 qk_nope_head_dim=16, v_head_dim=24, max_position_embeddings=256, pad_token_id=0,
                 n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1)
    if kind == "v2":
        config = DeepseekV2Config(**sizes, q_lora_rank=None, topk_method="greedy", rope_parameters=YARN)
    elif kind == "v2_lora":
        config = DeepseekV2Config(**sizes, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2, routed_scaling_factor=1.5)
    elif kind == "v3":
        config = DeepseekV3Config(**sizes, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                                  routed_scaling_factor=2.5, rope_parameters=YARN)
    else:
        config = DeepseekV3Config(**sizes, q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = (DeepseekV2ForCausalLM if kind.startswith("v2") else DeepseekV3ForCausalLM)(config).eval()
    with torch.no_grad():
        for prm in model.parameters():
            if prm.ndim == 1:  # norms' gammas around one
                prm.normal_(1.0, 0.3)
            else:
                prm.normal_(0.0, prm.shape[-1] ** -0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # V3's: small, so scores and bias both decide
                buf.normal_(0.0, 0.05)
    return model


def prompt(n=9, seed=1, rows=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (rows, n), generator=g)  # no pad token (0)


def greedy(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, **kw)


@pytest.mark.parametrize("kind", ["v2", "v2_lora", "v3", "v3_halves"])
def test_deepseek_tokens_identical_to_eager(kind, cpu_target):
    model, ids = tiny(kind), prompt()
    expected = greedy(model, ids, cache_implementation="static")
    report = tileflow.patch(model, options=CPU)
    assert report.patched, str(report)
    assert report.matches["mla_attention"] == 2 and report.matches["mla_latent_cache"] == 2, str(report)
    assert report.matches["moe_router"] == 1 and report.matches["moe_experts"] == 1, str(report)
    got = greedy(model, ids, cache_implementation="static")
    new = expected[0, ids.shape[1]:].tolist()
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), new)
    assert len(set(new)) > 5, new  # the model does not just repeat a token
    # the fast path ran: every decode step as the program, nothing fell back
    assert report.steps == NEW - 1 and not report.fallbacks, str(report)
    assert report.generate_loops == 1, str(report)


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_the_program_writes_the_models_latent_cache(kind):
    """The latent rows the program writes (mla_latent_cache, into the model's own cache
    tensors) are the rows the model's forward writes, and its logits are the model's."""
    model, ids = tiny(kind), prompt()
    caches, logits = [], []
    for patched in (False, True):
        if patched:
            report = tileflow.patch(model, options=CPU)
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + NEW)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, **{cache_keyword(model): cache})
        caches.append(cache)
        logits.append(torch.stack(out.logits))
    assert report.steps == NEW - 1, str(report)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    filled = ids.shape[1] + NEW - 1
    for want, got in zip(caches[0].layers, caches[1].layers):
        assert got.keys.shape[1] == 1 and got.keys.shape[3] == model.config.kv_lora_rank  # the latent, one "head"
        torch.testing.assert_close(got.keys[:, :, :filled], want.keys[:, :, :filled], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.values[:, :, :filled], want.values[:, :, :filled], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_a_left_padded_batch_runs_the_program(kind):
    """Three left-padded prompts: every sequence's latent row written at the cache's count,
    rotated at its own position, the padding hidden by mla_attention's key mask; tokens
    equal to the unpatched model's, every decode step the program's."""
    from tests.integrations.test_patch_batch import batch

    model, (ids, mask) = tiny(kind), batch(lengths=(9, 4, 6))
    expected = greedy(model, ids, attention_mask=mask, cache_implementation="static")
    report = tileflow.patch(model, options=CPU)
    got = greedy(model, ids, attention_mask=mask, cache_implementation="static")
    assert torch.equal(got, expected), (got[:, ids.shape[1]:].tolist(), expected[:, ids.shape[1]:].tolist())
    assert all(len(set(row)) > 3 for row in expected[:, ids.shape[1]:].tolist())  # rows differ, not one token
    assert report.steps == NEW - 1 and not report.fallbacks, str(report)


def test_a_dynamic_cache_runs_the_models_forward_with_the_reason():
    model, ids = tiny("v2"), prompt()
    expected = greedy(model, ids, cache_implementation="dynamic")
    report = tileflow.patch(model, options=CPU)
    got = greedy(model, ids, cache_implementation="dynamic")
    assert torch.equal(got, expected) and report.steps == 0, str(report)
    assert [r for _, _, r in report.fallbacks] == [
        "ran the model's forward: cache layer DynamicLayer (the program writes StaticLayer tensors)"], str(report)


def test_several_tokens_continuing_a_sequence_run_the_models_forward():
    """A verify step (several tokens into a cache that holds some): the program takes one
    token a step, so the model's forward runs it, the logits the unpatched model's."""
    model, ids = tiny("v3"), prompt()
    more = prompt(3, seed=5)

    def logits_of_continuation():
        cache = StaticCache(config=model.config, max_cache_len=32)
        kw = {cache_keyword(model): cache, "use_cache": True}
        with torch.no_grad():
            model(ids, **kw)
            pos = torch.arange(ids.shape[1], ids.shape[1] + 3)[None]
            return model(more, position_ids=pos, **kw).logits

    expected = logits_of_continuation()
    report = tileflow.patch(model, options=CPU)
    got = logits_of_continuation()
    assert torch.equal(got, expected) and report.steps == 0, str(report)
    assert [r for _, _, r in report.fallbacks] == [
        "ran the model's forward: 3 tokens continuing a sequence (the DeepSeek program takes one token a step)"]


def test_an_attention_bias_leaves_the_model_unchanged():
    model = tiny("v3", attention_bias=True)
    report = tileflow.patch(model, options=CPU)
    assert not report.patched and report.steps == 0
    assert any("attention_bias=True" in r for _, _, r in report.fallbacks), str(report)
    assert "forward" not in model.__dict__ and getattr(model, "_tileflow_patch", None) is None


def test_unpatch_restores_the_model():
    model, ids = tiny("v2_lora"), prompt()
    expected = greedy(model, ids, cache_implementation="static")
    tileflow.patch(model, options=CPU)
    assert tileflow.unpatch(model)
    assert not {"forward", "_prepare_cache_for_generation", "_sample"} & set(model.__dict__)
    assert torch.equal(greedy(model, ids, cache_implementation="static"), expected)


def test_a_cache_of_per_head_keys_is_declined():
    """Releases that cached per-head K/V (before transformers moved DeepSeek to the latent
    cache) hand the program a cache it must not write: declined, with the shapes."""
    from types import SimpleNamespace

    from tileflow.integrations.transformers.deepseek_step import DeepSeekDecodeProgram

    model = tiny("v3")
    program = DeepSeekDecodeProgram(model)
    cfg = model.config
    tok = torch.ones(1, 1, dtype=torch.long)

    def cache(keys, values):
        layer = SimpleNamespace(keys=keys, values=values, is_initialized=True)
        return SimpleNamespace(layers=[layer, layer])

    latent = cache(torch.zeros(1, 1, 20, cfg.kv_lora_rank), torch.zeros(1, 1, 20, cfg.qk_rope_head_dim))
    assert program.declines(tok, latent) == ""
    heads = cache(torch.zeros(1, 4, 20, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), torch.zeros(1, 4, 20, 24))
    assert program.declines(tok, heads) == (
        "cache layer of keys (1, 4, 20, 32) / values (1, 4, 20, 24), not the latent [B, 1, S, 32] / [B, 1, S, 16] "
        "the program writes")


def _teacher_forced(model, tokens, n_prompt):
    """Logits [steps, V] (fp32) of one-token decode steps over ``tokens`` after a prompt
    pass of ``n_prompt`` tokens, each step fed the given next token, on a static cache."""
    kw = {cache_keyword(model): StaticCache(config=model.config, max_cache_len=tokens.shape[1])}
    out = []
    with torch.no_grad():
        model(input_ids=tokens[:, :n_prompt], use_cache=True, **kw)
        for i in range(n_prompt, tokens.shape[1]):
            step = model(input_ids=tokens[:, i:i + 1], position_ids=torch.tensor([[i]], device=tokens.device), use_cache=True, **kw)
            out.append(step.logits[0, -1].float())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_bf16_logits_are_as_close_to_fp32_as_eager_bf16(kind):
    """bf16, teacher-forced over the fp32 model's own greedy tokens: the program's logits
    differ from the fp32 model's by at most 1.5x what eager bf16's do, plus 0.02 (max abs,
    logits O(1)): its sums are fp32 and its bf16 roundings are the model's, not fewer."""
    model, ids = tiny(kind), prompt()
    tokens = greedy(model, ids, cache_implementation="static")
    want = _teacher_forced(model, tokens, ids.shape[1])
    model = model.to(torch.bfloat16)
    eager = _teacher_forced(model, tokens, ids.shape[1])
    report = tileflow.patch(model, options=CPU)
    got = _teacher_forced(model, tokens, ids.shape[1])
    assert report.steps == tokens.shape[1] - ids.shape[1] and not report.fallbacks, str(report)
    eager_err, err = (eager - want).abs().max().item(), (got - want).abs().max().item()
    assert eager_err > 0  # bf16 does round here: the bound below is not vacuous
    assert err <= 1.5 * eager_err + 0.02, (err, eager_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the generated Triton kernels)")
@pytest.mark.parametrize("kind", ["v2", "v2_lora", "v3", "v3_halves"])
def test_on_the_gpu_tokens_identical_and_bf16_within_bound(kind):
    """The Triton kernels on the card: fp32 greedy tokens equal to the model's own, every
    decode step the program's; bf16 teacher-forced logits within the CPU test's bound."""
    model, ids = tiny(kind).cuda(), prompt().cuda()
    expected = greedy(model, ids, cache_implementation="static")
    report = tileflow.patch(model)
    got = greedy(model, ids, cache_implementation="static")
    assert report.steps == NEW - 1 and not report.fallbacks, str(report)
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
    tileflow.unpatch(model)
    tokens = expected
    want = _teacher_forced(model, tokens, ids.shape[1])
    model = model.to(torch.bfloat16)
    eager = _teacher_forced(model, tokens, ids.shape[1])
    report = tileflow.patch(model)
    got = _teacher_forced(model, tokens, ids.shape[1])
    assert report.steps == tokens.shape[1] - ids.shape[1] and not report.fallbacks, str(report)
    eager_err, err = (eager - want).abs().max().item(), (got - want).abs().max().item()
    assert err <= 1.5 * eager_err + 0.02, (err, eager_err)


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_a_step_launches_the_suite_kernels_and_little_torch(kind, monkeypatch):
    """One decode step of the program: the kernels a layer launches (the input norm inside
    the query projection and the latent write, the query's rope inside mla_attention, the
    shared experts inside moe_experts), and
    between them torch runs no more than a handful of ops a step (views aside), none a layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tileflow.integrations.transformers.deepseek_step import DeepSeekDecodeProgram
    from tileflow.runtime import ops

    model, ids = tiny(kind), prompt()
    program = DeepSeekDecodeProgram(model)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_keyword(model): cache})
    launched, inside, outside = [], [0], []
    real = ops.launch

    def counted(kernel, *a, **k):
        launched.append(kernel)
        inside[0] += 1
        try:
            return real(kernel, *a, **k)
        finally:
            inside[0] -= 1

    class Outside(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and not func._schema.name.startswith(("aten::view", "aten::slice", "aten::select",
                                                                     "aten::_unsafe_view", "aten::alias",
                                                                     "aten::unsqueeze", "aten::squeeze",
                                                                     "aten::expand", "aten::as_strided",
                                                                     "aten::t", "aten::transpose")):
                outside.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(ops, "launch", counted)
    tok, pos = ids[:, -1:], torch.tensor([[ids.shape[1]]])
    with torch.no_grad(), Outside():
        program.run(tok, pos, cache)
    q = ["rms_norm_matvec"] * (2 if model.config.q_lora_rank else 1)  # q_proj, or q_a_proj then q_b_proj
    attention = q + ["mla_latent_cache", "mla_attention", "matvec_residual"]
    dense = attention + ["rms_norm_gate_up_silu", "matvec_residual"]
    moe = attention + ["rms_norm", "moe_router", "moe_experts"]  # the shared experts inside moe_experts
    assert launched == ["embedding_lookup"] + dense + moe + ["rms_norm_matvec"], launched
    # the step's cache bookkeeping (rows, lengths, the counters' advance), not per layer
    assert len(outside) <= 8, outside


def test_a_router_weight_in_the_models_dtype_is_read_where_it_lies(monkeypatch):
    """transformers 5.17 keeps gate.weight in the model's dtype (5.25: fp32): the router reads
    it where it lies (no fp32 copy, no extra memory) and upcasts in the kernel, as the model's
    router upcasts it; bf16 logits within the bound test's margin."""
    from tileflow.runtime import ops

    model, ids = tiny("v3"), prompt()
    tokens = greedy(model, ids, cache_implementation="static")
    want = _teacher_forced(model, tokens, ids.shape[1])
    model = model.to(torch.bfloat16)
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for gate in gates:
        gate.weight.data = gate.weight.data.to(torch.bfloat16)
    eager = _teacher_forced(model, tokens, ids.shape[1])
    seen, real = [], ops.moe_router
    monkeypatch.setattr(ops, "moe_router", lambda x, w, *a, **k: seen.append(w) or real(x, w, *a, **k))
    report = tileflow.patch(model, options=CPU)
    got = _teacher_forced(model, tokens, ids.shape[1])
    assert report.steps == tokens.shape[1] - ids.shape[1] and not report.fallbacks, str(report)
    assert seen and all(w.data_ptr() == gates[0].weight.data_ptr() and w.dtype == torch.bfloat16 for w in seen)
    eager_err, err = (eager - want).abs().max().item(), (got - want).abs().max().item()
    assert err <= 1.5 * eager_err + 0.02, (err, eager_err)
