"""Verification of the suite kernel `mla_latent_cache` on every target and dtype, and of its
reference against the latent cache transformers' DeepseekV2 / V3 attention layers write."""

import pytest

import tileflow.suite.mla_latent_cache  # noqa: F401  registers
from tests.suite.harness import make_test

test_mla_latent_cache = make_test("mla_latent_cache")


def _layer(kind: str):
    """A random transformers attention layer at small sizes with YaRN (attention factor
    != 1): DeepseekV3 with interleaved or rotate-half rope, or DeepseekV2. Returns
    (layer, rotary embedding, config, ROPE_LAYOUT)."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                mscale=0.9, mscale_all_dim=0.7, beta_fast=32, beta_slow=1)
    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                 qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=512,
                 rope_parameters=rope)
    if kind == "v2":
        config, attn, rot, layout = DeepseekV2Config(**sizes), v2.DeepseekV2Attention, v2.DeepseekV2RotaryEmbedding, 2
    else:
        config = DeepseekV3Config(**sizes, rope_interleave=kind == "v3")
        attn, rot, layout = v3.DeepseekV3Attention, v3.DeepseekV3RotaryEmbedding, (1 if kind == "v3" else 0)
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    layer = attn(config, layer_idx=0).eval()
    for prm in layer.parameters():
        torch.nn.init.normal_(prm, std=0.3 if prm.ndim == 1 else prm.shape[-1] ** -0.5)
        if prm.ndim == 1:
            prm.data += 1.0
    return layer, rot(config), config, layout



@pytest.mark.parametrize("kind", ["v3", "v3_halves", "v2"])
def test_reference_equals_transformers_latent_cache(kind):
    """The kernel's reference (and its Triton kernel), fed the layer's own weights and
    rotary table, writes the latent cache row the layer's decode step writes (fp32)."""
    import array_api_compat
    import torch
    from transformers import DynamicCache

    from tileflow.suite.mla_latent_cache import KERNEL, reference
    from tileflow.verify import run_target

    layer, rotary, config, layout = _layer(kind)
    assert rotary.attention_scaling != 1.0
    bsz, steps, cap = 2, 7, 12
    hidden = torch.randn(bsz, steps, config.hidden_size)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        for t in range(steps):
            pos = torch.full((bsz, 1), t, dtype=torch.int64)
            emb = rotary(hidden, pos)
            if kind == "v2":
                layer(hidden[:, t:t + 1], attention_mask=None, cache=cache, position_embeddings=emb)
            else:
                layer(hidden[:, t:t + 1], emb, attention_mask=None, cache=cache)
    want_kv, want_pe = cache.layers[0].keys[:, 0], cache.layers[0].values[:, 0]  # [B, T, R], [B, T, DR]
    # caches holding the first steps - 1 rows, junk after: the new token goes to row steps - 1
    kv_cache = torch.cat([want_kv[:, :-1], torch.randn(bsz, cap - steps + 1, want_kv.shape[-1])], dim=1)
    pe_cache = torch.cat([want_pe[:, :-1], torch.randn(bsz, cap - steps + 1, want_pe.shape[-1])], dim=1)
    args = dict(x=hidden[:, -1].contiguous(), w_kva=layer.kv_a_proj_with_mqa.weight.detach(),
                ln_w=layer.kv_a_layernorm.weight.detach(), pos=torch.full((bsz,), steps - 1, dtype=torch.int64),
                inv_freq=rotary.inv_freq)
    scalars = dict(eps=layer.kv_a_layernorm.variance_epsilon, rope_scale=rotary.attention_scaling, rope_layout=layout)
    xp = array_api_compat.array_namespace(kv_cache)
    with torch.no_grad():
        ref = reference(xp, **args, kv_cache=kv_cache, pe_cache=pe_cache, **scalars)
    sizes = dict(M=bsz, D=config.hidden_size, R=config.kv_lora_rank, DR=config.qk_rope_head_dim,
                 RA=config.kv_lora_rank + config.qk_rope_head_dim, HALF=config.qk_rope_head_dim // 2, S=cap,
                 ROPE_LAYOUT=layout)
    outs = {"kv_cache": kv_cache.clone(), "pe_cache": pe_cache.clone()}
    got = run_target(KERNEL, KERNEL.build(KERNEL.default_params(sizes)), "triton", args, outs, scalars)
    for name, out in (("reference", ref), ("triton", got)):
        err = max((out["kv_cache"][:, :steps] - want_kv).abs().max().item(),
                  (out["pe_cache"][:, :steps] - want_pe).abs().max().item())
        print(f"{kind} {name}: max |cache row - transformers| = {err:.2e}")
        assert err < 1e-5, (name, err)
        assert torch.equal(out["kv_cache"][:, steps:], kv_cache[:, steps:])  # the junk rows untouched


def test_cache_pos_outside_the_cache_writes_nothing():
    """With CACHE_POS a row at or past the cache's end (or negative) is skipped by the
    kernel and its reference alike; the other rows go to cache_pos, rotated at pos."""
    import array_api_compat
    import torch

    from tileflow.suite.mla_latent_cache import KERNEL, reference
    from tileflow.verify import run_target

    sizes = dict(M=3, D=24, R=16, DR=8, RA=24, HALF=4, S=6, ROPE_LAYOUT=1, CACHE_POS=1)
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(3, 24, generator=g), w_kva=torch.randn(24, 24, generator=g) / 5,
                ln_w=torch.rand(16, generator=g) + 0.5, pos=torch.tensor([2, 9, 4]),
                cache_pos=torch.tensor([6, 5, -1]), inv_freq=10000.0 ** (-torch.arange(4) / 4))
    caches = {"kv_cache": torch.randn(3, 6, 16, generator=g), "pe_cache": torch.randn(3, 6, 8, generator=g)}
    scalars = dict(eps=1e-6, rope_scale=1.0, rope_layout=1)
    ref = reference(array_api_compat.array_namespace(args["x"]), **args, **caches, **scalars)
    got = run_target(KERNEL, KERNEL.build(KERNEL.default_params(sizes)), "triton", args,
                     {k: v.clone() for k, v in caches.items()}, scalars)
    for name, out in (("reference", ref), ("triton", got)):
        changed = [(out[c] != caches[c]).any(dim=-1).nonzero().tolist() for c in caches]
        assert changed == [[[1, 5]], [[1, 5]]], (name, changed)  # only row 1's cache_pos 5
    assert torch.allclose(got["kv_cache"], ref["kv_cache"], atol=1e-5)
    assert torch.allclose(got["pe_cache"], ref["pe_cache"], atol=1e-5)
