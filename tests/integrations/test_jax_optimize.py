"""tileflow.jax.optimize on the plain-JAX DeepSeek decode (tiny Qwen2 and Llama
configs, random weights): every decode pattern swapped, the norms fused into the
kernels they feed (qkv_rope_cache, rms_norm_gate_up_silu, rms_norm_matvec: the
hand-written step's launches), greedy tokens identical to plain jax.jit and to the
torch eager model in fp32, through the reference lowering and through the generated
Pallas kernels (interpreter); near misses reported with their reason (a normalized
value read elsewhere keeps the unfused kernels); a function with no decode pattern
comes back unchanged."""

import collections
import functools
import re

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from tileflow import jax as tfj  # noqa: E402
from tileflow.integrations.jax import model as M  # noqa: E402

NEW_TOKENS = 17
PROMPT = 9
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@functools.lru_cache(maxsize=None)
def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=256, initializer_range=0.3, pad_token_id=0)
    if kind == "qwen2":  # q/k/v biases, GQA 2
        return Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                            **common)).eval()
    return LlamaForCausalLM(LlamaConfig(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                        rope_scaling=LLAMA3, **common)).eval()


def prompt():
    return torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def eager_tokens(kind: str) -> list:
    with torch.no_grad():
        out = tiny(kind).generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, PROMPT:].tolist()


def decode(kind: str, step_fn) -> list:
    cfg, params = M.from_transformers(tiny(kind))
    step = jax.jit(functools.partial(step_fn, cfg), donate_argnums=(2,))
    cache = M.init_cache(cfg, 1, 32, jnp.float32)
    return M.generate(step, params, jnp.asarray(prompt().numpy()), NEW_TOKENS, cache)


def optimized(cfg):
    return tfj.optimize(functools.partial(M.decode_step, cfg))


def step_args(cfg, params):
    return params, jnp.ones(1, jnp.int32), M.init_cache(cfg, 1, 32, params["embed"].dtype), jnp.int32(3)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_every_decode_pattern_matches(tileflow_options, kind):
    tileflow_options(jax_target="pallas")  # rewrite on every backend, CUDA included
    cfg, params = M.from_transformers(tiny(kind))
    report = tfj.explain(functools.partial(M.decode_step, cfg), *step_args(cfg, params))
    n = cfg.layers
    # per layer: norm + q/k/v + RoPE + cache writes, attention, o + residual, norm +
    # gate/up + SiLU, down + residual; then the final norm with the lm_head
    assert dict(report.matches) == {"qkv_rope_cache": n, "gqa_attention": n, "matvec_residual": 2 * n,
                                    "rms_norm_gate_up_silu": n, "rms_norm_matvec": 1}, str(report)
    assert report.fallbacks == [], str(report)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("target", ["reference", "pallas"])
def test_greedy_tokens_identical_fp32(tileflow_options, kind, target):
    tileflow_options(jax_target=target)
    expected = eager_tokens(kind)
    assert len(set(expected)) > 5  # the model does not just repeat one token
    plain = decode(kind, M.decode_step)
    assert plain == expected
    cfg, _ = M.from_transformers(tiny(kind))
    got = decode(kind, lambda c, *a: optimized(c)(*a))
    assert got == expected
    assert decode(kind, M.decode_step_tileflow) == expected


def test_optimized_logits_close_and_primitives_in_the_program():
    cfg, params = M.from_transformers(tiny("qwen2"))
    args = step_args(cfg, params)
    plain, _ = jax.jit(functools.partial(M.decode_step, cfg))(*args)
    fast, _ = jax.jit(optimized(cfg))(*args)
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)
    text = str(jax.make_jaxpr(optimized(cfg))(*args))
    n = cfg.layers
    assert primitive_counts(text) == {"qkv_rope_cache": n, "gqa_attention": n, "matvec_residual": 2 * n,
                                      "rms_norm_gate_up_silu": n, "rms_norm_matvec": 1}
    # the originals are gone, not just bypassed
    assert not re.search(r"= (logistic|rsqrt|dot_general|dynamic_update_slice|cos|sin)\b", text)


def primitive_counts(text: str) -> dict:
    return dict(collections.Counter(re.findall(r"tileflow_(\w+)", text)))


def test_no_decode_pattern_comes_back_unchanged():
    def fn(x, y):
        return {"a": jnp.sin(x) @ y + 1.0, "b": jnp.cumsum(x, axis=0)}

    x, y = jnp.ones((4, 8)), jnp.ones((8, 3))
    opt = tfj.optimize(fn)
    report = tfj.explain(fn, x, y)
    assert not report.matches
    assert [f[0] for f in report.fallbacks] == ["matvec"] and "rows" in report.fallbacks[0][2]
    assert str(jax.make_jaxpr(opt)(x, y)) == str(jax.make_jaxpr(fn)(x, y))
    out = jax.jit(opt)(x, y)
    assert np.array_equal(out["a"], fn(x, y)["a"]) and np.array_equal(out["b"], fn(x, y)["b"])


