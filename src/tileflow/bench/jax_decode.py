"""``tileflow bench --framework jax``: batch-1 greedy decode of the plain-JAX
DeepSeek decoder (``tileflow.integrations.jax.model``), side by side in one process:

- ``jax_jit``: ``jax.jit`` of the plain step (what a JAX user starts from);
- ``tileflow_jax_direct``: the step written with tileflow primitives by hand;
- ``tileflow_jax_optimize``: ``jax.jit(tileflow.jax.optimize(step))``;
- on a GPU or TPU, ``tileflow_jax_direct_pallas``: the direct step traced under the
  target ``pallas`` (``tfj.targeting``; on CUDA with jax_triton the default target runs the
  generated Triton kernels; this is the Pallas form beside it).

Each path is timed twice: a Python loop calling the jitted step per token (as most JAX
decode loops are written), and all decode steps inside one jit (``lax.fori_loop``),
which takes the per-token dispatch of the parameter pytree off the clock.

Same protocol as the torch bench (/work/shared/BENCHMARKING.md): same weights and
prompt for every path, the cache donated so XLA updates it in place, decode tok/s =
(new - 1) / decode-loop time after a warm-up run (compilation), prefill timed apart
(here a ``lax.scan`` of the decode step over the prompt), the roofline from a copy
measured by the torch bench's helper, greedy tokens and first-step logits compared
with ``jax_jit``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from tileflow import settings

PATHS = ("jax_jit", "tileflow_jax_direct", "tileflow_jax_optimize", "tileflow_jax_direct_pallas")


def _under_target(fn: Callable, target: str) -> Callable:
    """``fn`` with the JAX target ``target`` while it runs (``tfj.targeting``): primitives
    read the target when they are bound, i.e. while ``jit`` traces ``fn``."""
    from tileflow.integrations.jax.primitives import targeting

    @functools.wraps(fn)
    def run(*args):
        with targeting(target):
            return fn(*args)

    return run


def _step_fns(cfg) -> dict:
    import jax

    from tileflow import jax as tfj
    from tileflow.integrations.jax import model as M

    fns = {"jax_jit": functools.partial(M.decode_step, cfg),
           "tileflow_jax_direct": functools.partial(M.decode_step_tileflow, cfg),
           "tileflow_jax_optimize": tfj.optimize(functools.partial(M.decode_step, cfg))}
    if jax.default_backend() != "cpu":
        fns["tileflow_jax_direct_pallas"] = _under_target(functools.partial(M.decode_step_tileflow, cfg), "pallas")
    return fns


def default_target_kernels() -> str:
    """What the ``auto`` target runs here (recorded with the results)."""
    import jax

    from tileflow.integrations.jax.lowering import triton_available

    backend = jax.default_backend()
    if backend == "cpu":
        return "the jax.numpy reference"
    if backend in ("gpu", "cuda", "rocm") and triton_available():
        return "the generated Triton kernels (XLA custom calls, kernels compiled by jax_triton)"
    return "the generated Pallas kernels"


def _decode_once(step: Callable, prefill: Callable, params, ids, cache, new_tokens: int, keep_logits: int = 0):
    import jax.numpy as jnp

    n = ids.shape[1]
    t0 = time.perf_counter()
    logits, cache = prefill(params, ids, cache)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tok.block_until_ready()
    t1 = time.perf_counter()
    toks, kept = [tok], []
    for i in range(new_tokens - 1):
        logits, cache = step(params, tok, cache, jnp.int32(n + i))
        if i < keep_logits:
            kept.append(logits)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        toks.append(tok)
    tok.block_until_ready()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [int(t[0]) for t in toks], kept, cache


def _device_loop(step: Callable, new_tokens: int) -> Callable:
    """All ``new_tokens - 1`` decode steps in one jit (``lax.fori_loop``), the greedy
    tokens gathered on the device: what the kernels cost without a Python dispatch of
    the parameter pytree per token (the host-side loop's bound on a GPU)."""
    import jax
    import jax.numpy as jnp

    def generate(params, tok, cache, start):
        def body(i, carry):
            tok, cache, toks = carry
            logits, cache = step(params, tok, cache, start + i)
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return tok, cache, toks.at[i + 1].set(tok[0])

        toks = jnp.zeros((new_tokens,), jnp.int32).at[0].set(tok[0])
        return jax.lax.fori_loop(0, new_tokens - 1, body, (tok, cache, toks))

    return jax.jit(generate, donate_argnums=(2,))


def _time_device_loop(fn: Callable, prefill: Callable, params, ids, cache, new_tokens: int, repeats: int):
    """(best decode tok/s over ``repeats``, its tokens, the cache it returned)."""
    import jax
    import jax.numpy as jnp

    n = ids.shape[1]
    gen = _device_loop(fn, new_tokens)
    best, toks = 0.0, None
    for r in range(repeats + 1):  # the first run compiles
        cache = jax.tree_util.tree_map(lambda c: c * 0, cache)
        logits, cache = prefill(params, ids, cache)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok.block_until_ready()
        t0 = time.perf_counter()
        _, cache, out = gen(params, tok, cache, jnp.int32(n))
        out.block_until_ready()
        dt_ = time.perf_counter() - t0
        if r and (new_tokens - 1) / dt_ > best:
            best, toks = (new_tokens - 1) / dt_, [int(t) for t in out]
    return best, toks, cache


def _run_path(name: str, fn: Callable, cfg, params, ids, new_tokens: int, repeats: int, max_len: int, dtype,
              reference: Optional[dict], say: Callable) -> dict:
    import jax
    import numpy as np

    from tileflow.integrations.jax import model as M

    res = {"decode_tok_s": float("nan"), "device_loop_tok_s": float("nan"), "ttft_s": float("nan"),
           "compile_s": 0.0, "runs_tok_s": [],
           "first_divergence": None, "max_rel_logit_err": None, "error": ""}
    try:
        step = jax.jit(fn, donate_argnums=(2,))
        prefill = jax.jit(functools.partial(M.prefill, step), donate_argnums=(2,))
        say(f"{name}: warm-up (compile)")
        t0 = time.perf_counter()
        ttft, dec, _, _, cache = _decode_once(step, prefill, params, ids, M.init_cache(cfg, 1, max_len, dtype),
                                              new_tokens)
        warm = time.perf_counter() - t0
        best = None
        for r in range(repeats):
            say(f"{name}: run {r + 1}/{repeats}")
            cache = jax.tree_util.tree_map(lambda c: c * 0, cache)  # same shapes: no recompilation
            out = _decode_once(step, prefill, params, ids, cache, new_tokens, keep_logits=8)
            # the cache passed in was donated (deleted on GPU/TPU; CPU ignores donation):
            # the next run starts from the one this run returned
            cache = out[4]
            res["runs_tok_s"].append((new_tokens - 1) / out[1])
            if best is None or out[1] < best[1]:
                best = out
        ttft_b, dec_b, toks, logits, _ = best
        say(f"{name}: decode loop inside one jit")
        dl_tok_s, dl_toks, cache = _time_device_loop(step, prefill, params, ids, cache, new_tokens, repeats)
        res["device_loop_tok_s"] = dl_tok_s
        res["device_loop_tokens_equal_host_loop"] = dl_toks == toks
        res.update(decode_tok_s=max(res["runs_tok_s"]), ttft_s=ttft_b, compile_s=max(0.0, warm - ttft_b - dec_b),
                   tokens=toks)
        res["_logits"] = [np.asarray(x, np.float64) for x in logits]
        if reference is not None:
            diff = [i for i, (a, b) in enumerate(zip(toks, reference["tokens"])) if a != b]
            res["first_divergence"] = diff[0] if diff else None
            n = min(len(logits), diff[0] if diff else len(logits))
            errs = [float(np.linalg.norm(a - b) / np.linalg.norm(b))
                    for a, b in zip(res["_logits"][:n], reference["_logits"][:n])]
            res["max_rel_logit_err"] = max(errs) if errs else None
    except Exception as e:  # noqa: BLE001 - a failing path is reported, the others still run
        res["error"] = f"{type(e).__name__}: {e}"[:800]
    return res


def run_jax_bench(model_name: Optional[str] = None, prompt: int = 128, new_tokens: int = 256, repeats: int = 3,
                  out_dir: str = "benchmarks/results", dtype: Optional[str] = None,
                  paths: Optional[list] = None) -> dict:
    """Run the JAX side-by-side decode benchmark; returns the record (also written)."""
    # JAX would take 75% of the GPU up front; the torch copy measurement needs room too
    settings.library_default("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import torch
    from rich.console import Console

    from tileflow.bench import _commit, versions
    from tileflow.bench.models import build_model
    from tileflow.bench.roofline import bytes_per_token, copy_bandwidth_gbs
    from tileflow.integrations.jax import model as M

    console = Console(width=150)
    backend = jax.default_backend()
    gpu = backend in ("gpu", "cuda", "rocm")
    model_name = model_name or ("deepseek-r1-distill-qwen-1.5b" if backend != "cpu" else "tiny")
    dname = dtype or ("bf16" if backend != "cpu" else "fp32")
    jdtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[dname]
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dname]
    dev = jax.devices()[0]
    device = dev.device_kind if backend != "cpu" else f"cpu ({os.cpu_count()} cores)"
    say = lambda s: console.print(f"  .. {s}")  # noqa: E731
    from tileflow.bench.checks import BenchError, available_bytes, check_memory, count_text, estimate
    from tileflow.bench.models import model_config

    config = model_config(model_name)
    if config.model_type not in ("qwen2", "llama"):  # the JAX model is the R1-Distill family's
        raise BenchError(f"{model_name}: the jax bench runs qwen2 and llama models, not {config.model_type!r}")
    folder = os.path.isdir(model_name)
    if folder and not any(f.endswith(".safetensors") for f in os.listdir(model_name)):
        raise BenchError(f"{model_name}: the jax bench reads *.safetensors, and there are none")
    est = estimate(config, tdtype, torch.device("cpu"), prompt + new_tokens)
    if not folder and backend == "cpu":  # the torch model and its jax copy, both in host memory
        est.copies = 2
    check_memory(est, model_name, torch.device("cpu"), available_bytes(torch.device("cpu")))
    say(f"building {model_name} ({dname}, {count_text(est.parameters)} parameters)")
    if folder:
        cfg, params = M.from_checkpoint(model_name, jdtype)  # straight from safetensors: no torch copy
        tmodel = None
    else:
        tmodel = build_model(model_name, torch.device("cpu"), tdtype)
        cfg, params = M.from_transformers(tmodel, jdtype)
    max_len = -(-(prompt + new_tokens) // 64) * 64  # whole attention blocks: no padded cache copies
    if tmodel is not None:
        nbytes = bytes_per_token(tmodel, prompt + new_tokens // 2)
        del tmodel
    else:
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
        emb = params["embed"]
        if not cfg.tie_embeddings:
            weights -= emb.size * emb.dtype.itemsize - emb.shape[1] * emb.dtype.itemsize
        kv = 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * (prompt + new_tokens // 2) * jnp.dtype(jdtype).itemsize
        nbytes = {"weights": int(weights), "kv_cache": int(kv), "total": int(weights + kv)}
    say("measuring copy bandwidth")
    tdev = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    bw = copy_bandwidth_gbs(tdev)
    if tdev.type == "cuda":
        torch.cuda.empty_cache()
    rng = torch.Generator().manual_seed(0)
    ids = jnp.asarray(torch.randint(0, cfg.vocab, (1, prompt), generator=rng).numpy().astype("int32"))
    record = {
        "what": "batch-1 greedy decode, plain JAX vs tileflow primitives, side by side in one process",
        "framework": "jax", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "jax_backend": backend, "versions": versions(), "commit": _commit(), "model": model_name,
        "dtype": dname, "prompt_tokens": prompt, "new_tokens": new_tokens, "repeats": repeats,
        "cache_capacity": max_len, "copy_bandwidth_gbs": bw, "bytes_per_token": nbytes,
        "roofline_tok_s": bw * 1e9 / nbytes["total"],
        "notes": "prefill is a lax.scan of the decode step (TTFT not comparable with the torch bench's); "
                 "device_loop_tok_s (all steps inside one jit) is the measure of the kernels, decode_tok_s (a "
                 "Python loop) is bound by dispatching the parameter pytree; long-context point not measured here",
        "default_target_runs": default_target_kernels(),
        "paths": {},
    }
    reference = None
    for name, fn in _step_fns(cfg).items():
        if paths and name not in paths and name != "jax_jit":
            continue
        res = _run_path(name, fn, cfg, params, ids, new_tokens, repeats, max_len, jdtype, reference, say)
        if name == "jax_jit":
            reference = res
        if name == "tileflow_jax_optimize" and not res["error"]:
            from tileflow import jax as tfj

            rep = tfj.explain(fn, params, ids[:, 0], M.init_cache(cfg, 1, max_len, jdtype),
                          jnp.int32(prompt))
            res["matches"] = dict(rep.matches)
            res["fallbacks"] = [list(f) for f in rep.fallbacks]
        res["fraction_of_roofline"] = res["decode_tok_s"] / record["roofline_tok_s"]
        res["device_loop_fraction_of_roofline"] = res["device_loop_tok_s"] / record["roofline_tok_s"]
        record["paths"][name] = res
        console.print(f"  {name:<24} {res['decode_tok_s']:9.1f} tok/s (host loop) "
                      f"{res['device_loop_tok_s']:9.1f} tok/s (loop in jit)  ttft {res['ttft_s'] * 1e3:8.1f} ms"
                      + (f"  ERROR {res['error'][:300]}" if res["error"] else ""))
    jit = record["paths"].get("jax_jit", {})
    for name, v in record["paths"].items():
        if name != "jax_jit":
            v["ratio_to_jax_jit"] = v["decode_tok_s"] / jit.get("decode_tok_s", float("nan"))
            v["device_loop_ratio_to_jax_jit"] = v["device_loop_tok_s"] / jit.get("device_loop_tok_s", float("nan"))
    for v in record["paths"].values():
        v.pop("_logits", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = device.split(" (")[0].replace(" ", "-")
    path = out / f"{record['date'][:10]}-{slug}-jax-decode-{Path(model_name).name}-p{prompt}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    console.print(f"roofline {record['roofline_tok_s']:.0f} tok/s (copy {bw:.0f} GB/s); wrote {path}")
    return record
