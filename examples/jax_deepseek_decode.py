"""Greedy decode of a DeepSeek-R1-Distill model (Qwen2 or Llama architecture) in plain
JAX, with tileflow swapping the decode subgraphs for the suite's kernels, checked
against the torch eager model's logits and tokens.

    python examples/jax_deepseek_decode.py                       # tiny Qwen2-shaped model
    python examples/jax_deepseek_decode.py --arch llama          # tiny Llama (llama3 RoPE)
    python examples/jax_deepseek_decode.py --checkpoint DIR      # local safetensors folder

Without a checkpoint the model is built from a transformers config with random
weights (no hub access needed).
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tileflow import jax as tfj
from tileflow.integrations.jax import model as M


def tiny_model(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=256, initializer_range=0.3)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)).eval()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                        rope_scaling=scaling, **common)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    ap.add_argument("--checkpoint", help="local folder with config.json and *.safetensors")
    ap.add_argument("--new", type=int, default=20)
    args = ap.parse_args()

    if args.checkpoint:
        from transformers import AutoModelForCausalLM

        cfg, params = M.from_checkpoint(args.checkpoint, jnp.float32)
        torch_model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    else:
        torch_model = tiny_model(args.arch)
        cfg, params = M.from_transformers(torch_model, jnp.float32)
    ids = torch.randint(1, cfg.vocab, (1, 9), generator=torch.Generator().manual_seed(1))

    decode_step = functools.partial(M.decode_step, cfg)  # plain JAX, no tileflow inside
    args0 = (params, jnp.asarray(ids[0, :1].numpy(), jnp.int32), M.init_cache(cfg, 1, 64, jnp.float32),
             jnp.int32(0))
    print(tfj.explain(decode_step, *args0))

    step = jax.jit(tfj.optimize(decode_step), donate_argnums=(2,))
    first = []
    tokens = M.generate(step, params, jnp.asarray(ids.numpy()), args.new,
                        M.init_cache(cfg, 1, -(-(ids.shape[1] + args.new) // 64) * 64, jnp.float32),
                        on_logits=lambda lg: first.append(np.asarray(lg)) if not first else None)

    with torch.no_grad():
        expected = torch_model.generate(ids, max_new_tokens=args.new, do_sample=False)[0, ids.shape[1]:].tolist()
        # logits of the first decode step (prompt + first greedy token), for the error figure
        ref = torch_model(torch.cat([ids, torch.tensor([[expected[0]]])], dim=1)).logits[0, -1].numpy()
    err = float(np.linalg.norm(first[0][0] - ref) / np.linalg.norm(ref))
    print(f"tileflow.jax tokens: {tokens}")
    print(f"torch eager tokens:  {expected}")
    print(f"identical: {tokens == expected}; first decode step relative logit error vs torch: {err:.2e}")


if __name__ == "__main__":
    main()
