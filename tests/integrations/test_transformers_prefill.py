"""The patched model's prompt pass (integrations/transformers/prefill.py): the same
logits and the same cache contents as the model's own forward, fired only for a plain
prompt into an empty cache, with the reason recorded otherwise."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import tileflow
from tileflow.integrations.shared.hf import cache_keyword
from tileflow.integrations.transformers.prefill import GraphedPrefill, PrefillProgram

from .test_transformers_patch import prompt, tiny


def _forward(model, ids, cache, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True, **kw).logits


def _cache(kind, model, capacity=32):
    return StaticCache(config=model.config, max_cache_len=capacity) if kind == "static" else \
        DynamicCache(config=model.config)


@pytest.fixture
def spy(monkeypatch):
    calls, real = [], PrefillProgram.run
    monkeypatch.setattr(PrefillProgram, "run", lambda self, *a: calls.append(a[0].shape[1]) or real(self, *a))
    return calls


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_same_logits_and_cache_as_the_model(kind, cache, dtype, tol, spy):
    ids = prompt(12, seed=3)
    model = tiny(kind, dtype)
    ref_cache = _cache(cache, model)
    expected = _forward(model, ids, ref_cache)
    tileflow.patch(model)
    got_cache = _cache(cache, model)
    got = _forward(model, ids, got_cache)
    assert spy == [12]
    assert not torch.isnan(got).any()
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= tol * scale
    assert int(got_cache.get_seq_length()) == int(ref_cache.get_seq_length()) == 12
    for a, b in zip(got_cache.layers, ref_cache.layers):
        assert (a.keys.float() - b.keys.float()).abs().max() <= tol * b.keys.float().abs().max()
        assert (a.values.float() - b.values.float()).abs().max() <= tol * b.values.float().abs().max()


def test_logits_to_keep_gives_the_last_rows(spy):
    model, ids = tiny("qwen2"), prompt(10)
    expected = _forward(model, ids, _cache("static", model))[:, -1:]
    tileflow.patch(model)
    got = _forward(model, ids, _cache("static", model), logits_to_keep=1)
    assert spy == [10] and got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["padding", "chunk", "grad", "positions"])
def test_declines_with_the_reason(case, spy):
    model, ids = tiny("llama"), prompt(8)
    ref_cache, cache = _cache("static", model), _cache("static", model)
    kw, want = {}, {"padding": "padding", "chunk": "", "grad": "gradients", "positions": "position_ids"}[case]
    if case == "padding":
        kw["attention_mask"] = torch.tensor([[0] + [1] * 7])
    elif case == "positions":
        kw["position_ids"] = torch.arange(5, 13).view(1, 8)
    elif case == "chunk":  # the prompt's first half went in before: the second is a chunk
        _forward(model, ids[:, :4], ref_cache)
        report = tileflow.patch(model)
        _forward(model, ids[:, :4], cache)
        ids, spy[:] = ids[:, 4:], []
    report = tileflow.patch(model)
    with torch.set_grad_enabled(case == "grad"):
        got = model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True, **kw).logits
    assert spy == []
    if case == "chunk":  # up to 16 tokens continuing a sequence: the decode program's R rows take them
        assert report.verify_steps == 1 and not report.fallbacks, report
    else:
        assert any(p == "prefill" and want in why for p, _, why in report.fallbacks), report.fallbacks
    tileflow.unpatch(model)
    expected = _forward(model, ids, ref_cache, **kw)
    assert torch.allclose(got.detach(), expected, atol=1e-5, rtol=1e-5)


def test_switched_off_by_the_environment(spy, tileflow_options):
    tileflow_options(prefill=False)
    model, ids = tiny("qwen2"), prompt()
    report = tileflow.patch(model)
    _forward(model, ids, _cache("static", model))
    assert spy == [] and "prefill" not in report.matches


def test_switched_off_per_call(spy):
    model, ids = tiny("qwen2"), prompt()
    report = tileflow.patch(model, options={"prefill": False})
    _forward(model, ids, _cache("static", model))
    assert spy == [] and "prefill" not in report.matches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
def test_graph_replay_matches_the_direct_pass():
    """The first prompt of a length runs directly, the second captures, the third replays:
    each gives the direct pass's logits and cache."""
    model, ids = tiny("qwen2", torch.bfloat16).cuda(), prompt(16).cuda()
    graphed = GraphedPrefill(PrefillProgram(model))
    cache = _cache("static", model)
    with torch.no_grad():
        runs = []
        for _ in range(3):
            cache.reset()
            runs.append((graphed(ids, cache).clone(), cache.layers[1].keys.clone(), int(cache.get_seq_length())))
    assert len(graphed.graphs) == 1
    for logits, keys, n in runs[1:]:
        assert torch.equal(logits, runs[0][0]) and torch.equal(keys, runs[0][1]) and n == 16
