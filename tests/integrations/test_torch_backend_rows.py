"""torch.compile(backend="tileflow") with more than one row a step: a left-padded batch
(``generate`` with the forward compiled, and a decode loop over a StaticCache of batch
B), the R tokens of a prompt-lookup verify step, and MHA models (no repeat_kv in the
graph). Tokens equal the uncompiled model's (fp32); the report counts the patterns per
layer with no fallback; the fused ops are counted running with B (or R) rows, so a step
that silently ran the traced graph fails; one compile serves the whole decode."""

import functools

import pytest
import torch
from transformers import StaticCache

import tileflow
from tileflow.integrations.shared.hf import cache_keyword
from tileflow.integrations.torch import backend
from tileflow.runtime import ops
from tests.integrations.test_patch_batch import batch
from tests.integrations.test_patch_speculate import repetitive
from tests.integrations.test_transformers_patch import tiny

NEW = 6


def model_of(kind):
    """tiny(kind); ``-mha``: the same config with as many K/V heads as query heads."""
    base, _, mha = kind.partition("-")
    model = tiny(base)
    if not mha:
        return model
    config = model.config
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    return type(model)(config).eval()


def per_layer(report, layers):
    assert not report.fallbacks, report
    assert report.matches["gqa_attention"] == layers and report.matches["rope"] == layers, report
    assert report.matches["rms_norm"] == 2 * layers + 1 and report.matches["gate_up_silu"] == layers, report
    assert report.matches["matvec_residual"] == 2 * layers, report
    assert report.matches["matvec"] == 3 * layers + 1, report


@pytest.fixture
def attention_rows(monkeypatch):
    """The rows each fused attention call ran with: (batch, new tokens a sequence)."""
    seen, real = [], ops.gqa_attention

    def spy(q, *args, **kwargs):
        seen.append((q.shape[0], q.shape[1] if q.dim() == 4 else 1))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(ops, "gqa_attention", spy)
    return seen


@pytest.mark.parametrize("kind", ["qwen2", "llama-mha"])
def test_padded_batch_generate_with_the_forward_compiled(kind, tileflow_options, attention_rows):
    tileflow_options(cpu_target="reference")
    torch._dynamo.reset()
    model = model_of(kind)
    ids, mask = batch()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(ids, **kw)
        backend.LAST_REPORTS.clear()
        model.forward = torch.compile(model.forward, backend="tileflow", mode="default")
        got = model.generate(ids, **kw)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got[:, ids.shape[1]:].tolist(), expected[:, ids.shape[1]:].tolist())
    assert len({tuple(r) for r in expected[:, ids.shape[1]:].tolist()}) == 3  # the rows differ
    # the prefill and one decode graph for every step: no recompile per token
    assert len(backend.LAST_REPORTS) == 2, [str(r) for r in backend.LAST_REPORTS]
    per_layer(backend.LAST_REPORTS[1], model.config.num_hidden_layers)
    assert attention_rows == [(3, 1)] * (model.config.num_hidden_layers * (NEW - 1)), attention_rows


