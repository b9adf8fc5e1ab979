"""``tileflow.patch(model, options={"weights": "int4" | "fp8"})`` on tiny Qwen2 / Llama models:
the report gives each quantized projection's measured error; greedy tokens equal (fp32) those
of the same model computed eagerly by transformers with the quantized weights (int4: the
weights replaced by ``dequantize(quantize(w))``; fp8: each projection computing what
transformers' ``FP8Linear`` computes on CUDA, ``quantize.fp8_linear_torch``, since it has no
CPU path); every decode step counted as the quantized program's, its matvecs the
low-precision ones; ``unpatch`` gives back the model exactly. An fp8 checkpoint's
``FP8Linear`` modules (built here: transformers loads no FP8Linear on CPU, see
``test_an_fp8_checkpoint_on_cpu``) run through ``matvec_fp8`` on their own tensors."""

import copy
import warnings
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

import tileflow
from tileflow.integrations.shared.hf import cache_keyword
from tileflow.integrations.transformers.quantized import PROJECTIONS, HostWeight, QuantizedDecodeProgram
from tileflow.runtime import ops
from tileflow.suite import quantize as Q

NEW_TOKENS = 16
CPU = {"cpu": True}
KERNEL = {"int4": "matvec_int4", "fp8": "matvec_fp8"}
# the measured max relative error of a projection on a random row: int4 (15 steps a group) ~0.1,
# fp8 (3 mantissa bits, weights and activations) ~0.04; a broken quantizer or kernel lands far off
BOUND = {"int4": 0.3, "fp8": 0.12}


def tiny(kind: str, dtype=torch.float32, init: float = 0.3):
    """Two layers at widths the int4 layout takes (K a multiple of 256), no end-of-sequence
    stop (every step runs), random weights (of std ``init``: 0.3 makes varied greedy tokens)."""
    torch.manual_seed(0)
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=256, initializer_range=init, pad_token_id=0)
    if kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common))
    else:  # llama3 rope scaling, no biases
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64}, **common))
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval()


def prompt(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (1, n), generator=g)


def greedy(model, ids, new=NEW_TOKENS):
    """Greedy tokens on a static cache; eager (on CUDA generate would otherwise compile an
    unpatched model's forward with a static cache: the references must be eager transformers)."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, cache_implementation="static",
                              disable_compile=True)


def projections(model):
    for i, layer in enumerate(model.model.layers):
        for part, name in PROJECTIONS:
            yield f"model.layers.{i}.{part}.{name}", getattr(getattr(layer, part), name)


def fp8_forward(w, s, bias):
    return lambda x: Q.fp8_linear_torch(x, w, s, bias)


def eager_quantized(model, weights: str):
    """A copy of ``model`` that eager transformers computes with the quantized projections."""
    ref = copy.deepcopy(model)
    dtype = ref.model.embed_tokens.weight.dtype
    with torch.no_grad():
        for _, lin in projections(ref):
            if weights == "int4":
                lin.weight.copy_(Q.dequantize_int4(*Q.quantize_int4(lin.weight, dtype)).to(dtype))
            else:
                lin.forward = fp8_forward(*Q.quantize_fp8(lin.weight), lin.bias)
    return ref


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def device_bytes(model):
    """The bytes of the model's parameters that occupy its device (a HostWeight is on meta)."""
    device = model.model.embed_tokens.weight.device
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device == device)


def check_in_place(model, before: dict, device_before: int):
    """The projections' weights left the device (HostWeight placeholders), state_dict still gives them."""
    projection_bytes = sum(before[f"{n}.weight"].numel() * before[f"{n}.weight"].element_size()
                           for n, _ in projections(model))
    assert all(type(m.weight) is HostWeight for _, m in projections(model))
    assert device_bytes(model) == device_before - projection_bytes, (device_bytes(model), device_before)
    now = model.state_dict()
    assert now.keys() == before.keys() and all(torch.equal(before[k], now[k]) for k in before)


