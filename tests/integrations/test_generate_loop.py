"""generate's lean greedy loop on a patched model (``_lean_sample`` in
integrations/transformers/patch.py): the same tokens as transformers' own loop on the
unpatched model (stopping at an EOS token where transformers stops), the lean loop counted
as having run, the same inputs at every step as transformers' loop passes, and every call
it does not reproduce exactly left to transformers' ``_sample`` (the reason noted once)."""

import functools

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM, StaticCache
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerationMixin

import tileflow
from tests.integrations.test_transformers_patch import prompt, tiny
from tileflow.integrations.shared.hf import cache_keyword
from tileflow.integrations.transformers.patch import CHECK_EVERY

KINDS = ["qwen2", "llama"]


def generate(model, ids, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, **kw)


@pytest.fixture
def transformers_loop(monkeypatch):
    """The calls of transformers' own ``_sample`` (what the lean loop falls back to)."""
    calls, real = [], GenerationMixin._sample
    monkeypatch.setattr(GenerationMixin, "_sample", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def _notes(report, why):
    return [n for n in report.notes if "transformers' own loop ran" in n and why in n]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("new", [1, 2, 17, 40])
def test_greedy_tokens_equal_transformers(kind, new, transformers_loop):
    model, ids = tiny(kind), prompt()
    expected = generate(model, ids, max_new_tokens=new, pad_token_id=0)
    report = tileflow.patch(model)
    transformers_loop.clear()
    got = generate(model, ids, max_new_tokens=new, pad_token_id=0)
    assert got.dtype == expected.dtype and got.device == expected.device
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
    assert got.shape[1] == ids.shape[1] + new
    assert report.generate_loops == 1 and transformers_loop == []
    assert report.steps == new - 1  # every decode step through the whole-step program, none past the end
    tileflow.unpatch(model)
    assert type(model) in (Qwen2ForCausalLM, LlamaForCausalLM) and "_sample" not in model.__dict__


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", [0, CHECK_EVERY - 1, CHECK_EVERY, 23, "last", "two ids"])
def test_an_eos_token_stops_where_transformers_stops(kind, where, transformers_loop):
    """The EOS token first produced at new token ``where`` (before, at and after the
    loop's first read back): the output stops right after it, as transformers' does."""
    model, ids = tiny(kind), prompt()
    new = 40
    full = generate(model, ids, max_new_tokens=new)[0, ids.shape[1]:].tolist()
    if where == "two ids":
        eos = [full[30], full[12]]
    else:
        eos = full[new - 1 if where == "last" else where]
    kw = dict(max_new_tokens=new, eos_token_id=eos, pad_token_id=7)
    expected = generate(model, ids, **kw)
    first = min(full.index(e) for e in (eos if isinstance(eos, list) else [eos]))
    assert expected.shape[1] == ids.shape[1] + first + 1  # transformers stopped at the EOS token
    report = tileflow.patch(model)
    transformers_loop.clear()
    got = generate(model, ids, **kw)
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
    assert report.generate_loops == 1 and transformers_loop == []
    # it reads back every CHECK_EVERY tokens: at most that many steps past the EOS token
    assert first <= report.steps <= min(new - 1, first + CHECK_EVERY)


@pytest.mark.parametrize("kind", KINDS)
def test_each_step_gets_the_inputs_transformers_passes(kind):
    """A padded prompt (a real attention mask; positions that lag the cache): every forward
    call of the lean loop gets the same arguments as under transformers' loop."""
    ids = prompt()
    ids[0, 3] = 0  # the pad token: generate masks it

    def calls(options):
        model = tiny(kind)
        report = tileflow.patch(model, options=options)
        inner, seen = model.forward, []

        @functools.wraps(inner)
        def spy(*args, **kwargs):
            seen.append({k: v.tolist() if isinstance(v, torch.Tensor) else v if isinstance(v, (bool, int, type(None)))
                         else type(v).__name__ for k, v in kwargs.items()})
            return inner(*args, **kwargs)

        model.forward = spy
        out = generate(model, ids, max_new_tokens=12)
        return out, seen, report

    lean, lean_calls, lean_report = calls({})
    plain, plain_calls, plain_report = calls({"generate_loop": False})
    assert lean_report.generate_loops == 1 and plain_report.generate_loops == 0
    assert torch.equal(lean, plain)
    assert len(lean_calls) == len(plain_calls) == 12
    assert lean_calls == plain_calls


class _Collect(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        self.ended = True


CASES = {  # case -> (generate's keyword arguments, part of the reason noted)
    "sampling": (dict(do_sample=True), "sampling"),
    "user static cache": (dict(), "not a static cache generate made"),
    "return_dict_in_generate": (dict(return_dict_in_generate=True, output_scores=True), "return_dict_in_generate"),
    "repetition_penalty": (dict(repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
    "streamer": (dict(), "a streamer"),
    "dynamic cache": (dict(cache_implementation="dynamic"), "not a static cache generate made"),
}


def _call(case, model, ids):
    kw, _ = CASES[case]
    kw = dict(kw, max_new_tokens=10)
    if case == "user static cache":
        kw[cache_keyword(model)] = StaticCache(config=model.config, max_cache_len=32)
    if case == "streamer":
        kw["streamer"] = _Collect()
    if case == "sampling":
        torch.manual_seed(0)
    out = generate(model, ids, **kw)
    if case == "streamer":
        assert kw["streamer"].ended and kw["streamer"].tokens == out[0].tolist()  # the prompt, then each token
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_calls_it_does_not_reproduce_run_transformers_loop(case, transformers_loop):
    ids = prompt()
    # what transformers' loop gives on the patched model (the lean loop switched off): for
    # sampling the same draws need the same logits bit for bit
    reference = tiny("qwen2")
    tileflow.patch(reference, options={"generate_loop": False})
    expected = _call(case, reference, ids)
    model = tiny("qwen2")
    report = tileflow.patch(model)
    transformers_loop.clear()
    got = _call(case, model, ids)
    again = _call(case, model, ids)
    if case == "return_dict_in_generate":
        assert torch.equal(got.sequences, expected.sequences) and len(got.scores) == len(expected.scores) == 10
        assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))
        got, again = got.sequences, again.sequences
    else:
        assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert torch.equal(again, got)
    assert report.generate_loops == 0 and len(transformers_loop) == 2
    assert len(_notes(report, CASES[case][1])) == 1, report.notes  # noted once, not per call
    if case != "sampling":  # and it is transformers' result on the unpatched model
        unpatched = _call(case, tiny("qwen2"), ids)
        assert torch.equal(unpatched.sequences if case == "return_dict_in_generate" else unpatched, got)


def test_switched_off_per_call(transformers_loop):
    model, ids = tiny("qwen2"), prompt()
    expected = generate(model, ids, max_new_tokens=10)
    report = tileflow.patch(model, options={"generate_loop": False})
    assert type(model) is Qwen2ForCausalLM and "_sample" not in model.__dict__
    transformers_loop.clear()
    assert torch.equal(generate(model, ids, max_new_tokens=10), expected)
    assert report.generate_loops == 0 and transformers_loop == [1] and report.steps == 9


def test_switched_off_by_the_environment(transformers_loop, tileflow_options):
    tileflow_options(generate_loop=False)
    model, ids = tiny("llama"), prompt()
    report = tileflow.patch(model)
    transformers_loop.clear()
    generate(model, ids, max_new_tokens=5)
    assert report.generate_loops == 0 and transformers_loop == [1]


def test_unpatch_gives_the_class_back_and_patch_again_works(transformers_loop):
    model, ids = tiny("qwen2"), prompt()
    expected = generate(model, ids, max_new_tokens=8)
    report = tileflow.patch(model)
    assert type(model).__name__ == "Qwen2ForCausalLM" and type(model) is not Qwen2ForCausalLM
    assert isinstance(model, Qwen2ForCausalLM) and "_sample" in model.__dict__
    tileflow.unpatch(model)
    assert type(model) is Qwen2ForCausalLM and "_sample" not in model.__dict__
    transformers_loop.clear()
    assert torch.equal(generate(model, ids, max_new_tokens=8), expected) and transformers_loop == [1]
    again = tileflow.patch(model)
    transformers_loop.clear()
    assert torch.equal(generate(model, ids, max_new_tokens=8), expected)
    assert again.generate_loops == 1 and report.generate_loops == 0 and transformers_loop == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the graphed step)")
@pytest.mark.parametrize("eos", [False, True])
def test_on_the_gpu_the_graphed_steps_give_transformers_tokens(eos, transformers_loop):
    model, ids = tiny("qwen2"), prompt()  # fp32: tokens comparable with eager's
    model, ids = model.cuda(), ids.cuda()
    kw = dict(max_new_tokens=40)
    if eos:
        full = generate(model, ids, disable_compile=True, **kw)[0, ids.shape[1]:].tolist()
        kw["eos_token_id"] = full[CHECK_EVERY + 3]
    expected = generate(model, ids, cache_implementation="static", disable_compile=True, **kw)  # eager, unpatched
    report = tileflow.patch(model)
    transformers_loop.clear()
    for _ in range(2):  # the second call replays the graph captured on the first call's cache
        got = generate(model, ids, **kw)
        assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    assert report.generate_loops == 2 and transformers_loop == []
    assert report.steps >= 2 * (got.shape[1] - ids.shape[1] - 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eos_rows", ["none", "one row early", "every row"])
def test_a_padded_batch_runs_the_lean_loop(kind, eos_rows, transformers_loop):
    """Left-padded prompts: the same tokens as transformers' loop on the unpatched model,
    rows that ended padded with the pad token from the step after their EOS token on, and
    the result ending where transformers' ends (after the step where every row had ended)."""
    from tests.integrations.test_patch_batch import batch

    model = tiny(kind)
    ids, mask = batch((9, 5, 7))
    new = 40
    kw = dict(attention_mask=mask, max_new_tokens=new, pad_token_id=0)
    full = generate(model, ids, **kw)[:, ids.shape[1]:].tolist()
    if eos_rows == "one row early":
        kw["eos_token_id"] = full[1][3]
    elif eos_rows == "every row":  # each row's own token at a different step: all end, at the last of them
        kw["eos_token_id"] = [full[0][20], full[1][2], full[2][CHECK_EVERY + 1]]
    expected = generate(model, ids, **kw)
    report = tileflow.patch(model)
    transformers_loop.clear()
    got = generate(model, ids, **kw)
    tileflow.unpatch(model)
    assert torch.equal(got, expected), (got[:, ids.shape[1]:].tolist(), expected[:, ids.shape[1]:].tolist())
    assert report.generate_loops == 1 and transformers_loop == []
    if eos_rows != "none":
        assert (expected[:, ids.shape[1]:] == 0).any()  # a row ended early: padded, as transformers pads