def _loop(step, model, ids, mask, steps):
    """Greedy decode of a left-padded batch over a StaticCache; the 2-D mask is as wide
    as the cache (ones past the prompt: the causal term hides the future), so every step
    has the same shapes."""
    b, t = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=t + steps + 1)
    kw = {cache_keyword(model): cache}
    full = torch.cat([mask, torch.ones(b, steps + 1, dtype=mask.dtype)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        tok = model(ids, attention_mask=mask, position_ids=pos, **kw, use_cache=True).logits[:, -1].argmax(-1)
        toks = [tok]
        for i in range(steps):
            p = pos[:, -1:] + 1 + i
            tok = step(input_ids=tok[:, None], attention_mask=full, position_ids=p, **kw,
                       use_cache=True).logits[:, -1].argmax(-1)
            toks.append(tok)
    return torch.stack(toks, 1)


@pytest.mark.parametrize("kind,target", [("llama", "reference"), ("qwen2-mha", "reference"), ("qwen2", "triton")])
def test_decode_loop_over_a_batch_static_cache(kind, target, tileflow_options, attention_rows):
    """The mask is built inside the graph here: the causal term and the padding term
    [B, 1, 1, S], which becomes the kernel's per-row key mask."""
    tileflow_options(cpu_target=target)
    ops._LAUNCHERS.clear()
    torch._dynamo.reset()
    model = model_of(kind)
    ids, mask = batch()
    steps = 4 if target == "triton" else 8
    expected = _loop(model.forward, model, ids, mask, steps)
    counter = torch._dynamo.testing.CompileCounterWithBackend("tileflow")
    got = _loop(torch.compile(model.forward, backend=counter), model, ids, mask, steps)
    ops._LAUNCHERS.clear()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert counter.frame_count == 1, counter.frame_count  # one compile for the whole decode
    layers = model.config.num_hidden_layers
    assert attention_rows == [(3, 1)] * (layers * steps), attention_rows
    if target == "reference":
        b, t = ids.shape
        cache = StaticCache(config=model.config, max_cache_len=t + 4)
        with torch.no_grad():
            model(ids, attention_mask=mask, **{cache_keyword(model): cache}, use_cache=True)
        full = torch.cat([mask, torch.ones(b, 4, dtype=mask.dtype)], 1)
        report = tileflow.explain(model.forward, input_ids=ids[:, -1:], attention_mask=full,
                                  position_ids=mask.sum(-1, keepdim=True), **{cache_keyword(model): cache},
                                  use_cache=True)
        per_layer(report, layers)
        assert report.matches["cache_counters"] == layers
    torch._dynamo.reset()


def test_prompt_lookup_verify_steps_run_with_r_rows(tileflow_options, attention_rows):
    """The verify step's R tokens: dynamo makes R dynamic after the second length, so one
    graph serves every R in 2..16 (a guard bounds it); its mask comes from generate
    ([1, 1, R, S]), taken as one key row with the kernel's causal rows and asserted in
    the step. A longer call (a 20-token prefill) recompiles and keeps its attention."""
    tileflow_options(cpu_target="reference")
    torch._dynamo.reset()
    model, ids = tiny("llama"), repetitive()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=14, do_sample=False)
        backend.LAST_REPORTS.clear()
        compiled = torch.compile(model.forward, backend="tileflow", mode="default")
        calls = []

        @functools.wraps(compiled)  # generate reads the forward's signature
        def record(**kw):
            if kw["input_ids"].shape[1] > 1 and kw.get("attention_mask") is not None:
                calls.append(kw)
            return compiled(**kw)

        model.forward = record
        # transformers' default static cache has no room for the last drafts: one that has
        cache = StaticCache(config=model.config, max_cache_len=64)
        got = model.generate(ids, max_new_tokens=14, do_sample=False, prompt_lookup_num_tokens=4, cache=cache)
        assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
        verify = [r for r in backend.LAST_REPORTS if r.matches["gqa_attention"]]
        assert len(backend.LAST_REPORTS) == 3, [str(r) for r in backend.LAST_REPORTS]  # prefill, R = 1, R dynamic
        for report in verify:
            per_layer(report, model.config.num_hidden_layers)
        assert any(r > 1 for _, r in attention_rows), attention_rows  # drafts verified by the fused kernels
        cache = StaticCache(config=model.config, max_cache_len=64)

        def verify(n, flip=False, fn=record):
            """A verify call as generate makes them, of n tokens after one cached token."""
            cache.reset()
            type(model).forward(model, input_ids=ids[:, :1], cache=cache, use_cache=True)  # allocates it
            mask = (torch.arange(64)[None, :] <= 1 + torch.arange(n)[:, None])[None, None]
            if flip:
                mask[0, 0, 0, 0] = False
            return fn(**dict(calls[-1], input_ids=ids[:, 1:n + 1], position_ids=torch.arange(1, n + 1)[None],
                             attention_mask=mask, cache=cache)).logits

        eager = functools.partial(type(model).forward, model)
        torch.testing.assert_close(verify(5), verify(5, fn=eager))
        graphs = len(backend.LAST_REPORTS)
        per_layer(backend.LAST_REPORTS[-1], model.config.num_hidden_layers)
        # a mask of another form than causal over one key row raises, never a silent difference
        with pytest.raises(RuntimeError, match="not causal over one key row"):
            verify(5, flip=True)
        # 20 tokens, more than a verify step: a graph of its own (a guard bounds R in a dynamic one)
        torch.testing.assert_close(verify(20), verify(20, fn=eager))
    torch._dynamo.reset()
    assert len(backend.LAST_REPORTS) == graphs + 1 and not backend.LAST_REPORTS[-1].matches["gqa_attention"]
    assert any("queries a sequence: more than a verify step's 16" in why
               for _, _, why in backend.LAST_REPORTS[-1].fallbacks), backend.LAST_REPORTS[-1]