def count_calls(monkeypatch, names, seen=None):
    """Calls of each ops function in ``names``; ``seen`` (a list) gets each call's (name, args)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(ops, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            if seen is not None:
                seen.append((_name, a))
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, counted)
    return calls


# the fused quantized kernels of a step, and the weights (QuantLinear.tensors) each call reads
FUSED_OPS = {"rms_norm_qkv_rope_cache_quant": lambda a: a[4:7], "rms_norm_gate_up_silu_quant": lambda a: a[4:6],
             "matvec_residual_quant": lambda a: a[2:3]}
# what the quantized step must never run: the model-dtype projections and the unfused sequence's kernels
UNFUSED_OPS = ("matvec", "matvec_residual", "qkv_rope_cache", "rms_norm_gate_up_silu", "rms_norm", "residual_add",
               "silu_mul")


def check_report(report, model, weights: str):
    names = [n for n, _ in projections(model)]
    assert report.patched and not report.fallbacks, str(report)
    assert sorted(report.quantized) == sorted(names)  # every projection, each with its error
    for name, err in report.quantized.items():
        assert 1e-4 < err < BOUND[weights], (name, err)
    for i in range(len(model.model.layers)):  # one line a layer in the report, with its worst error
        worst = max(v for k, v in report.quantized.items() if k.startswith(f"model.layers.{i}."))
        assert any(f"model.layers.{i}: max relative error {worst:.2e}" in n for n in report.notes), report.notes
    # every projection in a fused quantized kernel: q/k/v, gate/up, o and down of each layer
    layers = len(model.model.layers)
    assert {k: v for k, v in report.matches.items() if weights in k} == {
        f"rms_norm_qkv_rope_cache_{weights}": layers, f"rms_norm_gate_up_silu_{weights}": layers,
        f"matvec_residual_{weights}": 2 * layers}, report.matches
    assert not {"matvec", "matvec_residual", "rms_norm", "residual_add", "silu_mul", "rope"} & set(report.matches)
    assert "lm_head" in str(report)  # the report says what stayed in the model's dtype


# each format and each architecture once by default; the other pairs under --full (CI time)
@pytest.mark.parametrize("kind, weights", [("qwen2", "int4"), ("llama", "fp8"),
                                           pytest.param("qwen2", "fp8", marks=pytest.mark.full),
                                           pytest.param("llama", "int4", marks=pytest.mark.full)])
def test_greedy_tokens_equal_the_eager_quantized_model_fp32(kind, weights, monkeypatch):
    model, ids = tiny(kind), prompt()
    plain = greedy(model, ids)
    expected = greedy(eager_quantized(model, weights), ids)
    before = state(model)
    steps = []
    real_run = QuantizedDecodeProgram.run
    monkeypatch.setattr(QuantizedDecodeProgram, "run",
                        lambda self, *a, **k: steps.append(self) or real_run(self, *a, **k))
    device_before, params = device_bytes(model), {n: m.weight for n, m in projections(model)}
    report = tileflow.patch(model, options={**CPU, "weights": weights})
    # counted from here (patch measured the errors through the same ops)
    seen = []
    calls = count_calls(monkeypatch, [KERNEL[weights], *FUSED_OPS, *UNFUSED_OPS, "rope_q"], seen)
    check_report(report, model, weights)
    check_in_place(model, before, device_before)
    got = greedy(model, ids)
    assert torch.equal(got, expected), (got[0, 9:].tolist(), expected[0, 9:].tolist())
    assert len(set(expected[0, 9:].tolist())) > 5
    assert not torch.equal(got, plain)  # the quantized weights, not the model's, decided the tokens
    # every decode step the quantized program's; the prompt pass through the projections' own forwards
    decode = NEW_TOKENS - 1
    assert report.steps == len(steps) == decode
    layers = len(model.model.layers)
    # a step: per layer rms_norm_qkv_rope_cache, attention, matvec_residual (o),
    # rms_norm_gate_up_silu, matvec_residual (down); the plain matvec only in the prompt pass
    assert calls[KERNEL[weights]] == 7 * layers
    assert calls["rms_norm_qkv_rope_cache_quant"] == calls["rms_norm_gate_up_silu_quant"] == layers * decode
    assert calls["matvec_residual_quant"] == 2 * layers * decode
    assert not any(calls[name] for name in (*UNFUSED_OPS, "rope_q")), calls
    # each step's fused calls read every projection's quantized weight once, in the format asked
    linears = {id(lin.tensors): where for where, (lin, _) in steps[0].linears.items()}
    assert {lin.kind for lin, _ in steps[0].linears.values()} == {weights}
    read = [(a[0], id(t)) for name, a in seen if name in FUSED_OPS for t in FUSED_OPS[name](a)]
    assert {kind for kind, _ in read} == {weights}
    assert Counter(linears[i] for _, i in read) == dict.fromkeys(linears.values(), decode)
    assert tileflow.unpatch(model)
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.weight is params[n] for n, m in projections(model)) and device_bytes(model) == device_before
    assert not [m for m in model.modules() if "forward" in m.__dict__]
    assert torch.equal(greedy(model, ids), plain)


def test_replacing_a_weight_while_patched_in_place():
    """A new Parameter assigned: the next call patches again on it (unpatch then keeps it); a write
    into a weight now in host memory (copy_, load_state_dict) or a model.to / .half: a one-line
    error, nothing converted (the quantized copy would silently keep computing otherwise)."""
    model, ids = tiny("qwen2"), prompt()
    sd = state(model)
    report = tileflow.patch(model, options={**CPU, "weights": "int4"})
    q = model.model.layers[1].self_attn.q_proj
    with pytest.raises(RuntimeError, match=r"^tileflow: model\.layers\.1\.self_attn\.q_proj\.weight is in host memory"):
        with torch.no_grad():
            q.weight.copy_(sd["model.layers.1.self_attn.q_proj.weight"])
    with warnings.catch_warnings():  # refused before torch's per-weight "copy to meta is a no-op" warnings
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=r"^tileflow: model\.layers\.0\.self_attn\.q_proj\.weight is in host memory.*unpatch"):
            model.load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"^tileflow: model\.to / \.cuda / \.half"):
        model.half()
    assert all(p.dtype == torch.float32 for p in model.parameters()) and report.replaced_by is None
    new = torch.nn.Parameter(torch.randn_like(sd["model.layers.1.self_attn.q_proj.weight"]) * 0.3, requires_grad=False)
    q.weight = new
    ref = tiny("qwen2")
    ref.model.layers[1].self_attn.q_proj.weight = torch.nn.Parameter(new.detach().clone(), requires_grad=False)
    assert torch.equal(greedy(model, ids, 4), greedy(eager_quantized(ref, "int4"), ids, 4))
    assert report.replaced_by is not None and report.replaced_by.patched and type(q.weight) is HostWeight
    assert tileflow.unpatch(model)
    assert q.weight is new
    after = state(model)
    assert all(torch.equal(after[k], sd[k]) for k in sd if k != "model.layers.1.self_attn.q_proj.weight")


def eager_quantized_fp32(model, weights: str):
    """The fp32 truth for a bf16 ``model``: its quantized projections (quantized from its bf16
    weights, scales in bf16 as patch makes them) computed eagerly in fp32."""
    truth = copy.deepcopy(model).float()
    with torch.no_grad():
        for (_, lin), (_, low) in zip(projections(truth), projections(model)):
            if weights == "int4":
                lin.weight.copy_(Q.dequantize_int4(*Q.quantize_int4(low.weight, torch.bfloat16)))
            else:
                lin.forward = fp8_forward(*Q.quantize_fp8(low.weight), lin.bias)
    return truth


def teacher_forced(model, seq, n_prompt: int):
    """The last-row logits (fp32) of the prompt pass and of each later token of ``seq``, one
    step at a time on a static cache."""
    cache = StaticCache(config=model.config, max_cache_len=seq.shape[1] + 1)
    out = []
    with torch.no_grad():
        for lo, hi in [(0, n_prompt)] + [(t, t + 1) for t in range(n_prompt, seq.shape[1])]:
            out.append(model(seq[:, lo:hi], use_cache=True, **{cache_keyword(model): cache}).logits[0, -1].float())
    return torch.stack(out)


@pytest.mark.parametrize("weights", ["int4", "fp8"])
def test_bf16_logits_no_further_from_fp32_than_eager(weights):
    """bf16: judged against the same quantized model in fp32, the patched bf16 model is as close
    as eager transformers' bf16 model with the quantized weights is (int4: and much closer than
    the unquantized bf16 model: the quantized weights are the ones it runs)."""
    # weights of std 1/sqrt(D), as trained ones: at 0.3 bf16 eager itself is 10-20% off its fp32 twin
    model, ids = tiny("qwen2", torch.bfloat16, init=256 ** -0.5), prompt()
    truth_model = eager_quantized_fp32(model, weights)
    seq = greedy(truth_model, ids, 6)
    truth = teacher_forced(truth_model, seq, ids.shape[1])
    eager = teacher_forced(eager_quantized(model, weights), seq, ids.shape[1])
    plain = teacher_forced(model, seq, ids.shape[1])
    report = tileflow.patch(model, options={**CPU, "weights": weights})
    assert report.patched and len(report.quantized) == 14, str(report)
    ours = teacher_forced(model, seq, ids.shape[1])
    assert report.steps == seq.shape[1] - ids.shape[1]
    rel = lambda a, b: max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))  # noqa: E731
    err_ours, err_eager, err_plain = rel(ours, truth), rel(eager, truth), rel(plain, truth)
    # fp8 rounds the activations too (a 6% step): bf16's last-bit differences become whole steps
    assert err_ours < {"int4": 0.05, "fp8": 0.2}[weights] and err_ours <= 1.5 * err_eager + 1e-3, (err_ours, err_eager)
    if weights == "int4":  # fp8's own error (~15% here) is no larger than that bf16 noise: the fp32 test tells them apart
        assert 3 * err_ours < err_plain, (err_ours, err_plain)


def test_the_interpreted_triton_kernels_decode_int4(tileflow_options):
    """The generated matvec_int4, its fused forms and the step's other kernels under Triton's interpreter."""
    tileflow_options(cpu_target="triton")
    ops._LAUNCHERS.clear()
    try:
        model, ids = tiny("qwen2"), prompt()
        expected = greedy(eager_quantized(model, "int4"), ids, 5)
        report = tileflow.patch(model, options={**CPU, "weights": "int4"})
        assert torch.equal(greedy(model, ids, 5), expected)
        assert report.steps == 4
        launchers = [key[0] for key in ops._LAUNCHERS]
        fused = {"rms_norm_qkv_rope_cache_int4", "rms_norm_gate_up_silu_int4", "matvec_residual_int4"}
        assert "matvec_int4" in launchers and fused <= set(launchers) and not any(
            getattr(fn, "__qualname__", "").startswith("_reference_launcher") for fn in ops._LAUNCHERS.values())
    finally:
        ops._LAUNCHERS.clear()


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_the_low_precision_ops(target, tileflow_options):
    """ops.matvec_int4 / matvec_fp8 (bias, several rows, a ragged fp8 K) against the
    dequantized weight and the FP8Linear re-implementation."""
    tileflow_options(cpu_target=target)
    ops._LAUNCHERS.clear()
    try:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(40, 512, generator=g) / 20, torch.randn(40, generator=g)
        x = torch.randn(3, 512, generator=g)
        qw, s, z = Q.quantize_int4(w)
        torch.testing.assert_close(ops.matvec_int4(x, qw, s, z, b), x @ Q.dequantize_int4(qw, s, z).T + b)
        wq, si = Q.quantize_fp8(w[:, :300])
        torch.testing.assert_close(ops.matvec_fp8(x[:, :300], wq, si, b), Q.fp8_linear_torch(x[:, :300], wq, si, b))
        torch.testing.assert_close(ops.matvec_fp8(x[:, :300], wq, si), Q.fp8_linear_torch(x[:, :300], wq, si))
    finally:
        ops._LAUNCHERS.clear()


def fp8_checkpoint_model(kind: str):
    """``tiny(kind)`` with its projections as transformers' ``FP8Linear`` (128 x 128 blocks,
    dynamic activations), holding ``quantize.quantize_fp8`` of the random weights, as
    a fine-grained fp8 checkpoint loads on a GPU."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    model = tiny(kind)
    with torch.no_grad():
        for name, lin in list(projections(model)):
            fp8 = FP8Linear(lin.in_features, lin.out_features, block_size=(128, 128), has_bias=lin.bias is not None)
            w, s = Q.quantize_fp8(lin.weight)
            fp8.weight.data, fp8.weight_scale_inv.data = w, s
            if lin.bias is not None:
                fp8.bias.data = lin.bias.data.clone()
            model.set_submodule(name, fp8)
    return model


