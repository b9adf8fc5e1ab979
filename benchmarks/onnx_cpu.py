"""CPU decode throughput of the ONNX paths, one run, same machine.

Paths: the unfused export, onnxscript's ``optimize_for_ort``, tileflow's ``ort``
target (ORT CPU execution provider, IO binding, greedy) and torch eager. The model
is a built-in DeepSeek config with random weights, fp32, its layer count cut to fit
(decode speed does not depend on weight values). Sessions are loaded one at a time
and the paths are timed in interleaved rounds, so load from other users of the
machine spreads over all of them; the median of the rounds is reported.

    python benchmarks/onnx_cpu.py --model deepseek-r1-distill-qwen-1.5b --layers 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table


def _build(name: str, layers: int):
    import transformers

    from tileflow.bench.models import _CONFIG_KEYS_IGNORED, builtin_configs

    fields = {k: v for k, v in builtin_configs()[name].items() if k not in _CONFIG_KEYS_IGNORED}
    kind = fields.pop("model_type")
    fields["num_hidden_layers"] = layers
    config = transformers.AutoConfig.for_model(kind, **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _eager_round(model, prompt, steps):
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        tokens, start = [], time.perf_counter()
        for _ in range(steps):
            tokens.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
        return steps / (time.perf_counter() - start), tokens


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-r1-distill-qwen-1.5b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort
    import onnxscript
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    import tileflow

    console = Console()
    work = args.workdir or tempfile.mkdtemp(prefix="tileflow-onnx-bench-")
    os.makedirs(work, exist_ok=True)
    paths = {"unfused": os.path.join(work, "step.onnx"), "optimize_for_ort": os.path.join(work, "ofo.onnx"),
             "tileflow_ort": os.path.join(work, "tileflow.onnx")}
    rng = np.random.default_rng(0)
    model = _build(args.model, args.layers)
    prompt = rng.integers(0, model.config.vocab_size, args.prompt_len).tolist()

    with Progress(console=console) as progress:
        prep = progress.add_task("export + optimize", total=3)
        tileflow.onnx.export(model, paths["unfused"])
        progress.advance(prep)
        ofo, counts = optimize_for_ort(ir.load(paths["unfused"]))
        ir.save(ofo, paths["optimize_for_ort"], external_data="ofo.onnx.data")
        del ofo
        progress.advance(prep)
        report = tileflow.onnx.optimize(paths["unfused"], paths["tileflow_ort"], target="ort")
        progress.advance(prep)

        names = [*paths, "torch_eager"]
        speeds = {n: [] for n in names}
        tokens = {}
        timing = progress.add_task("decode rounds", total=args.rounds * len(names))
        for _ in range(args.rounds):
            for name in names:
                if name == "torch_eager":
                    tps, toks = _eager_round(model, prompt, args.steps)
                else:
                    gen = tileflow.onnx.Generator(paths[name], threads=args.threads)
                    tps, toks = gen.tokens_per_second(prompt, args.steps)
                    del gen
                speeds[name].append(tps)
                tokens[name] = toks
                progress.advance(timing)

    tok_s = {n: float(np.median(v)) for n, v in speeds.items()}
    agree = {n: tokens[n] == tokens["torch_eager"] for n in names}
    result = {
        "date": datetime.date.today().isoformat(),
        "model": args.model, "num_hidden_layers": args.layers, "dtype": "float32", "batch": 1,
        "prompt_len": args.prompt_len, "decode_steps": args.steps, "rounds": args.rounds,
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "ort_providers": ort.get_available_providers(), "ort_threads": args.threads},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                     "onnxscript": onnxscript.__version__, "transformers": __import__("transformers").__version__,
                     "tileflow": tileflow.__version__},
        "git_commit": _git_commit(),
        "tok_s": tok_s, "tok_s_rounds": speeds,
        "speedup_vs_unfused": {n: tok_s[n] / tok_s["unfused"] for n in names},
        "tokens_agree_with_torch_eager": agree,
        "optimize_for_ort_counts": counts, "tileflow_matches": dict(report.matches),
        "tileflow_fallbacks": report.fallbacks,
    }
    table = Table(title=f"{args.model}, {args.layers} layers, fp32, batch 1, ORT CPU EP")
    for col in ("path", "tok/s (median)", "x unfused", "tokens == eager"):
        table.add_column(col)
    for n in names:
        table.add_row(n, f"{tok_s[n]:.2f}", f"{tok_s[n] / tok_s['unfused']:.2f}", str(agree[n]))
    console.print(table)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{result['date']}-cpu-onnx-{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
