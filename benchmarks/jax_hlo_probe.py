#!/usr/bin/env python3
"""What XLA made of a JAX decode loop: per path, the optimized HLO's custom calls,
copies and fusions, and how many of them sit inside command buffers (CUDA graphs).
A built-in config cut to a few layers (the structure repeats per layer).

    PYTHONPATH=src python benchmarks/jax_hlo_probe.py --model deepseek-r1-distill-qwen-1.5b --layers 2
"""

import argparse
import collections
import functools
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_cli_uninstalled import map_source_packages  # noqa: E402

map_source_packages()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-r1-distill-qwen-1.5b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=None, help="write each path's optimized HLO here")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from tileflow.bench.jax_decode import _device_loop, _step_fns
    from tileflow.bench.models import builtin_config
    from tileflow.integrations.jax import model as M

    cfg_t = builtin_config(args.model)
    cfg_t.num_hidden_layers = args.layers
    tmodel = AutoModelForCausalLM.from_config(cfg_t, torch_dtype=torch.bfloat16)
    cfg, params = M.from_transformers(tmodel, jnp.bfloat16)
    cache = M.init_cache(cfg, 1, 384, jnp.bfloat16)
    tok = jnp.zeros((1,), jnp.int32)
    for name, fn in _step_fns(cfg).items():
        gen = _device_loop(jax.jit(fn, donate_argnums=(2,)), 8)
        text = gen.lower(params, tok, cache, jnp.int32(5)).compile().as_text()
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            Path(args.out, f"{name}.hlo.txt").write_text(text)
        comps = re.split(r"\n(?=\S)", text)
        in_cb = collections.Counter()
        total = collections.Counter()
        for comp in comps:
            body = "command_buffer" in comp.split("\n", 1)[0]
            for kind in ("custom-call(", " copy(", " fusion(", "while(", "call("):
                n = comp.count(kind)
                total[kind.strip(" (")] += n
                if body:
                    in_cb[kind.strip(" (")] += n
        targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
        print(f"{name:<30} total {dict(total)}  in command buffers {dict(in_cb)}  targets {dict(targets)}")


if __name__ == "__main__":
    main()