@pytest.mark.parametrize("kind", ["qwen2", pytest.param("llama", marks=pytest.mark.full)])
def test_an_fp8_checkpoints_fp8linear_runs_through_matvec_fp8(kind, monkeypatch):
    model, ids = fp8_checkpoint_model(kind), prompt()
    ref = copy.deepcopy(model)
    for _, lin in projections(ref):  # FP8Linear's CUDA math (it has no CPU path)
        lin.forward = fp8_forward(lin.weight, lin.weight_scale_inv, lin.bias)
    expected = greedy(ref, ids)
    before = state(model)
    report = tileflow.patch(model, options=CPU)  # weights="model": the checkpoint's own fp8 weights
    seen, fused = [], []
    real = ops.matvec_fp8
    monkeypatch.setattr(ops, "matvec_fp8", lambda x, w, ws, b=None: seen.append((w, ws)) or real(x, w, ws, b))
    calls = count_calls(monkeypatch, [*FUSED_OPS, *UNFUSED_OPS], fused)
    assert report.patched and not report.fallbacks, str(report)
    assert any(n.startswith("weights fp8 (the checkpoint's FP8Linear tensors)") for n in report.notes)
    assert len(report.quantized) == 14 and max(report.quantized.values()) < 0.1  # activations' rounding only
    assert torch.equal(greedy(model, ids), expected)
    assert report.steps == NEW_TOKENS - 1
    modules = dict(projections(model))
    lying = {(m.weight.data_ptr(), m.weight_scale_inv.data_ptr()) for m in modules.values()}
    # the prompt pass through the modules' matvec_fp8, each step through the fused fp8 kernels:
    # on the tensors where they lie (no copies)
    assert len(seen) == 14 and {(w.data_ptr(), s.data_ptr()) for w, s in seen} == lying
    read = [(a[0], w.data_ptr(), s.data_ptr()) for name, a in fused for w, s in FUSED_OPS[name](a)]
    assert len(read) == 14 * (NEW_TOKENS - 1) and {kind for kind, _, _ in read} == {"fp8"}
    assert {(w, s) for _, w, s in read} == lying and not any(calls[name] for name in UNFUSED_OPS)
    assert tileflow.unpatch(model)
    after = state(model)
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)
    assert not [m for m in model.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("case", ["int4-down-kept", "fp8-checkpoint-k-plain"])
def test_a_projection_of_another_kind_keeps_its_groups_plain_sequence(case, monkeypatch):
    """A projection the fused kernels cannot take beside the others: int4 with a down_proj K
    (384) the packing refuses (kept in the model's dtype: down as matvec + residual_add, the rest
    fused), or an fp8 checkpoint whose k_proj is a plain nn.Linear (q/k/v as rms_norm, three
    matvecs and two ropes; the MLP and o fused). Tokens equal eager's with the same weights."""
    if case == "int4-down-kept":
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                             vocab_size=128, max_position_embeddings=256, initializer_range=0.3,
                                             pad_token_id=0, num_attention_heads=4, num_key_value_heads=2)).eval()
        model.generation_config.eos_token_id = None
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, lin in projections(ref):
                if not name.endswith("down_proj"):
                    lin.weight.copy_(Q.dequantize_int4(*Q.quantize_int4(lin.weight)))
        options, kind, plain = {**CPU, "weights": "int4"}, "int4", "down_proj"
    else:
        model = fp8_checkpoint_model("qwen2")
        for i, layer in enumerate(tiny("qwen2").model.layers):  # the model's own k_proj back in place
            model.set_submodule(f"model.layers.{i}.self_attn.k_proj", layer.self_attn.k_proj)
        ref = copy.deepcopy(model)
        for name, lin in projections(ref):
            if not name.endswith("k_proj"):
                lin.forward = fp8_forward(lin.weight, lin.weight_scale_inv, lin.bias)
        options, kind, plain = CPU, "fp8", "k_proj"
    ids = prompt()
    expected = greedy(ref, ids)
    report = tileflow.patch(model, options=options)
    assert report.patched and not report.fallbacks, str(report)
    assert any(f"{plain} kept in the model's dtype" in n for n in report.notes), report.notes
    assert any("not every projection in a fused quantized kernel" in n for n in report.notes), report.notes
    calls = count_calls(monkeypatch, [*FUSED_OPS, "matvec", KERNEL[kind], "rms_norm", "residual_add", "rope_q"])
    assert torch.equal(greedy(model, ids), expected)
    layers, decode = len(model.model.layers), NEW_TOKENS - 1
    per_step = ({"rms_norm_qkv_rope_cache_quant": 1, "rope_q": 0, "matvec_residual_quant": 1,
                 "rms_norm_gate_up_silu_quant": 1, "matvec": 1, "residual_add": 1, "rms_norm": 0}
                if plain == "down_proj" else
                {"rms_norm_qkv_rope_cache_quant": 0, "rope_q": 2, "matvec_residual_quant": 2,
                 "rms_norm_gate_up_silu_quant": 1, "matvec": 1, "residual_add": 0, "rms_norm": 1})
    # the prompt pass: each projection through its own module (the plain one through matvec)
    prompt_calls = {"matvec": layers, KERNEL[kind]: 6 * layers}
    for name, n in per_step.items():
        assert calls[name] == n * layers * decode + prompt_calls.get(name, 0), (name, calls)
    assert calls[KERNEL[kind]] == prompt_calls[KERNEL[kind]] + (2 * layers * decode if plain == "k_proj" else 0)