def test_near_misses_keep_the_original_with_a_reason():
    w = jnp.ones(16, jnp.bfloat16)

    def norm_in_bf16(x):  # no upcast: the kernel would sum in fp32, a different function
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w

    rep = tfj.explain(norm_in_bf16, jnp.ones((1, 16), jnp.bfloat16))
    assert not rep.matches and "bfloat16" in rep.fallbacks[0][2]

    def flax_layout(x, wk):  # [K, N] kernel: reading it as [N, K] would need a copy
        return x @ wk

    rep = tfj.explain(flax_layout, jnp.ones((1, 16)), jnp.ones((16, 8)))
    assert not rep.matches and "[K, N]" in rep.fallbacks[0][2]

    def eps_differs(x, w):  # matches, and the eps read off the graph is the one used
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 0.5)).astype(x.dtype) * w

    x, wf = jax.random.normal(jax.random.key(0), (1, 16)), jax.random.normal(jax.random.key(1), (16,))
    assert tfj.explain(eps_differs, x, wf).matches["rms_norm"] == 1
    np.testing.assert_allclose(jax.jit(tfj.optimize(eps_differs))(x, wf), eps_differs(x, wf), rtol=1e-6)


def test_bf16_logits_close_to_plain():
    cfg, params = M.from_transformers(tiny("llama"), dtype=jnp.bfloat16)
    args = step_args(cfg, params)
    plain, _ = jax.jit(functools.partial(M.decode_step, cfg))(*args)
    fast, _ = jax.jit(optimized(cfg))(*args)
    err = float(jnp.linalg.norm(fast - plain) / jnp.linalg.norm(plain))
    assert err < 2e-2, err


