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


def returned_cache(out):
    """The cache a ``return_dict_in_generate`` output holds (``cache`` from transformers 5.24)."""
    return out.cache if "cache" in type(out).__dataclass_fields__ else out.past_key_values


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


def test_drafting_calls_get_a_static_cache_only_with_room_for_the_drafts(monkeypatch):
    """The default static cache is sized by generate's cache length plus the drafts'
    room (on a transformers whose assisted decoding takes static caches, 5.25); a
    transformers whose cache preparation takes no length keeps the default cache for
    drafting calls (the last verify would write past a max_length-sized static cache)."""
    from transformers import GenerationConfig

    from tileflow.integrations.transformers import patch as patch_module
    from tileflow.integrations.transformers.patch import PatchReport, _static_by_default

    monkeypatch.setattr(patch_module, "assisted_takes_static", lambda: True)
    seen = []

    def with_length(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        seen.append((generation_config.cache_implementation, max_cache_length))

    def without_length(self, generation_config, model_kwargs, generation_mode, batch_size):
        seen.append((generation_config.cache_implementation, None))

    report = PatchReport()
    for prepare in (with_length, without_length):
        for lookup in (None, 4):
            wrapped = _static_by_default(object(), prepare, {"cache": None}, report)
            wrapped(GenerationConfig(prompt_lookup_num_tokens=lookup, use_cache=True), {}, "greedy_search", 1,
                    *([40] if prepare is with_length else []))
    assert seen == [("static", 40), ("static", 45), ("static", None), (None, None)]
    assert any("takes no cache length" in n for n in report.notes), report.notes


def test_a_transformers_like_5_17_gets_tileflows_static_cache_for_drafting_calls(monkeypatch):
    """Where assisted decoding refuses StaticCache by its exact type only (5.17), a drafting
    call's preparation is handed tileflow's StaticCache subclass with the drafts' room, and
    ``cache_implementation`` stays unset (5.17 refuses "static" there); an assistant's own
    call gets one too (no room), a plain call the usual ``cache_implementation="static"``, and
    a call that passes its own cache keeps it."""
    from transformers import GenerationConfig, StaticCache

    from tileflow.integrations.transformers import patch as patch_module
    from tileflow.integrations.transformers.patch import PatchReport, _static_by_default

    monkeypatch.setattr(patch_module, "assisted_takes_static", lambda: False)
    monkeypatch.setattr(patch_module, "assisted_takes_static_subclass", lambda: True)
    model = tiny("qwen2")
    key = patch_module._cache_parameter()
    seen = []

    def prepare(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        cache = model_kwargs.get(key)
        if cache is not None:  # as transformers marks a cache it was given
            cache._is_user_defined = True
        seen.append((generation_config.cache_implementation, max_cache_length, cache))

    report = PatchReport()
    wrapped = _static_by_default(model, prepare, {"cache": None}, report)
    wrapped(GenerationConfig(prompt_lookup_num_tokens=4, use_cache=True), {}, "greedy_search", 1, 40)
    wrapped(GenerationConfig(use_cache=True), {}, "greedy_search", 1, 40)
    assistant = GenerationConfig(use_cache=True)
    assistant.is_assistant = True
    wrapped(assistant, {}, "greedy_search", 1, 36)
    mine = StaticCache(config=model.config, max_cache_len=50)
    wrapped(GenerationConfig(prompt_lookup_num_tokens=4, use_cache=True), {key: mine}, "greedy_search", 1, 40)
    (impl, length, drafting), plain, (_, _, assisting), given = seen
    assert impl is None and length == 40 and isinstance(drafting, StaticCache) and type(drafting) is not StaticCache
    assert drafting.get_max_length() == 45 and not hasattr(drafting, "_is_user_defined")
    assert plain == ("static", 40, None)
    assert assisting.get_max_length() == 36 and type(assisting) is type(drafting)
    assert given == (None, 40, mine)  # the caller's cache, untouched
    assert any("StaticCache subclass" in n for n in report.notes), report.notes


def test_the_draft_cache_crops_as_5_25s_static_layer():
    """tileflow's draft cache crops its StaticLayers by their device count (5.25's
    ``StaticLayer.crop``), refuses a positive count, and keeps transformers' own layers."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    from tileflow.integrations.transformers.compat import crop_static_layer, draft_static_cache

    model = tiny("llama")
    cache, why = draft_static_cache(model.config, 16)
    assert not why and isinstance(cache, StaticCache) and type(cache) is not StaticCache and cache.is_croppable
    assert all(type(layer) is StaticLayer for layer in cache.layers)
    k = torch.randn(1, 2, 5, 8)
    for i in range(len(cache.layers)):
        cache.update(k, k, i)
    cache.crop(-2)
    assert int(cache.get_seq_length()) == 3 and all(int(layer.cumulative_length) == 3 for layer in cache.layers)
    cache.crop(0)
    assert int(cache.get_seq_length()) == 3
    with pytest.raises(RuntimeError, match="negative"):
        cache.crop(2)
    layer = StaticLayer(max_cache_len=4)
    layer.cumulative_length += 4
    crop_static_layer(layer, -1)
    assert int(layer.cumulative_length) == 3


def _refuse_static_as_5_17(monkeypatch, exact: bool):
    """transformers 5.17's refusal of a static cache in assisted decoding, on this
    transformers: by ``cache_implementation`` and, with ``exact``, the exact type
    ``StaticCache`` (5.17's check), else any static cache (a stricter release)."""
    from transformers import StaticCache
    from transformers.generation.utils import GenerationMixin

    from tileflow.integrations.shared.hf import cache_argument

    original = GenerationMixin._assisted_decoding

    def refusing(self, *args, **kwargs):
        config = kwargs.get("generation_config")
        cache = cache_argument(kwargs)
        if getattr(config, "cache_implementation", None) in ["static", "hybrid", "sliding_window"] or (
                type(cache) is StaticCache if exact else isinstance(cache, StaticCache)):
            raise ValueError("assisted generate is not supported with Static cache classes`")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "_assisted_decoding", refusing)


def _static_layers_without_crop(monkeypatch):
    """transformers 5.17's StaticLayer: no ``crop``, not croppable."""
    from transformers.cache_utils import StaticLayer

    if "crop" in StaticLayer.__dict__:
        monkeypatch.delattr(StaticLayer, "crop")
    monkeypatch.setattr(StaticLayer, "is_croppable", False, raising=False)
    assert not hasattr(StaticLayer, "crop")


def test_speculation_runs_the_program_on_a_transformers_like_5_17(monkeypatch, tileflow_options):
    """On this transformers made to behave as 5.17 does (assisted decoding refuses
    ``StaticCache`` by its exact type and a static ``cache_implementation``; StaticLayer
    cannot crop), prompt lookup and assisted generation with a patched draft still verify
    through the program, on tileflow's static cache, with the unpatched model's tokens; the
    cache generate returns is that cache, holding the sequence but its last token."""
    from transformers import StaticCache
    from transformers.generation.utils import GenerationMixin

    from tileflow.integrations.transformers import patch as patch_module

    tileflow_options(cpu_target="reference")
    model, ids = tiny("qwen2"), repetitive()
    torch.manual_seed(5)
    draft = tiny("qwen2")
    with torch.no_grad():
        for p, q in zip(draft.parameters(), model.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    expected = generate(model, ids, do_sample=False)
    _refuse_static_as_5_17(monkeypatch, exact=True)
    _static_layers_without_crop(monkeypatch)
    with pytest.raises(ValueError, match="Static cache"):  # the refusal bites
        generate(model, ids, do_sample=False, prompt_lookup_num_tokens=4, cache_implementation="static")
    monkeypatch.setattr(patch_module, "assisted_takes_static", lambda: False)
    monkeypatch.setattr(patch_module, "assisted_takes_static_subclass", lambda: True)
    caches = []
    assisted = GenerationMixin._assisted_decoding

    def recording(self, *args, **kwargs):
        from tileflow.integrations.shared.hf import cache_argument

        caches.append(cache_argument(kwargs))
        return assisted(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "_assisted_decoding", recording)
    report, draft_report = tileflow.patch(model), tileflow.patch(draft)
    looked_up = generate(model, ids, do_sample=False, prompt_lookup_num_tokens=4, return_dict_in_generate=True)
    lookup_steps = report.verify_steps
    got = generate(model, ids, do_sample=False, assistant_model=draft, num_assistant_tokens=5)
    tileflow.unpatch(model), tileflow.unpatch(draft)
    assert torch.equal(looked_up.sequences, expected) and torch.equal(got, expected)
    assert lookup_steps > 0 and report.verify_steps > lookup_steps and not report.fallbacks, str(report)
    assert draft_report.steps > 0 and not draft_report.fallbacks, str(draft_report)
    assert all(isinstance(c, StaticCache) and type(c) is not StaticCache for c in caches) and len(caches) == 2
    returned = returned_cache(looked_up)
    assert returned is caches[0] and int(returned.get_seq_length()) == expected.shape[1] - 1


def test_a_transformers_that_refuses_static_caches_for_drafts_keeps_the_default_cache(monkeypatch, tileflow_options):
    """A transformers whose assisted decoding refuses every static cache (not only
    ``StaticCache`` by its exact type) takes neither path: prompt lookup on a patched model
    runs on the default cache, with the model's own code, not crash, and the report says why."""
    from tileflow.integrations.transformers import patch as patch_module

    tileflow_options(cpu_target="reference")
    _refuse_static_as_5_17(monkeypatch, exact=False)
    monkeypatch.setattr(patch_module, "assisted_takes_static", lambda: False)
    monkeypatch.setattr(patch_module, "assisted_takes_static_subclass", lambda: False)
    model, ids = tiny("qwen2"), repetitive()
    expected = generate(model, ids, do_sample=False, prompt_lookup_num_tokens=3)
    report = tileflow.patch(model)
    got = generate(model, ids, do_sample=False, prompt_lookup_num_tokens=3)
    tileflow.unpatch(model)
    assert torch.equal(got, expected)
    assert report.verify_steps == 0  # the drafts were verified by the model's own code, on its default cache
    assert any("keep the default cache" in n and "refuses static caches" in n for n in report.notes), report.notes


def test_a_cache_the_caller_passes_to_a_drafting_call_is_left_alone(tileflow_options):
    """The caller's own cache (here a DynamicCache) is the one prompt lookup runs on and returns."""
    from transformers import DynamicCache

    from tileflow.integrations.shared.hf import cache_keyword

    tileflow_options(cpu_target="reference")
    model, ids = tiny("llama"), repetitive()
    expected = generate(model, ids, do_sample=False)
    report = tileflow.patch(model)
    mine = DynamicCache(config=model.config)
    out = generate(model, ids, do_sample=False, prompt_lookup_num_tokens=3, return_dict_in_generate=True,
                   **{cache_keyword(model): mine})
    tileflow.unpatch(model)
    assert torch.equal(out.sequences, expected)
    assert returned_cache(out) is mine and type(mine) is DynamicCache
    assert report.verify_steps == 0


def test_the_probes_read_this_transformers():
    """5.17 refuses static caches in assisted decoding, by their exact type; 5.25 takes them."""
    import transformers

    from tileflow.integrations.transformers.compat import assisted_takes_static, assisted_takes_static_subclass

    assisted_takes_static.cache_clear(), assisted_takes_static_subclass.cache_clear()
    found = (assisted_takes_static(), assisted_takes_static_subclass())
    assert found != (True, True)
    known = {"5.17.0": (False, True), "5.25.0": (True, False)}.get(transformers.__version__)
    assert known is None or found == known, (transformers.__version__, found)