def test_int4_on_an_fp8_checkpoint_leaves_it_unchanged():
    model = fp8_checkpoint_model("qwen2")
    report = tileflow.patch(model, options={**CPU, "weights": "int4"})
    assert not report.patched and "forward" not in model.__dict__
    assert any("FP8Linear: weights='int4' would re-quantize" in r for _, _, r in report.fallbacks), str(report)


def test_an_fp8_checkpoint_on_cpu(tmp_path):
    """What transformers does with a fine-grained fp8 checkpoint without a GPU: refuses it
    without accelerate, else dequantizes it to bf16 ``nn.Linear`` at load (no FP8Linear
    reaches ``patch`` on CPU: then it is a bf16 model like any other; checked with accelerate
    1.16 and transformers 5.25). tileflow's own loader keeps the fp8 tensors:
    ``test_a_local_fp8_checkpoint_folder_runs_through_the_fp8_path``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = tiny("qwen2", torch.bfloat16)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith("_proj.weight"):
            tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = Q.quantize_fp8(t)
        elif name != "lm_head.weight" or not model.config.tie_word_embeddings:
            tensors[name] = t.contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                        "activation_scheme": "dynamic"}
    model.config.save_pretrained(tmp_path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    except ImportError as exc:
        assert "requires accelerate" in str(exc) and not torch.cuda.is_available()
        return
    q = loaded.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and not hasattr(q, "weight_scale_inv")
    w, s = tensors["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert torch.equal(q.weight, Q.dequantize_fp8(w, s).to(q.weight.dtype))


def checkpoint_config(kind: str = "llama", **fields):
    """``tiny(kind)``'s config, for the fp8 checkpoint form (``fp8_checkpoint``)."""
    return tiny(kind).config.__class__(**{**tiny(kind).config.to_dict(), **fields})


