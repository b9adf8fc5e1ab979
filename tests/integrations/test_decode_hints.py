"""The decode step's launch hints, which change when memory is read, never what is
computed. L2 look-ahead (``TILEFLOW_AHEAD=1``): each layer's down projection is handed
the next layer's attention weights and norms (the last layer's, the final norm) to
prefetch; off by default. MLP look-ahead (``TILEFLOW_MLP_AHEAD``): qkv, attention and o
are handed consecutive row blocks of their layer's gate and up weights. Early inputs (``TILEFLOW_EARLY_INPUTS``, on by default): the
step vouches that the positions, lengths and residual of qkv, attention and o come from
before the kernel just ahead, so those kernels load them before the dependent-launch wait. On CPU the
generated Triton text runs under the interpreter (the hints are GPU-only branches):
the tokens must equal eager's either way."""

import pytest
import torch

import tileflow
from tileflow.integrations.transformers.decode_step import (layer_weights, mlp_ahead, next_layer_ahead,
                                                             parse_mlp_ahead)
from tileflow.runtime import ops

from .test_transformers_patch import greedy, prompt, tiny


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TILEFLOW_CPU_TARGET", "triton")
    ops._LAUNCHERS.clear()
    yield
    ops._LAUNCHERS.clear()


def _spy(monkeypatch) -> list:
    handed = []
    real = ops.down_proj_residual
    monkeypatch.setattr(ops, "down_proj_residual",
                        lambda x, w, r, ahead=(), keep=False, early=False, ready=None: handed.append((w, tuple(ahead)))
                        or real(x, w, r, ahead=ahead, keep=keep, early=early, ready=ready))
    return handed


def _patched_equals_eager(model) -> None:
    """Greedy tokens of the patched model equal eager's (the spies see only the patch)."""
    ids = prompt()
    expected = greedy(model, ids)
    tileflow.patch(model)
    got = greedy(model, ids)
    tileflow.unpatch(model)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_down_projections_prefetch_the_next_layer_and_tokens_stay(kind, interpreted, monkeypatch):
    monkeypatch.setenv("TILEFLOW_AHEAD", "1")
    model, handed = tiny(kind), _spy(monkeypatch)
    _patched_equals_eager(model)
    layers = model.model.layers
    assert handed, "no decode step ran"
    for w, ahead in handed:
        i = next(j for j, layer in enumerate(layers) if layer.mlp.down_proj.weight is w)
        want = next_layer_ahead(layer_weights(layers[i + 1])) if i + 1 < len(layers) else (model.model.norm.weight,)
        assert len(ahead) == len(want) and all(a is b for a, b in zip(ahead, want))
    biases = 3 if kind == "qwen2" else 0
    assert len(handed[0][1]) == 6 + biases  # ln1, wq, wk, wv, (bq, bk, bv,) wo, ln2


def test_ahead_off_by_default_hands_nothing(interpreted, monkeypatch):
    monkeypatch.delenv("TILEFLOW_AHEAD", raising=False)
    handed = _spy(monkeypatch)
    _patched_equals_eager(tiny("qwen2"))
    assert handed and all(ahead == () for _, ahead in handed)


def test_the_launch_with_ahead_inputs_computes_the_same(interpreted):
    g = torch.Generator().manual_seed(3)
    x, w, r = (torch.randn(s, generator=g) for s in ((1, 320), (48, 320), (1, 48)))
    extra = [torch.randn(1000, generator=g), torch.randn(7, 11, generator=g)]
    plain = ops.down_proj_residual(x, w, r)
    torch.testing.assert_close(plain, x @ w.T + r, rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.down_proj_residual(x, w, r, ahead=extra), plain)
    # a non-contiguous tensor is not a flat range of memory: left out, not an error
    assert torch.equal(ops.down_proj_residual(x, w, r, ahead=[extra[1].T]), plain)


def test_the_step_vouches_for_early_inputs_unless_told_not_to(interpreted, monkeypatch):
    calls = []
    for name in ("qkv_rope_cache", "attention_decode", "o_proj_residual"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: calls.append((_n, k.get("early")))
                            or _r(*a, **k))
    model = tiny("llama")
    for env, want in (("1", True), ("0", False)):
        monkeypatch.setenv("TILEFLOW_EARLY_INPUTS", env)
        calls.clear()
        _patched_equals_eager(model)
        assert {n for n, _ in calls} == {"qkv_rope_cache", "attention_decode", "o_proj_residual"}
        assert all(e is want for _, e in calls), (env, calls[:4])


def test_mlp_ahead_spec_and_row_blocks():
    assert parse_mlp_ahead("") == ({}, False)
    assert parse_mlp_ahead("attention=8, o=2.5,keep") == ({"attention": 8.0, "o": 2.5}, True)
    with pytest.raises(ValueError, match="down"):
        parse_mlp_ahead("down=4")
    wg, wu = torch.empty(100, 64, dtype=torch.bfloat16), torch.empty(100, 64, dtype=torch.bfloat16)
    row = 2 * 64 * 2  # bytes of one gate row and one up row
    got = mlp_ahead({"qkv": 10 * row / 2**20, "o": 200 * row / 2**20}, wg, wu)
    assert set(got) == {"qkv", "o"}
    (g0, u0), (g1, u1) = got["qkv"], got["o"]
    assert g0.data_ptr() == wg.data_ptr() and g0.shape[0] == u0.shape[0] == 10
    # the next share starts where the last ended and stops at the last row
    assert g1.data_ptr() == wg[10].data_ptr() and u1.data_ptr() == wu[10].data_ptr() and g1.shape[0] == 90
    assert mlp_ahead({"attention": 0.5 * row / 2**20}, wg, wu) == {}


