"""torch.compile(backend="tileflow") on CPU: every decode layer's norm + q/k/v + RoPE +
cache write, attention, norm-fused gated MLP and residual adds, and the final norm +
lm_head become suite kernels (explain says so, per layer); greedy tokens stay identical
to eager in fp32 through the reference and through the generated Triton kernels under
the interpreter; bf16 logits stay as close to fp32 as eager's; what does not match
exactly (a padded mask, rotary scaling) runs as traced, with the reason; an unrelated
model (GPT-2) compiles unchanged."""

import operator

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, StaticCache

import tileflow
from tileflow.integrations.shared.hf import cache_keyword
from tests.integrations.test_transformers_patch import cpu_target, prompt, tiny  # noqa: F401  (fixture)

STEPS = 16


def _decode(step, model, ids, steps=STEPS):
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    kw = {cache_keyword(model): cache}  # a signature read: once, not every step
    with torch.no_grad():
        tok = model(ids, **kw, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for i in range(steps):
            pos = torch.tensor([[ids.shape[1] + i]])
            tok = step(input_ids=tok, position_ids=pos, use_cache=True, **kw).logits[:, -1]
            tok = tok.argmax(-1, keepdim=True)
            toks.append(tok)
    return torch.cat(toks, 1)


def _explain_step(model, ids, **extra):
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(ids, **{cache_keyword(model): cache}, use_cache=True)
    return tileflow.explain(model.forward, input_ids=ids[:, :1], position_ids=torch.tensor([[ids.shape[1]]]),
                            **{cache_keyword(model): cache}, use_cache=True, **extra)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_explain_reports_every_layer_and_tokens_match_eager(kind, cpu_target):  # noqa: F811
    torch._dynamo.reset()
    model, ids = tiny(kind), prompt()
    expected = _decode(model.forward, model, ids)
    report = _explain_step(model, ids)
    layers = model.config.num_hidden_layers
    assert report.matches["rms_norm"] == 2 * layers + 1  # both norms of each layer + the final one
    assert report.matches["rope"] == layers
    assert report.matches["gqa_attention"] == layers
    assert report.matches["gate_up_silu"] == layers
    assert report.matches["matvec_residual"] == 2 * layers
    assert report.matches["matvec"] == 3 * layers + 1  # q, k, v per layer + lm_head
    assert report.matches["cache_counters"] == layers  # one counter op for the step
    assert not report.fallbacks, report
    assert "gqa_attention" in str(report)
    compiled = torch.compile(model.forward, backend="tileflow", mode="default")
    got = _decode(compiled, model, ids)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert len(set(expected[0].tolist())) > 5  # the model does not just repeat a token


def _teacher_forced(step, model, seq, n_prompt, steps=4):
    cache = StaticCache(config=model.config, max_cache_len=n_prompt + steps + 1)
    out = []
    kw = {cache_keyword(model): cache}
    with torch.no_grad():
        model(seq[:, :n_prompt], **kw, use_cache=True)
        for i in range(steps):
            tok = seq[:, n_prompt + i:n_prompt + i + 1]
            pos = torch.tensor([[n_prompt + i]])
            out.append(step(input_ids=tok, position_ids=pos, **kw, use_cache=True)
                       .logits[:, -1].double())
    return out


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_bf16_logits_no_further_from_fp32_than_eager(kind):
    """Judged against the fp32 model, the compiled bf16 step must be as close as eager
    bf16 is (the kernels round once per fused op, eager once per op)."""
    torch._dynamo.reset()
    truth_model, ids = tiny(kind), prompt()
    seq = _decode(truth_model.forward, truth_model, ids, steps=6)
    seq = torch.cat([ids, seq], 1)
    truth = _teacher_forced(truth_model.forward, truth_model, seq, ids.shape[1])
    model = tiny(kind, torch.bfloat16)
    eager = _teacher_forced(model.forward, model, seq, ids.shape[1])
    ours = _teacher_forced(torch.compile(model.forward, backend="tileflow", mode="default"), model, seq,
                           ids.shape[1])
    torch._dynamo.reset()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    err_eager = max(rel(e, t) for e, t in zip(eager, truth))
    err_ours = max(rel(o, t) for o, t in zip(ours, truth))
    assert err_ours < 5e-2 and err_ours <= 1.5 * err_eager + 1e-3, (err_ours, err_eager)


@pytest.mark.parametrize("hole", [None, 2])
def test_padding_mask_becomes_the_kernels_key_mask(hole, cpu_target):  # noqa: F811
    """generate passes a 2-D attention mask: transformers ANDs its padding term into the
    causal mask. The kernel takes that term as its key mask, so a padded position stays
    hidden (logits as eager's) and an all-ones mask changes nothing."""
    torch._dynamo.reset()
    model, ids = tiny("llama"), prompt()
    mask = torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
    if hole is not None:
        mask[0, hole] = 0
    report = _explain_step(model, ids, attention_mask=mask)
    assert report.matches["gqa_attention"] == model.config.num_hidden_layers, report
    compiled = torch.compile(model.forward, backend="tileflow", mode="default")
    outs = []
    for fn in (compiled, model.forward):
        cache = StaticCache(config=model.config, max_cache_len=64)
        with torch.no_grad():
            model(ids, **{cache_keyword(model): cache}, use_cache=True)
            outs.append(fn(input_ids=ids[:, -1:], position_ids=torch.tensor([[ids.shape[1]]]), use_cache=True,
                           attention_mask=mask, **{cache_keyword(model): cache}).logits)
    torch._dynamo.reset()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    if hole is not None:  # the hole matters: the unmasked step differs
        cache = StaticCache(config=model.config, max_cache_len=64)
        with torch.no_grad():
            model(ids, **{cache_keyword(model): cache}, use_cache=True)
            open_ = model(input_ids=ids[:, -1:], position_ids=torch.tensor([[ids.shape[1]]]), use_cache=True,
                          **{cache_keyword(model): cache}).logits
        assert not torch.allclose(open_, outs[1], atol=1e-3)


def test_a_mask_term_that_is_not_a_boolean_key_row_is_not_claimed():
    """For one query any bool [1, 1, 1, S] term is a key mask (exact); a term of another
    kind (here float, as an additive bias would be) is not: attention stays as traced."""
    from tileflow.integrations.torch import decode_graph

    graph = torch.fx.Graph()
    kv = graph.call_function(torch.arange, (64,))
    q = graph.call_function(operator.add, (graph.call_function(torch.arange, (1,)), 5))
    le = graph.call_function(operator.le, (kv, q))
    window = graph.call_function(operator.gt, (kv, q))
    both = graph.call_function(operator.and_, (le, window))
    window.meta["example_value"] = torch.zeros(1, 1, 1, 64, dtype=torch.bool)
    assert decode_graph.match_mask(both, 64) == (q, [window])
    window.meta["example_value"] = torch.zeros(1, 1, 1, 64)
    with pytest.raises(decode_graph.NoMatch, match="neither causal nor per key"):
        decode_graph.match_mask(both, 64)


def test_rotary_attention_scaling_is_not_claimed():
    """An ``attention_scaling`` other than 1 multiplies cos / sin: the fused kernel
    applies none, so the layer's attention input stays as traced."""
    torch._dynamo.reset()
    model, ids = tiny("qwen2"), prompt()
    model.model.rotary_emb.attention_scaling = 0.9
    report = _explain_step(model, ids)
    assert not report.matches["rope"]
    assert any("attention_scaling" in r for _, _, r in report.fallbacks), report


def test_prefill_keeps_the_library_gemm_with_a_reason():
    torch._dynamo.reset()
    model, ids = tiny("llama"), prompt()
    report = tileflow.explain(model.forward, input_ids=ids, use_cache=False)
    assert not report.matches["matvec"]
    assert any("rows: prefill stays" in r for _, _, r in report.fallbacks)


def test_gpt2_compiles_unchanged_with_reasons():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, 1))
    with torch.no_grad():
        expected = model(ids).logits
        report = tileflow.explain(model, ids)
        got = torch.compile(model, backend="tileflow", mode="default")(ids).logits
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    # GPT-2's Conv1D multiplies by W [K, N] untransposed: not the nn.Linear layout
    assert any("nn.Linear layout" in r for _, _, r in report.fallbacks)
    assert sum(report.matches.values()) == 1  # only its lm_head, an nn.Linear