def fp8_reference(model):
    """A copy of an fp8-checkpoint-form ``model`` whose FP8Linear modules compute what
    transformers' FP8Linear computes on CUDA (``quantize.fp8_linear_torch``: no CPU path)."""
    ref = copy.deepcopy(model)
    for _, lin in projections(ref):
        lin.forward = fp8_forward(lin.weight, lin.weight_scale_inv, lin.bias)
    return ref


def test_the_checkpoint_form_is_built_with_no_projection_in_the_models_dtype(monkeypatch):
    """``fp8_checkpoint.build_random`` on a tiny Llama config: every projection a transformers
    ``FP8Linear`` (e4m3 weight, fp32 scales a 128 x 128 block, dynamic activations), the rest
    in the model's dtype as ``from_config`` initializes it (the rotary frequencies included);
    every tensor allocated off the meta device is recorded, and none but the e4m3 codes holds
    as many values as the smallest projection (filled a slab of 128 rows at a time here)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from tileflow.integrations.transformers import fp8_checkpoint

    # every projection at least 256 x 256; a slab of 128 rows of the widest K (384) is smaller
    config = checkpoint_config("llama", intermediate_size=384, num_key_value_heads=4)
    monkeypatch.setattr(fp8_checkpoint, "SLAB_BYTES", 1)  # one 128-row block a slab
    made = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    made.append((tuple(t.shape), t.dtype))
            return out

    with Allocations():
        model = fp8_checkpoint.build_random(config, "cpu", torch.float32)
    smallest = min(m.weight.numel() for _, m in projections(model))
    assert smallest == 256 * 256
    wide = [(shape, dtype) for shape, dtype in made
            if dtype != torch.float8_e4m3fn and torch.Size(shape).numel() >= smallest]
    assert not wide, wide
    for where, m in projections(model):
        n, k = m.weight.shape
        assert type(m) is FP8Linear and m.weight.dtype == torch.float8_e4m3fn and m.bias is None, where
        assert m.weight_scale_inv.dtype == torch.float32 and m.weight_scale_inv.shape == (-(-n // 128), -(-k // 128))
        assert tuple(m.block_size) == (128, 128) and m.activation_scheme == "dynamic" and m.activation_scale is None
        w = Q.dequantize_fp8(m.weight, m.weight_scale_inv)
        assert torch.isfinite(w).all() and 0.2 < w.std() < 0.4, (where, w.std())  # normal(0, initializer_range 0.3)
    fp8_params = {f"{where}.{t}" for where, _ in projections(model) for t in ("weight", "weight_scale_inv")}
    rest = {n: p for n, p in model.named_parameters() if n not in fp8_params}
    assert rest and all(p.dtype == torch.float32 for p in rest.values())
    assert model.config.quantization_config == {"quant_method": "fp8", "weight_block_size": [128, 128],
                                                "activation_scheme": "dynamic"}
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config)
    assert torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in rest.items() if "norm" in n)


@pytest.mark.parametrize("kind", ["llama", pytest.param("qwen2", marks=pytest.mark.full)])
def test_a_local_fp8_checkpoint_folder_runs_through_the_fp8_path(kind, tmp_path, monkeypatch):
    """The user's path: a fine-grained fp8 checkpoint folder (``config.json`` with the fp8
    quantization_config, ``model.safetensors`` with e4m3 weights and ``weight_scale_inv``),
    saved from one built here, read by ``fp8_checkpoint.load`` on CPU (transformers would
    dequantize it to bf16 there): the tensors as saved, FP8Linear modules; ``tileflow.patch``
    runs every decode step through the fused fp8 kernels on the loaded tensors, and the greedy
    tokens (fp32 activations) equal the reference fp8 computation's."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from tileflow.integrations.transformers import fp8_checkpoint

    if kind == "llama":
        built = fp8_checkpoint.build_random(checkpoint_config("llama"), "cpu", torch.float32)
        built.generation_config.eos_token_id = None
    else:  # q/k/v biases, the tensors quantized from a model's own weights
        built = fp8_checkpoint_model("qwen2")
        built.config.quantization_config = dict(fp8_checkpoint.QUANTIZATION)
    fp8_checkpoint.save(built, str(tmp_path))
    model = fp8_checkpoint.load(str(tmp_path), "cpu", torch.float32)
    saved, loaded = built.state_dict(), model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k].float(), loaded[k].float()) for k in saved)
    assert all(type(m) is FP8Linear and m.weight.dtype == torch.float8_e4m3fn for _, m in projections(model))
    assert model.generation_config.eos_token_id is None
    ids = prompt()
    expected = greedy(fp8_reference(model), ids)
    assert len(set(expected[0, 9:].tolist())) > 5
    report = tileflow.patch(model, options=CPU)
    assert report.patched and not report.fallbacks, str(report)
    assert any(n.startswith("weights fp8 (the checkpoint's FP8Linear tensors)") for n in report.notes)
    seen = []
    calls = count_calls(monkeypatch, [*FUSED_OPS, *UNFUSED_OPS], seen)
    assert torch.equal(greedy(model, ids), expected)
    assert report.steps == NEW_TOKENS - 1
    layers, decode = len(model.model.layers), NEW_TOKENS - 1
    assert calls["rms_norm_qkv_rope_cache_quant"] == calls["rms_norm_gate_up_silu_quant"] == layers * decode
    assert calls["matvec_residual_quant"] == 2 * layers * decode and not any(calls[n] for n in UNFUSED_OPS)
    lying = {(m.weight.data_ptr(), m.weight_scale_inv.data_ptr()) for _, m in projections(model)}
    read = {(a[0], w.data_ptr(), s.data_ptr()) for name, a in seen for w, s in FUSED_OPS[name](a)}
    assert {(w, s) for _, w, s in read} == lying and {k for k, _, _ in read} == {"fp8"}


