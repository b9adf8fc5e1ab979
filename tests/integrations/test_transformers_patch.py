"""tileflow.patch on tiny Qwen2 and Llama models built from configs (random weights):
greedy tokens identical to eager in fp32 on CPU, through the reference path and
through the generated Triton kernels under the interpreter; bf16 logits within a
bound; unsupported models left unchanged with the reason; unpatch restores."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import tileflow
from tileflow.integrations.shared.hf import cache_field, cache_keyword

NEW_TOKENS = 20
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def tiny(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=256, initializer_range=0.3, pad_token_id=0)
    if kind == "qwen2":  # q/k/v biases, GQA 2
        model = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                             **common))
    else:  # llama3 rope scaling, GQA 4, no biases
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                             rope_scaling=LLAMA3, **common))
    return model.to(dtype).eval()


def prompt(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (1, n), generator=g)  # no pad token (0): no padding


def greedy(model, ids, cache="static"):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation=cache)


@pytest.fixture(params=["reference", "triton"])
def cpu_target(request, tileflow_options):
    tileflow_options(cpu_target=request.param)
    from tileflow.runtime import ops

    ops._LAUNCHERS.clear()
    yield request.param
    ops._LAUNCHERS.clear()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_greedy_tokens_identical_to_eager_fp32(kind, cache, cpu_target):
    model, ids = tiny(kind), prompt()
    expected = greedy(model, ids, cache)
    report = tileflow.patch(model)
    assert report.patched and report.matches["gqa_attention"] == 2
    got = greedy(model, ids, cache)
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 5  # the model does not just repeat a token
    if cache == "static":  # whole steps as one program
        assert not report.fallbacks, report.fallbacks
    else:  # a growing cache: layer by layer, and the report says so
        assert [r for _, _, r in report.fallbacks] == [
            "ran layer by layer: cache layer DynamicLayer (the program writes StaticLayer tensors)"]
    assert tileflow.unpatch(model)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_the_decode_kernels_actually_run(monkeypatch, cache):
    from tileflow.integrations.transformers.decode_step import DecodeProgram
    from tileflow.runtime import ops

    calls, steps = [], []
    real, real_run = ops.gqa_attention, DecodeProgram.run
    monkeypatch.setattr(ops, "gqa_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(DecodeProgram, "run", lambda self, *a, **k: steps.append(1) or real_run(self, *a, **k))
    model = tiny("qwen2")
    tileflow.patch(model)
    greedy(model, prompt(), cache)
    assert len(calls) == 2 * (NEW_TOKENS - 1)  # every decode step of both layers; prefill is not decode
    assert len(steps) == (NEW_TOKENS - 1 if cache == "static" else 0)


def _teacher_forced_logits(model, seq, n_prompt, steps):
    """Logits of ``steps`` decode steps fed the tokens of ``seq`` (same inputs for all)."""
    with torch.no_grad():
        cache = getattr(model(seq[:, :n_prompt], use_cache=True), cache_field())
        kw = {cache_keyword(model): cache}
        out = []
        for i in range(steps):
            tok = seq[:, n_prompt + i:n_prompt + i + 1]
            out.append(model(tok, **kw, use_cache=True).logits[:, -1].double())
    return out


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_bf16_logits_no_further_from_fp32_than_eager(kind):
    """bf16 rounds differently in the kernels (once per fused op) than in eager (once
    per op): judged against the fp32 model, tileflow must be as close as eager is."""
    truth_model, ids = tiny(kind), prompt()
    seq = greedy(truth_model, ids)
    truth = _teacher_forced_logits(truth_model, seq, ids.shape[1], 4)
    model = tiny(kind, torch.bfloat16)
    eager = _teacher_forced_logits(model, seq, ids.shape[1], 4)
    tileflow.patch(model)
    ours = _teacher_forced_logits(model, seq, ids.shape[1], 4)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    err_eager = max(rel(e, t) for e, t in zip(eager, truth))
    err_ours = max(rel(o, t) for o, t in zip(ours, truth))
    assert err_ours < 5e-2 and err_ours <= 1.5 * err_eager + 1e-3, (err_ours, err_eager)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_padded_prompt_runs_whole_steps_and_stays_exact(kind, cpu_target, monkeypatch):
    """A pad token inside the prompt: generate masks it and the positions lag the cache
    length. The program rotates at the position, writes at the cache's count and hides
    the masked key, so it still runs every step, with eager's tokens."""
    from tileflow.integrations.transformers.decode_step import DecodeProgram

    model = tiny(kind)
    ids = prompt()
    ids[0, 3] = 0
    expected = greedy(model, ids)
    steps, real_run = [], DecodeProgram.run
    monkeypatch.setattr(DecodeProgram, "run", lambda self, *a: steps.append(a[3] is not None) or real_run(self, *a))
    report = tileflow.patch(model)
    got = greedy(model, ids)
    assert torch.equal(got, expected), (got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
    assert steps == [True] * (NEW_TOKENS - 1)  # every step, each with the key mask
    # only the prompt pass declined, with the reason (the padded prompt's mask, or the
    # positions generate derives from it)
    assert [(p, "mask" in why or "position_ids" in why) for p, _, why in report.fallbacks] == [("prefill", True)], \
        report.fallbacks


def test_unrelated_model_is_left_unchanged():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, 5))
    expected = greedy(model, ids, "dynamic")
    report = tileflow.patch(model)
    assert not report.patched and "model_type 'gpt2'" in report.fallbacks[0][2]
    assert torch.equal(greedy(model, ids, "dynamic"), expected)


def test_unpatch_restores_the_class_forward():
    model = tiny("qwen2")
    tileflow.patch(model)
    assert "forward" in model.model.layers[0].__dict__
    assert tileflow.unpatch(model)
    assert "forward" not in model.model.layers[0].__dict__ and not tileflow.unpatch(model)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_a_failing_kernel_falls_back_instead_of_crashing(monkeypatch, cache):
    from tileflow.runtime import ops

    model, ids = tiny("qwen2"), prompt()
    expected = greedy(model, ids, cache)

    def broken(*a, **k):
        raise RuntimeError("no kernel for this device")

    # every suite kernel fails to build, as on a device the generated code does not support
    monkeypatch.setattr(ops, "_LAUNCHERS", {})
    monkeypatch.setattr(ops, "_launcher", broken)
    report = tileflow.patch(model)
    assert torch.equal(greedy(model, ids, cache), expected)
    assert any("disabled after an error: RuntimeError: no kernel" in r for _, _, r in report.fallbacks)


def test_a_cache_position_off_the_cache_count_is_not_taken():
    """Before transformers 5.24 the causal mask is bounded by cache_position; the program
    bounds it by the cache's count, so a step whose cache_position disagrees is refused
    (the original runs, with this reason) and one that agrees is taken, rotating there."""
    from transformers import StaticCache

    from tileflow.integrations.transformers.decode_step import decode_request

    model, ids = tiny("qwen2"), prompt()
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(ids, **{cache_keyword(model): cache}, use_cache=True)
    n, tok = ids.shape[1], ids[:, -1:]
    for at, want in ((n - 2, "cache_position differs from the cache length"), (n, "")):
        _, pos, _, _, why = decode_request((), dict(input_ids=tok, past_key_values=cache,
                                                    cache_position=torch.tensor([at])), any_position=True)
        assert why == want
    assert int(pos) == n
