"""torch.compile(model.forward, backend="tileflow") with the model on the CPU XLA
client: tiny Qwen2 and Llama decode on a static cache, greedy tokens identical to eager
CPU torch in fp32, with explain listing the matched patterns and the path they took:
the suite references as XLA ops (this client's default) and the generated Pallas
kernels under the interpreter inside the XLA graph (TILEFLOW_XLA_TARGET)."""

import pytest
import torch
import torch_xla
from transformers import StaticCache

import tileflow
from tests.integrations.test_transformers_patch import prompt, tiny
from tileflow.integrations.torch import backend
from tileflow.integrations.shared.hf import cache_keyword

STEPS = 16


def _decode(step, model, ids, steps=STEPS):
    dev = ids.device
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    kw = cache_keyword(model)  # cache= on transformers 5.24+, past_key_values= before
    with torch.no_grad():
        tok = model(ids, **{kw: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for i in range(steps):
            pos = torch.tensor([[ids.shape[1] + i]], device=dev)
            logits = step(input_ids=tok, position_ids=pos, **{kw: cache}, use_cache=True).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
    return torch.cat(toks, 1).cpu()


@pytest.mark.parametrize("path", ["reference", "pallas-interpret"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_tokens_identical_to_eager_cpu(kind, path, tileflow_options):
    if path != "reference":  # reference is what the CPU client picks by itself
        tileflow_options(xla_target=path)
    torch._dynamo.reset()
    model, ids = tiny(kind), prompt()
    expected = _decode(model.forward, model, ids)
    assert len(set(expected[0].tolist())) > 5  # not one repeated token
    dev = torch_xla.device()
    model, ids = model.to(dev), ids.to(dev)

    cache = StaticCache(config=model.config, max_cache_len=64)
    kw = cache_keyword(model)
    with torch.no_grad():
        model(ids, **{kw: cache}, use_cache=True)
    report = tileflow.explain(model.forward, input_ids=ids[:, :1], position_ids=torch.tensor([[9]], device=dev),
                              **{kw: cache}, use_cache=True)
    layers = model.config.num_hidden_layers
    expected_matches = {"gate_up_silu": layers, "matvec_residual": 2 * layers, "matvec": 3 * layers + 1}
    assert dict(report.matches) == expected_matches
    assert dict(report.paths) == {(p, path): n for p, n in expected_matches.items()}
    text = str(report)
    assert "paths (torch-xla, CPU client)" in text and f"x{3 * layers + 1} {path}:" in text

    backend.LAST_REPORTS.clear()
    compiled = torch.compile(model.forward, backend="tileflow")
    got = _decode(compiled, model, ids)
    torch._dynamo.reset()
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    # the decode step's graph went through the XLA backend, on this path
    steps = [r for r in backend.LAST_REPORTS if r.matches]
    assert steps and all(set(path_ for _, path_ in r.paths) == {path} for r in steps)
    assert all(r.client == "CPU" for r in steps)