def test_an_fp8_checkpoint_folder_the_loader_cannot_take_is_a_one_line_error(tmp_path):
    from tileflow.integrations.transformers import fp8_checkpoint

    built = fp8_checkpoint.build_random(checkpoint_config("llama", num_hidden_layers=1), "cpu", torch.float32)
    fp8_checkpoint.save(built, str(tmp_path))
    with pytest.raises(fp8_checkpoint.CheckpointError, match=r"^\S+: model_type 'mistral': fp8 checkpoints are built "
                                                              r"for qwen2 / llama models"):
        fp8_checkpoint.load(str(tmp_path), config=_with(built.config, model_type="mistral"))
    with pytest.raises(fp8_checkpoint.CheckpointError, match=r"weight_block_size \[64, 64\].*128 x 128 blocks"):
        fp8_checkpoint.load(str(tmp_path), config=_with(built.config, quantization_config={
            **fp8_checkpoint.QUANTIZATION, "weight_block_size": [64, 64]}))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.scale"] = tensors.pop("model.layers.0.mlp.down_proj.weight_scale_inv")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(fp8_checkpoint.CheckpointError, match=r"^\S+: model.layers.0.mlp.down_proj.weight is stored in "
                                                              r"e4m3 without a weight_scale_inv$"):
        fp8_checkpoint.load(str(tmp_path))