def test_attention_side_kernels_prefetch_gate_up_rows_and_tokens_stay(interpreted, monkeypatch):
    monkeypatch.setenv("TILEFLOW_MLP_AHEAD", "qkv=0.001,attention=0.002,o=0.001,keep")
    handed = []
    for name in ("qkv_rope_cache", "attention_decode", "o_proj_residual"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: handed.append((_n, k.get("ahead"), k.get("keep")))
                            or _r(*a, **k))
    model = tiny("qwen2")
    _patched_equals_eager(model)
    assert {n for n, _, _ in handed} == {"qkv_rope_cache", "attention_decode", "o_proj_residual"}
    gate_rows = {layer.mlp.gate_proj.weight.data_ptr(): layer.mlp.gate_proj.weight for layer in model.model.layers}
    for name, ahead, keep in handed:
        assert keep is True and len(ahead) == 2, name
        gate, up = ahead
        base = next(w for p, w in gate_rows.items() if p <= gate.data_ptr() < p + w.numel() * w.element_size())
        assert gate.shape[1] == base.shape[1] and up.shape == gate.shape


def test_launches_with_ahead_inputs_compute_the_same(interpreted):
    g = torch.Generator().manual_seed(5)
    extra = [torch.randn(900, generator=g), torch.randn(33, generator=g)]
    x, w, r = (torch.randn(s, generator=g) for s in ((1, 96), (40, 96), (1, 40)))
    assert torch.equal(ops.o_proj_residual(x, w, r, ahead=extra, keep=True), ops.o_proj_residual(x, w, r))
    q = torch.randn(1, 6, 32, generator=g)
    kc, vc = torch.randn(1, 2, 64, 32, generator=g), torch.randn(1, 2, 64, 32, generator=g)
    lengths = torch.tensor([41])
    plain = ops.attention_decode(q, kc, vc, lengths, 0.17)
    assert torch.equal(ops.attention_decode(q, kc, vc, lengths, 0.17, ahead=extra), plain)


@pytest.mark.parametrize("target", ["triton", "reference"])
def test_ready_counters_between_gate_up_and_down_keep_the_tokens(target, monkeypatch):
    """TILEFLOW_READY=1: each layer's down projection waits on the chunk counters its
    gate-up bumps (suite.ready). The tokens stay eager's, every down launch gets its
    layer's row of one table, and after a step the counters hold what the launches
    left: row i > 0 complete (counted after layer i - 1 cleared it), row 0 cleared by the
    last layer for the next step."""
    monkeypatch.setenv("TILEFLOW_CPU_TARGET", target)
    monkeypatch.setenv("TILEFLOW_READY", "1")
    ops._LAUNCHERS.clear()
    links, real = [], ops.down_proj_residual
    monkeypatch.setattr(ops, "down_proj_residual", lambda *a, ready=None, **k: links.append(ready) or real(
        *a, ready=ready, **k))
    model = tiny("qwen2")
    _patched_equals_eager(model)
    ops._LAUNCHERS.clear()
    layers = len(model.model.layers)
    assert links and all(link is not None for link in links)
    table = links[0].counters.untyped_storage()
    assert all(link.counters.untyped_storage().data_ptr() == table.data_ptr() for link in links)
    counts = torch.stack([link.counters for link in links[:layers]])
    inter = model.config.intermediate_size
    chunk = links[0].chunk
    want = torch.tensor([min(chunk, inter - c * chunk) for c in range(counts.shape[1])], dtype=torch.int32)
    assert torch.equal(counts[0], torch.zeros_like(want))
    for row in counts[1:]:
        assert torch.equal(row, want)


@pytest.mark.parametrize("target", ["triton", "reference"])
def test_fused_mlp_keeps_the_tokens_and_leaves_its_sums_at_zero(target, monkeypatch):
    """TILEFLOW_MLP_FUSED=1: each layer's MLP block is one rms_norm_mlp_residual launch
    (no gate-up or down launch), the down weights are re-laid-out column-major in place
    (same values), the greedy tokens stay eager's and the shared accumulator and count are
    back at zero after every launch."""
    monkeypatch.setenv("TILEFLOW_CPU_TARGET", target)
    monkeypatch.setenv("TILEFLOW_MLP_FUSED", "1")
    ops._LAUNCHERS.clear()
    calls, real = [], ops.rms_norm_mlp_residual
    monkeypatch.setattr(ops, "rms_norm_mlp_residual", lambda *a: calls.append(a) or real(*a))
    unfused = []
    monkeypatch.setattr(ops, "down_proj_residual", lambda *a, **k: unfused.append(a))
    model = tiny("qwen2")
    before = [layer.mlp.down_proj.weight.detach().clone() for layer in model.model.layers]
    _patched_equals_eager(model)
    ops._LAUNCHERS.clear()
    assert calls and not unfused
    for layer, old in zip(model.model.layers, before):
        w = layer.mlp.down_proj.weight
        assert w.t().is_contiguous() and torch.equal(w, old)
    for acc, done in ops._MLP_SUMS.values():
        assert int(done.abs().sum()) == 0 and float(acc.abs().sum()) == 0.0
