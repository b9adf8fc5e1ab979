"""Verification of the suite kernel `mla_attention` on every target and dtype, and of its
reference against transformers' own DeepseekV3 attention layer."""

import tileflow.suite.mla_attention  # noqa: F401  registers
from tests.suite.harness import make_test

test_mla_attention = make_test("mla_attention")


def tiny_deepseek_v3(seed: int = 0):
    """A random DeepseekV3 attention layer at small sizes (q_lora_rank, YaRN with mscale
    and mscale_all_dim, so both the rope's attention factor and the softmax mscale^2 apply),
    its rotary embedding, and its config."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, max_position_embeddings=512,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             mscale=0.9, mscale_all_dim=0.7, beta_fast=32, beta_slow=1))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    layer = DeepseekV3Attention(config, layer_idx=0).eval()
    for prm in layer.parameters():  # away from the init's ones / small normals: every weight matters
        torch.nn.init.normal_(prm, std=0.3 if prm.ndim == 1 else prm.shape[-1] ** -0.5)
        if prm.ndim == 1:
            prm.data += 1.0
    return layer, DeepseekV3RotaryEmbedding(config), config


def decode_steps(layer, rotary, hidden, cache):
    """Runs ``hidden`` [B, T, D] through ``layer`` one token at a time (each step sees the
    whole cache, as decode does); returns the last step's output [B, 1, D]."""
    import torch

    for t in range(hidden.shape[1]):
        pos = torch.full((hidden.shape[0], 1), t, dtype=torch.int64)
        out, _ = layer(hidden[:, t:t + 1], rotary(hidden, pos), attention_mask=None, cache=cache)
    return out


def test_reference_equals_transformers_deepseek_v3_decode():
    """The kernel's reference, fed from the layer's own weights and latent cache, gives the
    layer's decode output for one new token (o_proj applied to both): the absorption's
    w_uk / w_uv split of kv_b_proj and the layer's softmax scale (YaRN mscale^2) match."""
    import array_api_compat
    import torch
    from transformers import DynamicCache
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    from tileflow.suite.mla_attention import reference

    layer, rotary, config = tiny_deepseek_v3()
    assert layer.scaling != config.qk_head_dim ** -0.5 and rotary.attention_scaling != 1.0
    bsz, steps = 2, 11
    hidden = torch.randn(bsz, steps, config.hidden_size)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        want = decode_steps(layer, rotary, hidden, cache)[:, 0]
        # the new token's query, as the layer makes it: q_a_proj -> q_a_layernorm -> q_b_proj, rope
        x = hidden[:, -1:]
        q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x))).view(bsz, 1, -1, config.qk_head_dim)
        q_nope, q_pe = torch.split(q.transpose(1, 2), [config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
        pos = torch.full((bsz, 1), steps - 1, dtype=torch.int64)
        q_pe, _ = apply_rotary_pos_emb_interleave(q_pe, q_pe, *rotary(x, pos))
        # the latent cache as the layer wrote it, padded past the filled length with junk
        kv, pe = cache.layers[0].keys[:, 0], cache.layers[0].values[:, 0]  # [B, T, R], [B, T, DR]
        cap = steps + 5
        kv_cache = torch.cat([kv, torch.randn(bsz, cap - steps, kv.shape[-1])], dim=1)
        pe_cache = torch.cat([pe, torch.randn(bsz, cap - steps, pe.shape[-1])], dim=1)
        # kv_b_proj.weight as it lies: per head DN rows of K, then DV rows of V
        w = layer.kv_b_proj.weight.view(config.num_attention_heads, config.qk_nope_head_dim + config.v_head_dim, -1)
        w_uk, w_uv = w[:, :config.qk_nope_head_dim], w[:, config.qk_nope_head_dim:]
        args = dict(q_nope=q_nope[:, :, 0], q_pe=q_pe[:, :, 0], kv_cache=kv_cache, pe_cache=pe_cache,
                    lengths=torch.full((bsz,), steps, dtype=torch.int64), w_uk=w_uk, w_uv=w_uv)
        xp = array_api_compat.array_namespace(kv_cache)
        out = reference(xp, **args, scale=layer.scaling)["out"]  # [B, NH, DV]
        got = layer.o_proj(out.reshape(bsz, -1))
    err = (got - want).abs().max().item()
    print(f"max |reference - transformers| = {err:.2e}")
    assert err < 1e-5, err
    # the Triton kernel (interpreter) on the same tensors, w_uk / w_uv the strided views of
    # kv_b_proj.weight and the caches views of the layer's own, not copies
    from tileflow.suite.mla_attention import KERNEL
    from tileflow.verify import run_target

    sizes = dict(B=bsz, NH=config.num_attention_heads, R=config.kv_lora_rank, DR=config.qk_rope_head_dim,
                 DN=config.qk_nope_head_dim, DV=config.v_head_dim, S=cap)
    params = {**KERNEL.default_params(sizes), "BLOCK_N": 16, "SPLITS": 2, "SPLITS_BLOCK": 2}
    assert not w_uk.is_contiguous() and not w_uv.is_contiguous()
    outputs = {"out": torch.full((bsz, config.num_attention_heads, config.v_head_dim), float("nan"))}
    kern = run_target(KERNEL, KERNEL.build(params), "triton", args, outputs, {"scale": layer.scaling})["out"]
    with torch.no_grad():
        kerr = (layer.o_proj(kern.reshape(bsz, -1)) - want).abs().max().item()
    print(f"max |triton kernel - transformers| = {kerr:.2e}")
    assert kerr < 1e-5, kerr
    # and the wrong scale (no mscale^2) would not pass: the check sees it
    with torch.no_grad():
        plain = layer.o_proj(reference(xp, **args, scale=config.qk_head_dim ** -0.5)["out"].reshape(bsz, -1))
    assert (plain - want).abs().max().item() > 1e-3