def _with(config, **fields):
    config = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(config, k, v)
    return config


def test_a_bad_weights_value_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^tileflow: option weights='int3': expected one of model, int4, fp8$"):
        tileflow.patch(tiny("qwen2"), options={**CPU, "weights": "int3"})


def test_a_layer_the_program_cannot_take_leaves_the_quantized_model_unchanged():
    model = tiny("llama")
    model.model.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(256))
    report = tileflow.patch(model, options={**CPU, "weights": "fp8"})
    assert not report.patched and not report.quantized and "forward" not in model.__dict__
    assert [r for _, _, r in report.fallbacks] == [
        "model.layers.1: o_proj has a bias (quantized weights run whole steps only)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the generated Triton kernels)")
@pytest.mark.parametrize("kind, weights", [("qwen2", "int4"), ("llama", "fp8")])
def test_on_the_gpu_greedy_tokens_equal_the_eager_quantized_model(kind, weights, monkeypatch):
    """The generated low-precision kernels on the card, fp32: tokens equal to transformers'
    eager model with the quantized weights, every step the program's, the bf16 projections
    held on the host while patched and back on the card after ``unpatch``."""
    model, ids = tiny(kind).cuda(), prompt().cuda()
    plain = greedy(model, ids)
    expected = greedy(eager_quantized(model, weights), ids)
    before = {k: v.cpu() for k, v in model.state_dict().items()}
    device_before = device_bytes(model)
    steps = []
    real_run = QuantizedDecodeProgram.run
    monkeypatch.setattr(QuantizedDecodeProgram, "run", lambda self, *a, **k: steps.append(1) or real_run(self, *a, **k))
    report = tileflow.patch(model, options={"weights": weights})
    check_report(report, model, weights)
    assert device_bytes(model) < device_before
    now = model.state_dict()
    assert all(torch.equal(before[k], now[k].cpu()) for k in before)
    got = greedy(model, ids)
    assert torch.equal(got, expected), (got[0, 9:].tolist(), expected[0, 9:].tolist())
    assert report.steps == len(steps) == NEW_TOKENS - 1
    assert tileflow.unpatch(model) and device_bytes(model) == device_before
    assert torch.equal(greedy(model, ids), plain)