def test_suite_ops_never_take_inductors_implicit_fallback(monkeypatch):
    """torch 2.11 formats an implicit fallback's IR arguments eagerly; for the fused ops
    (fed the residual stream) that string nests every earlier layer and a 28-layer
    compile hung. Every tileflow op must have its lowering before inductor lowers."""
    import torch._inductor.graph as inductor_graph

    seen = []
    real = inductor_graph.log.info

    def spy(msg, *args, **kwargs):
        if "implicit fallback" in str(msg):
            seen.append(str(args[0]) if args else "")
        return real(msg, *args, **kwargs)

    monkeypatch.setattr(inductor_graph.log, "info", spy)
    torch._dynamo.reset()
    model, ids = tiny("qwen2"), prompt()
    report = _explain_step(model, ids)
    assert report.matches["gqa_attention"] == model.config.num_hidden_layers
    assert not [s for s in seen if "tileflow" in s], seen
    from torch._inductor import lowering
    assert torch.ops.tileflow.qkv_rope_cache.default in lowering.lowerings


def test_generate_with_compile_config_uses_the_suite_and_matches_eager():
    """``generate(compile_config=CompileConfig(backend="tileflow"))``: transformers builds
    the mask before the compiled step and passes it in; for one query it is a key mask,
    so every layer still matches, and greedy tokens equal eager's (fp32)."""
    from transformers import CompileConfig

    from tileflow.integrations.torch import backend

    torch._dynamo.reset()
    model, ids = tiny("qwen2"), prompt()
    config = CompileConfig(backend="tileflow", mode="default")
    config._compile_all_devices = True  # transformers compiles on CPU only when told to
    backend.LAST_REPORTS.clear()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
        got = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static",
                             compile_config=config)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert backend.LAST_REPORTS, "generate did not compile the step"
    report = backend.LAST_REPORTS[-1]
    assert report.matches["gqa_attention"] == model.config.num_hidden_layers, report
