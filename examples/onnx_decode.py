"""Export a tiny Qwen2-shaped model's decode step to ONNX, rewrite it for ONNX Runtime
with tileflow's rules, and decode greedily on the CPU; checks the tokens against
torch eager.

    python examples/onnx_decode.py            # target "ort"; --target opset23
"""

import argparse
import os
import tempfile

import torch
import transformers

import tileflow


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="ort", choices=["ort", "opset23"])
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()

    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    prompt = [3, 17, 42, 5]

    work = tempfile.mkdtemp(prefix="tileflow-onnx-")
    step, fused = os.path.join(work, "step.onnx"), os.path.join(work, "step.opt.onnx")
    tileflow.onnx.export(model, step)
    report = tileflow.onnx.optimize(step, fused, target=args.target)
    print(report)

    tokens = tileflow.onnx.Generator(fused).generate(prompt, args.tokens)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=args.tokens, do_sample=False,
                             min_new_tokens=args.tokens)[0, len(prompt):].tolist()
    print("onnxruntime:", tokens)
    print("torch eager:", ref)
    print("identical" if tokens == ref else "DIFFERENT")


if __name__ == "__main__":
    main()
