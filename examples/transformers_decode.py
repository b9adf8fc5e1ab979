"""Greedy decode of a DeepSeek-R1-Distill-shaped transformers model three ways: as
written (eager), with ``tileflow.patch(model)``, and through
``torch.compile(model.forward, backend="tileflow")``; prints what tileflow matched,
the tokens' agreement with eager, and the decode speed of each.

    python examples/transformers_decode.py                         # GPU: 1.5B shape, bf16
    python examples/transformers_decode.py --model tiny            # CPU: a tiny Qwen2, fp32
    python examples/transformers_decode.py --model /path/to/local/checkpoint

Weights are random for the built-in configs (decode speed does not depend on them), so
greedy tokens of bf16 paths part from eager's after a few steps: nearly flat logits.
"""

import argparse

import torch
from transformers import StaticCache

import tileflow
from tileflow.bench.decode import decode_once
from tileflow.bench.models import build_model
from tileflow.integrations.shared.hf import cache_keyword


def greedy(model, ids: torch.Tensor, new_tokens: int, forward=None) -> tuple[list, float]:
    """Prefill, then ``new_tokens - 1`` one-token steps on a StaticCache (the bench's
    protocol); returns (tokens, decode tok/s)."""
    forward = forward or model.forward
    kw = cache_keyword(model)

    def step(tok, pos, cache):
        return forward(input_ids=tok, position_ids=pos, use_cache=True, **{kw: cache}).logits[:, -1]

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
    _, seconds, tokens, _ = decode_once(model, step, ids, new_tokens, cache)
    return tokens, (new_tokens - 1) / seconds


def agreement(a: list, b: list) -> str:
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return "all equal" if not diff else f"equal up to new token {diff[0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="built-in name, 'tiny', or a local checkpoint folder")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.model or ("deepseek-r1-distill-qwen-1.5b" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(name, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    eager, eager_speed = greedy(model, ids, args.new)
    print(f"eager                       {eager_speed:8.1f} tok/s")

    print(tileflow.patch(model))  # what matched, and what stayed and why
    greedy(model, ids, args.new)  # the first run builds the step program (on a GPU: captures its CUDA graph)
    patched, speed = greedy(model, ids, args.new)
    print(f"tileflow.patch              {speed:8.1f} tok/s   tokens {agreement(patched, eager)}")
    tileflow.unpatch(model)

    compiled = torch.compile(model.forward, backend="tileflow")
    greedy(model, ids, args.new, compiled)  # compiles
    toks, speed = greedy(model, ids, args.new, compiled)
    print(f"backend=\"tileflow\"          {speed:8.1f} tok/s   tokens {agreement(toks, eager)}")


if __name__ == "__main__":
    main()
