"""``generate`` on a patched model with a batch of prompts, as users call it: left-padded
with an attention mask, greedy and sampled, static and default caches. Tokens equal
to the unpatched model's, and every decode step counted as the whole-step program's
(B rows a step, each weight read once for all of them); what the program does not take
(a dynamic cache's batch) runs the model's code with the reason reported."""

import pytest
import torch

import tileflow
from tests.integrations.test_transformers_patch import cpu_target, tiny  # noqa: F401  (fixture)

NEW = 10


def batch(lengths=(9, 5, 7), pad=0, seed=3):
    """Left-padded prompts of ``lengths`` and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, 128, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("how", ["static", "default", "sampled"])
def test_a_padded_batch_runs_the_whole_step_program(kind, how, cpu_target):
    model = tiny(kind)
    ids, mask = batch()
    kw = {"static": dict(do_sample=False, cache_implementation="static"), "default": dict(do_sample=False),
          "sampled": dict(do_sample=True, top_k=20, cache_implementation="static")}[how]
    torch.manual_seed(7)
    expected = generate(model, ids, mask, **kw)
    report = tileflow.patch(model)
    torch.manual_seed(7)
    got = generate(model, ids, mask, **kw)
    tileflow.unpatch(model)
    assert torch.equal(got, expected), (got[:, ids.shape[1]:].tolist(), expected[:, ids.shape[1]:].tolist())
    assert report.steps == NEW - 1, str(report)  # one program run per step for all three rows
    assert not [f for f in report.fallbacks if f[0] == "decode_step"], report.fallbacks
    assert len({tuple(r) for r in expected[:, ids.shape[1]:].tolist()}) == 3  # the rows differ


def test_each_row_matches_its_own_unpadded_generate(tileflow_options):
    """The padding is really hidden: row i of the batch equals generating prompt i alone
    (fp32, reference target: summation orders agree closely enough for greedy tokens)."""
    tileflow_options(cpu_target="reference")
    model = tiny("qwen2")
    ids, mask = batch()
    tileflow.patch(model)
    got = generate(model, ids, mask, do_sample=False, cache_implementation="static")
    for i in range(ids.shape[0]):
        alone = ids[i:i + 1, mask[i].bool()]
        one = generate(model, alone, torch.ones_like(alone), do_sample=False, cache_implementation="static")
        assert torch.equal(got[i, ids.shape[1]:], one[0, alone.shape[1]:]), i
    tileflow.unpatch(model)


def test_a_batch_on_a_dynamic_cache_runs_the_model_and_says_why():
    model = tiny("llama")
    ids, mask = batch()
    expected = generate(model, ids, mask, do_sample=False, cache_implementation="dynamic")
    report = tileflow.patch(model)
    got = generate(model, ids, mask, do_sample=False, cache_implementation="dynamic")
    tileflow.unpatch(model)
    assert torch.equal(got, expected)
    assert report.steps == 0
    assert any("batch 3" in why for _, _, why in report.fallbacks), report.fallbacks


@pytest.mark.parametrize("lengths", [(9, 4), (6, 9, 2, 8)])
def test_batches_of_two_and_four(lengths, tileflow_options):
    tileflow_options(cpu_target="reference")
    model = tiny("llama")
    ids, mask = batch(lengths)
    expected = generate(model, ids, mask, do_sample=False)
    report = tileflow.patch(model)
    got = generate(model, ids, mask, do_sample=False)
    tileflow.unpatch(model)
    assert torch.equal(got, expected) and report.steps == NEW - 1, str(report)
