"""tileflow.onnx on CPU: exported + rewritten decode graphs give torch eager's greedy
tokens (fp32, tiny Qwen2 and Llama), every layer's fusions are reported, and a
rewrite whose exactness condition fails leaves the original with a reason."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import tileflow  # noqa: E402

LAYERS, STEPS, PROMPT = 2, 16, [3, 17, 42, 5, 99]


def _tiny(kind):
    cls = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a wrong fusion shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def exported(request, tmp_path_factory):
    kind = request.param
    model = _tiny(kind)
    d = tmp_path_factory.mktemp(kind)
    step, prefill = str(d / "step.onnx"), str(d / "prefill.onnx")
    tileflow.onnx.export(model, step, prefill_path=prefill)
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False,
                             min_new_tokens=STEPS)[0, len(PROMPT):].tolist()
    return kind, d, step, prefill, ref


def test_unfused_export_matches_eager(exported):
    _, _, step, prefill, ref = exported
    assert tileflow.onnx.Generator(step).generate(PROMPT, STEPS) == ref
    assert tileflow.onnx.Generator(step, prefill).generate(PROMPT, STEPS) == ref


@pytest.mark.parametrize("target", ["ort", "opset23"])
def test_optimized_greedy_tokens_equal_eager(exported, target):
    kind, d, step, prefill, ref = exported
    out, out_pre = str(d / f"step.{target}.onnx"), str(d / f"prefill.{target}.onnx")
    report = tileflow.onnx.optimize(step, out, target=target)
    tileflow.onnx.optimize(prefill, out_pre, target=target)
    assert len(ref) == STEPS
    assert tileflow.onnx.Generator(out).generate(PROMPT, STEPS) == ref
    assert tileflow.onnx.Generator(out, out_pre).generate(PROMPT, STEPS) == ref

    # Every layer: attention, both RoPEs, the MLP; the norms as the target fuses them.
    per_layer = report.by_layer()
    for i in range(LAYERS):
        layer = per_layer[i]
        assert layer["gqa_attention"] == 1 and layer["rope"] == 2 and layer["gate_up_silu"] == 1, layer
        if target == "ort":
            assert layer.get("rms_norm", 0) + layer.get("residual_rms_norm", 0) == 2
        else:
            assert layer["rms_norm"] == 2 and layer["matvec_residual"] == 2
    assert report.fallbacks == []
    assert f"layer {LAYERS - 1}" in str(report)

    # The rewritten graph holds the target's ops and none of the decomposed attention.
    import onnx

    ops = {(n.domain or "", n.op_type) for n in onnx.load(out, load_external_data=False).graph.node}
    if target == "ort":
        assert {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "RotaryEmbedding"),
                ("com.microsoft", "SkipSimplifiedLayerNormalization"), ("", "SimplifiedLayerNormalization")} <= ops
    else:
        assert {("", "Attention"), ("", "RotaryEmbedding"), ("", "RMSNormalization")} <= ops
    assert ("", "Softmax") not in ops


def test_optimized_logits_close_to_unfused(exported):
    _, d, step, _, _ = exported
    out = str(d / "step.check.onnx")
    tileflow.onnx.optimize(step, out, target="ort")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[7]], dtype=np.int64)}
    a, b = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in (step, out))
    for i in a.get_inputs()[1:]:
        feeds[i.name] = rng.standard_normal((1, 2, 9, 16)).astype(np.float32)
    ra, rb = a.run(None, feeds), b.run(None, feeds)
    for x, y in zip(ra, rb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_prefill_keeps_masked_attention_with_reason(exported):
    _, _, _, prefill, _ = exported
    report = tileflow.onnx.explain(prefill, "ort")
    kept = {(p, w) for p, w, _ in report.fallbacks}
    for i in range(LAYERS):
        assert ("gqa_attention", f"layers.{i}.self_attn") in kept
        assert ("gate_up_silu", f"layers.{i}.mlp") in kept
    assert report.matches["rope"] == 2 * LAYERS


def test_wrong_constant_is_not_rewritten(exported, tmp_path):
    """An eps that is not a scalar constant, a RoPE slice at the wrong place: the
    original stays and the report says why."""
    import onnx_ir as ir

    _, _, step, _, _ = exported
    model = ir.load(step)
    # Break one RoPE: rotate at a quarter of head_dim instead of the half.
    for node in model.graph:
        if node.op_type == "Slice" and node.inputs[0].shape is not None and len(node.inputs[0].shape) == 4:
            start = node.inputs[1]
            if start.const_value is not None and start.const_value.numpy().tolist() == [0]:
                node.replace_input_with(2, model.graph.initializers.get("tileflow_test_quarter") or
                                        _add_init(model, "tileflow_test_quarter", np.array([4], np.int64)))
                break
    bad = str(tmp_path / "bad.onnx")
    ir.save(model, bad, external_data="bad.onnx.data")
    report = tileflow.onnx.explain(bad, "ort")
    reasons = [r for p, _, r in report.fallbacks if p == "rope"]
    assert reasons and "first slice" in reasons[0]
    assert report.matches["rope"] < 2 * LAYERS


def _add_init(model, name, array):
    import onnx_ir as ir

    value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.INT64))
    model.graph.register_initializer(value)
    return value
