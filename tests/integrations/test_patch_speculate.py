"""Speculative decoding on a patched model, as transformers ships it: prompt lookup
(``prompt_lookup_num_tokens=``) and assisted generation (``assistant_model=``). The
verify step (K+1 tokens of one sequence) runs the whole-step program with R rows
(counted), the cache cropped by transformers after a rejected draft stays right, and
the tokens equal the unpatched model's, greedy and sampled."""

import pytest
import torch

import tileflow
from tests.integrations.test_transformers_patch import cpu_target, tiny  # noqa: F401  (fixture)

NEW = 14


def repetitive(n=12, seed=1):
    """A prompt that repeats itself, so prompt lookup finds drafts that are partly right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (1, n), generator=g)
    return torch.cat([ids, ids[:, :6], ids[:, 2:8]], 1)


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, **kw)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_prompt_lookup_verifies_through_the_program(kind, cpu_target):
    model, ids = tiny(kind), repetitive()
    expected = generate(model, ids, do_sample=False)
    assert torch.equal(generate(model, ids, do_sample=False, prompt_lookup_num_tokens=4), expected)
    report = tileflow.patch(model)
    got = generate(model, ids, do_sample=False, prompt_lookup_num_tokens=4)
    tileflow.unpatch(model)
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
    assert report.verify_steps > 0, str(report)  # drafts were verified by the program
    assert report.steps >= report.verify_steps and not report.fallbacks, report.fallbacks


def test_assisted_generation_with_a_patched_draft_model(tileflow_options):
    tileflow_options(cpu_target="reference")
    model, ids = tiny("qwen2"), repetitive()
    torch.manual_seed(5)
    draft = tiny("qwen2")
    with torch.no_grad():  # a draft that agrees with the model often, not always
        for p, q in zip(draft.parameters(), model.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    expected = generate(model, ids, do_sample=False)
    report, draft_report = tileflow.patch(model), tileflow.patch(draft)
    got = generate(model, ids, do_sample=False, assistant_model=draft, num_assistant_tokens=5)
    tileflow.unpatch(model), tileflow.unpatch(draft)
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
    assert report.verify_steps > 0 and not report.fallbacks, str(report)
    assert draft_report.steps > 0  # the draft's own one-token steps run the program too


def test_sampled_prompt_lookup_equals_the_unpatched_model(tileflow_options):
    tileflow_options(cpu_target="reference")
    model, ids = tiny("llama"), repetitive()
    torch.manual_seed(11)
    expected = generate(model, ids, do_sample=True, top_k=10, prompt_lookup_num_tokens=3)
    report = tileflow.patch(model)
    torch.manual_seed(11)
    got = generate(model, ids, do_sample=True, top_k=10, prompt_lookup_num_tokens=3)
    tileflow.unpatch(model)
    assert torch.equal(got, expected)
    assert report.verify_steps > 0


def test_several_tokens_with_gradients_run_the_model_and_say_why(tileflow_options):
    """A continuation the verify program does not take (here: gradients on) runs the
    model's forward, with the reason in the report."""
    from transformers import StaticCache

    from tileflow.integrations.shared.hf import cache_keyword

    tileflow_options(cpu_target="reference")
    model, ids = tiny("qwen2"), repetitive()
    cache = StaticCache(config=model.config, max_cache_len=64)
    report = tileflow.patch(model)
    with torch.no_grad():
        model(ids[:, :10], **{cache_keyword(model): cache}, use_cache=True)
    out = model(ids[:, 10:14], **{cache_keyword(model): cache}, use_cache=True,
                position_ids=torch.arange(10, 14)[None])
    tileflow.unpatch(model)
    assert out.logits.shape[1] == 4 and report.verify_steps == 0
    assert any(f[0] == "verify_step" and "gradients" in f[2] for f in report.fallbacks), report.fallbacks


def test_drafting_calls_get_a_static_cache_only_with_room_for_the_drafts():
    """The default static cache is sized by generate's cache length plus the drafts'
    room; a transformers whose cache preparation takes no length keeps the default cache
    for drafting calls (the last verify would write past a max_length-sized static cache)."""
    from transformers import GenerationConfig

    from tileflow.integrations.transformers.patch import _static_by_default

    seen = []

    def with_length(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        seen.append((generation_config.cache_implementation, max_cache_length))

    def without_length(self, generation_config, model_kwargs, generation_mode, batch_size):
        seen.append((generation_config.cache_implementation, None))

    for prepare in (with_length, without_length):
        for lookup in (None, 4):
            wrapped = _static_by_default(object(), prepare, {"cache": None})
            wrapped(GenerationConfig(prompt_lookup_num_tokens=lookup, use_cache=True), {}, "greedy_search", 1,
                    *([40] if prepare is with_length else []))
    assert seen == [("static", 40), ("static", 45), ("static", None), (None, None)]


def test_a_transformers_that_refuses_static_caches_for_drafts_keeps_the_default_cache(monkeypatch, tileflow_options):
    """transformers 5.17's assisted decoding raises on a static cache: prompt lookup on a
    patched model there must run on the default cache (seen on the GPU), not crash."""
    from transformers.generation.utils import GenerationMixin

    from tileflow.integrations.transformers import patch as patch_module

    original = GenerationMixin._assisted_decoding

    def refusing(self, *args, **kwargs):
        from transformers import StaticCache

        if any(isinstance(v, StaticCache) for v in kwargs.values()):
            raise ValueError("assisted generate is not supported with Static cache classes`")
        return original(self, *args, **kwargs)

    tileflow_options(cpu_target="reference")
    monkeypatch.setattr(GenerationMixin, "_assisted_decoding", refusing)
    monkeypatch.setattr(patch_module, "assisted_takes_static", lambda: False)
    model, ids = tiny("qwen2"), repetitive()
    expected = generate(model, ids, do_sample=False, prompt_lookup_num_tokens=3)
    report = tileflow.patch(model)
    got = generate(model, ids, do_sample=False, prompt_lookup_num_tokens=3)
    tileflow.unpatch(model)
    assert torch.equal(got, expected)
    assert report.verify_steps == 0  # the drafts were verified by the model's own code, on its default cache


def test_the_probe_reads_this_transformers():
    from tileflow.integrations.transformers.patch import assisted_takes_static

    assisted_takes_static.cache_clear()
    assert isinstance(assisted_takes_static(), bool)