def test_on_cuda_auto_keeps_xla_with_the_measured_reason(tileflow_options, monkeypatch):
    """Where the generated kernels measured slower than XLA (CUDA without jax_triton:
    Pallas's Triton backend), ``optimize`` under the auto target swaps nothing and says
    why; an explicit target still rewrites, and so does auto where jax_triton runs the
    generated Triton kernels."""
    from tileflow.integrations.jax import lowering

    cfg, params = M.from_transformers(tiny("qwen2"))
    tileflow_options(jax_target="auto")
    monkeypatch.setattr(lowering.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(lowering, "triton_available", lambda: True)
    report = tfj.explain(functools.partial(M.decode_step, cfg), *step_args(cfg, params))
    assert report.matches["gqa_attention"] == cfg.layers and not report.fallbacks, str(report)
    monkeypatch.setattr(lowering, "triton_available", lambda: False)
    report = tfj.explain(functools.partial(M.decode_step, cfg), *step_args(cfg, params))
    assert not report.matches and report.fallbacks, str(report)
    assert all("slower than XLA" in reason and "docs/performance.md" in reason for _, _, reason in report.fallbacks)
    tileflow_options(jax_target="pallas")
    report = tfj.explain(functools.partial(M.decode_step, cfg), *step_args(cfg, params))
    assert report.matches["gqa_attention"] == cfg.layers and not report.fallbacks


# ------------------------------------------------------------------ norm fusion

def _attention_input(cfg, h, layer, kv, pos, *, leak=False, v_row=0):
    """A decode layer's attention input as model.decode_step writes it; ``leak`` also
    returns k before RoPE, ``v_row`` writes V that many rows after K."""
    b = h.shape[0]
    cos, sin = M.rope_cos_sin(cfg, jnp.full((b,), pos, jnp.int32), h.dtype)
    x = M.rms_norm(h, layer["ln1"], cfg.eps)
    q, k, v = x @ layer["wq"].T + layer["bq"], x @ layer["wk"].T + layer["bk"], x @ layer["wv"].T + layer["bv"]
    q = q.reshape(b, cfg.heads, cfg.head_dim)
    k0 = k.reshape(b, cfg.kv_heads, cfg.head_dim)
    v = v.reshape(b, cfg.kv_heads, cfg.head_dim)
    q = q * cos + M.rotate_half(q) * sin
    k = k0 * cos + M.rotate_half(k0) * sin
    k_cache = jax.lax.dynamic_update_slice(kv["k"], k[:, :, None, :], (0, 0, pos, 0))
    v_cache = jax.lax.dynamic_update_slice(kv["v"], v[:, :, None, :], (0, 0, pos + v_row if v_row else pos, 0))
    return (q, k_cache, v_cache) + ((k0,) if leak else ())


def _qwen_layer():
    cfg, params = M.from_transformers(tiny("qwen2"))
    kv = {"k": jax.random.normal(jax.random.key(2), (1, cfg.kv_heads, 32, cfg.head_dim)),
          "v": jax.random.normal(jax.random.key(3), (1, cfg.kv_heads, 32, cfg.head_dim))}
    return cfg, params["layers"][0], kv, jax.random.normal(jax.random.key(4), (1, cfg.hidden))


@pytest.mark.parametrize("pos", [0, 5, 31, 40, -1])
def test_qkv_rope_cache_writes_where_dynamic_update_slice_does(pos):
    """One qkv_rope_cache: q and both caches equal plain JAX's, also where XLA clamps
    the row into the cache (40) or counts it from the end (-1), rotated at pos itself."""
    cfg, layer, kv, h = _qwen_layer()
    fn = functools.partial(_attention_input, cfg)
    args = (h, layer, kv, jnp.int32(pos))
    report = tfj.explain(fn, *args)
    assert dict(report.matches) == {"qkv_rope_cache": 1} and not report.fallbacks, str(report)
    assert primitive_counts(str(jax.make_jaxpr(tfj.optimize(fn))(*args))) == {"qkv_rope_cache": 1}
    for got, want in zip(jax.jit(tfj.optimize(fn))(*args), jax.jit(fn)(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_qkv_with_a_leaked_intermediate_or_two_rows_stays_unfused():
    cfg, layer, kv, h = _qwen_layer()
    args = (h, layer, kv, jnp.int32(3))
    for kw, reason in ((dict(leak=True), "also read by the function's output"),
                       (dict(v_row=1), "different rows")):
        fn = functools.partial(_attention_input, cfg, **kw)
        report = tfj.explain(fn, *args)
        assert dict(report.matches) == {"rms_norm": 1, "matvec": 3, "rope": 2}, str(report)
        assert [(p, r) for p, _, r in report.fallbacks if reason in r] and \
            all(p == "qkv_rope_cache" for p, _, _ in report.fallbacks), str(report)
        for got, want in zip(jax.jit(tfj.optimize(fn))(*args), jax.jit(fn)(*args)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_norm_read_elsewhere_keeps_the_unfused_kernels():
    """rms_norm + gate/up fuse only when the gate and up matvecs are all that read the
    normalized x, the final norm + lm_head only when the head is: here the normalized x
    is also returned, so it is computed anyway and both stay unfused, with the reason."""
    k = jax.random.split(jax.random.key(5), 4)
    h, ln = jax.random.normal(k[0], (1, 64)), jax.random.normal(k[1], (64,))
    wg, wu = jax.random.normal(k[2], (96, 64)), jax.random.normal(k[3], (96, 64))

    def mlp(h, ln, wg, wu, probe):
        x = M.rms_norm(h, ln, 1e-6)
        y = jax.nn.silu(x @ wg.T) * (x @ wu.T)
        return (y, x) if probe else y

    def head(h, ln, w, probe):
        x = M.rms_norm(h, ln, 1e-6)
        return (x @ w.T, x) if probe else x @ w.T

    cases = ((mlp, (h, ln, wg, wu), "rms_norm_gate_up_silu", "gate_up_silu", "gate_up_silu"),
             (head, (h, ln, wg), "rms_norm_matvec", "matvec", "matvec"))
    for f, args, fused, part, prim in cases:
        fn = functools.partial(f, probe=False)
        assert dict(tfj.explain(fn, *args).matches) == {fused: 1}
        assert primitive_counts(str(jax.make_jaxpr(tfj.optimize(fn))(*args))) == {fused: 1}
        np.testing.assert_allclose(jax.jit(tfj.optimize(fn))(*args), fn(*args), rtol=1e-5, atol=1e-4)
        fn = functools.partial(f, probe=True)
        report = tfj.explain(fn, *args)
        assert dict(report.matches) == {"rms_norm": 1, part: 1}, str(report)
        assert [(p, "also read by the function's output" in r) for p, _, r in report.fallbacks] == [(fused, True)]
        assert primitive_counts(str(jax.make_jaxpr(tfj.optimize(fn))(*args))) == {"rms_norm": 1, prim: 1}
        for got, want in zip(jax.jit(tfj.optimize(fn))(*args), fn(*args)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("target", ["reference", "pallas"])
def test_rms_norm_linear_primitive(tileflow_options, target):
    """ops.rms_norm_matvec (the suite's rms_norm_matvec) against float64, with a bias and
    several rows."""
    from tileflow.integrations.jax import ops

    tileflow_options(jax_target=target)
    k = jax.random.split(jax.random.key(6), 4)
    x, ln = jax.random.normal(k[0], (3, 50)), jax.random.normal(k[1], (50,))
    w, b = jax.random.normal(k[2], (37, 50)), jax.random.normal(k[3], (37,))
    xf, lf, wf, bf = (np.asarray(a, np.float64) for a in (x, ln, w, b))
    want = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5) * lf @ wf.T + bf
    np.testing.assert_allclose(jax.jit(ops.rms_norm_matvec, static_argnums=2)(x, ln, 1e-5, w, b), want,
                               rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ops.rms_norm_matvec(x, ln, 1e-5, w), want - bf, rtol=2e-5, atol=2e-5)
