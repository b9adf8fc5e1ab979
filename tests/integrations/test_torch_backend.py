"""torch.compile(backend="tileflow") on CPU: the decode graph's linears, gated MLP and
residual adds become suite kernels (explain says so, per layer), greedy tokens stay
identical to eager in fp32, and an unrelated model (GPT-2) compiles unchanged."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, StaticCache

import tileflow
from tests.integrations.test_transformers_patch import prompt, tiny

STEPS = 16


def _decode(step, model, ids, steps=STEPS):
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for i in range(steps):
            pos = torch.tensor([[ids.shape[1] + i]])
            tok = step(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
            tok = tok.argmax(-1, keepdim=True)
            toks.append(tok)
    return torch.cat(toks, 1)


def test_explain_reports_every_layer_and_tokens_match_eager():
    torch._dynamo.reset()
    model, ids = tiny("qwen2"), prompt()
    expected = _decode(model.forward, model, ids)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    report = tileflow.explain(model.forward, input_ids=ids[:, :1], position_ids=torch.tensor([[ids.shape[1]]]),
                              past_key_values=cache, use_cache=True)
    layers = model.config.num_hidden_layers
    assert report.matches["gate_up_silu"] == layers
    assert report.matches["matvec_residual"] == 2 * layers
    assert report.matches["matvec"] == 3 * layers + 1  # q, k, v per layer + lm_head
    assert "gate_up_silu" in str(report)
    compiled = torch.compile(model.forward, backend="tileflow", mode="default")
    got = _decode(compiled, model, ids)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())


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
