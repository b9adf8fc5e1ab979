"""``tileflow bench``: batch-1 greedy decode, side by side in one process.

Follows the project's benchmarking protocol: the same model object and prompt for
every path; decode tok/s = (new tokens - 1) / decode-loop time after warm-up and
compilation; time to first token apart; the roofline from a copy measured in the
same run; greedy-token agreement with eager. Writes
``<out>/<date>-<device>-decode-<model>.json`` and a PNG beside it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from tileflow.bench.decode import PathResult, _Patch, default_paths, forced_reference, paths_not_here, run_path
from tileflow.bench import checks
from tileflow.bench.checks import BenchError, resolve_device
from tileflow.bench.models import build_model, fp8_checkpoint_folder, model_config
from tileflow.bench.roofline import (bytes_per_token, copy_bandwidth_gbs, fp8_checkpoint_bytes_per_token,
                                     quantized_bytes_per_token)

# a path's quantization figures: in its entry only where measured
QUANTIZED_FIELDS = ("quantization_error_max", "quantization_error_per_layer", "forced_steps",
                    "forced_max_rel_logit_err", "forced_max_abs_logit_err", "forced_top1_agreement",
                    "projection_bytes")
# the torchao paths' peers among the quantized patch paths' formats (the same bytes a weight)
TORCHAO_PEER = {"int4": "torchao_int4", "fp8": "torchao_int8"}
# what a quantized record's roofline counts, in the table's title
WEIGHT_BYTES = {"int4": "int4 projections (packed, + scale and zero per 128 columns)",
                "fp8": "fp8 projections (+ an fp32 scale per 128 x 128 block)"}
# the fp8 checkpoint form (``--weights fp8-checkpoint``, an fp8 checkpoint folder, or ``--weights fp8``
# where the model-dtype build cannot be quantized at patch time): the paths that do not patch it
# cannot run, and what compares with the model-dtype model is not measured
CHECKPOINT_NOT_RUN = ("the fp8 checkpoint form has no projection in the model's dtype, and transformers' FP8Linear "
                      "computes only on CUDA through DeepGEMM or a kernel fetched from the Hub (`kernels`), which the "
                      "bench does not fetch (on CPU it has no path)")
CHECKPOINT_NOT_MEASURED = {
    "first_divergence": "eager did not run (the fp8 checkpoint form): no eager tokens or logits to compare with",
    "quantization_error_per_layer": "the checkpoint's fp8 weights are the model: no model-dtype weights to measure "
                                    "their error against (activation_error_*: the activations' rounding alone, "
                                    "against the dequantized weights)",
    "forced_top1_agreement": "eager did not run (the fp8 checkpoint form): no eager logits to teacher-force against",
}


def versions() -> dict:
    """Versions of python, torch, triton, jax, transformers and the GPU driver."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "jax", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    if torch.cuda.is_available():
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            out["driver"] = None
    return out


def _commit() -> str:
    from tileflow import settings as options

    env = options.commit()
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def settings() -> dict:
    """The options of this run that differ from their defaults, by environment name
    (``TILEFLOW_*``; A/B runs differ only in these)."""
    from tileflow import settings as options

    return options.changed()


def _user_autotune() -> dict:
    """The user tuning entries in effect (key -> parameters): an A/B through a tuning
    file differs only in these, so the record names them."""
    from tileflow.emit import autotune

    return {k: v.get("params", v) for k, v in sorted(autotune.user_table().items()) if isinstance(v, dict)}


def run_bench(model_name: Optional[str] = None, prompt: int = 128, new_tokens: int = 256,
              paths: Optional[list[str]] = None, repeats: int = 3, out_dir: Optional[str] = None,
              device: Optional[str] = None, dtype: Optional[str] = None, breakdown: bool = False,
              batch: int = 1, speculate: Optional[str] = None, layers: Optional[int] = None,
              weights: Optional[str] = None) -> dict:
    """Run the side-by-side decode benchmark; returns the result record (also written, under
    ``out_dir``: by default ``~/.cache/tileflow/results``, outside the source tree).
    ``breakdown``: also profile each static-cache path's decode step per kernel class (CUDA).
    ``batch`` > 1: also ``generate`` on that many left-padded prompts per path (aggregate
    tok/s) and the patched step's cost at M rows against one (``bench/rows.py``).
    ``speculate``: ``lookup:K`` (prompt lookup on a prompt whose continuation repeats) or
    ``draft:K:MODEL`` (MODEL's draft round against this model's verify step).
    ``layers``: only the model's first N decoder layers (its real widths; the record says so).
    ``weights``: "int4" / "fp8": the patch paths quantize the projections (``options={"weights":
    ...}``), eager and inductor run the model's dtype; the roofline counts the format's bytes
    (``roofline_tok_s``) beside the model dtype's (``roofline_tok_s_model_dtype``), and each
    quantized path its teacher-forced logit error and top-1 agreement against eager. On CUDA
    torchao's int8 / int4 weight-only paths run too (``decode.torchao_path``), each against the
    roofline of its own bytes. None: the ``weights`` option in force (``TILEFLOW_WEIGHTS``, by
    default the model's dtype). "fp8-checkpoint" (and "fp8" where the model in its dtype does not
    fit the device's free memory, or on CUDA its projections the host's, which the patch moves
    there: ``checks.quantize_at_patch_problem``; a local fp8 checkpoint folder always): the model
    built in the fp8 checkpoint form (``fp8_checkpoint.py``: FP8Linear projections made on the
    device, never a copy in the model's dtype), only the paths that patch it run (the rest recorded
    ``not_run``, ``CHECKPOINT_NOT_RUN``), the eager comparisons ``not_measured``; the record's
    ``weights_form`` / ``weights_form_why`` say which form and why, ``device_bytes_estimate`` what
    the device was counted to hold (``checks.estimate_fp8_checkpoint``: 72.8 GB for the 70B).
    Raises :class:`BenchError` (one line) before building anything it cannot run or fit."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(width=150)
    if out_dir is None:
        out_dir = os.path.join(os.path.expanduser("~"), ".cache", "tileflow", "results")
    if prompt < 1 or new_tokens < 2 or repeats < 1 or batch < 1:
        raise BenchError(f"prompt {prompt}, new tokens {new_tokens}, repeats {repeats}, batch {batch}: "
                         "at least 1, 2, 1 and 1")
    spec = None
    if speculate:
        from tileflow.bench.rows import speculate_spec

        try:
            spec = speculate_spec(speculate)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
    from tileflow import settings as tileflow_settings

    asked = weights
    weights = weights or tileflow_settings.resolve().weights  # TILEFLOW_WEIGHTS patches the paths alike
    if weights not in ("model", "int4", "fp8", "fp8-checkpoint"):
        raise BenchError(f"weights {weights!r}: int4, fp8 or fp8-checkpoint")
    if asked and asked != "model" and (batch > 1 or spec):
        # rows.py patches with the options in force, not this argument
        raise BenchError(f"--weights {asked} with --batch / --speculate: the multi-row measurements would run the "
                         f"model's dtype; set TILEFLOW_WEIGHTS={asked} instead (every patch then quantizes)")
    dev = resolve_device(device)
    if model_name is None:
        model_name = "deepseek-r1-distill-qwen-1.5b" if dev.type == "cuda" else "tiny"
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    config = model_config(model_name, layers)
    form = None  # why the model is built in the fp8 checkpoint form (FP8Linear projections), when it is
    if fp8_checkpoint_folder(model_name):
        if weights == "int4":
            raise BenchError(f"{model_name} is a fine-grained fp8 checkpoint: --weights int4 would re-quantize its fp8 "
                             f"weights (not done)")
        weights, form = "fp8", "a fine-grained fp8 checkpoint folder (its FP8Linear tensors as stored)"
    elif weights == "fp8-checkpoint":
        weights, form = "fp8", "asked (--weights fp8-checkpoint)"
    if weights != "model" and config.model_type not in ("qwen2", "llama"):
        raise BenchError(f"--weights {weights}: quantized projections are for qwen2 / llama models, not "
                         f"{config.model_type}")
    longest = getattr(config, "max_position_embeddings", None)
    if longest and prompt + new_tokens > longest:
        raise BenchError(f"prompt {prompt} + {new_tokens} new = {prompt + new_tokens} tokens, more than "
                         f"{model_name}'s max_position_embeddings {longest}")
    est = checks.estimate(config, tdtype, dev, prompt + new_tokens)
    free = checks.available_bytes(dev)
    if weights == "fp8":  # the checkpoint form where asked, or where quantizing at patch time cannot be done
        fp8_est = checks.estimate_fp8_checkpoint(config, tdtype, prompt + new_tokens)
        if form is None:
            host = checks.available_bytes(torch.device("cpu")) if dev.type == "cuda" else None
            why = checks.quantize_at_patch_problem(est, fp8_est.projections * est.bytes_per_parameter, dev, free, host)
            form = why and f"--weights fp8: {why}"
        if form:
            est = fp8_est
            if dev.type == "cpu" and not tileflow_settings.resolve().cpu:
                raise BenchError(f"{model_name} in the fp8 checkpoint form on cpu: tileflow.patch leaves models unchanged "
                                 f"on CPU and FP8Linear has no CPU path (TILEFLOW_CPU=1 runs the verified reference)")
    checks.check_memory(est, model_name, dev, free, config.num_hidden_layers)
    if breakdown and dev.type != "cuda":
        print("tileflow bench: warning: --breakdown profiles CUDA kernels: nothing to profile on cpu", file=sys.stderr)
    if dev.type == "cpu":
        from tileflow.runtime.torch_triton import use_interpreter_if_no_gpu

        use_interpreter_if_no_gpu()
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    record = {
        "what": "batch-1 greedy decode, side by side in one process",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": versions(), "commit": _commit(), "settings": settings(), "user_autotune": _user_autotune(), "model": model_name, "dtype": str(tdtype).split(".")[-1],
        "prompt_tokens": prompt, "new_tokens": new_tokens, "repeats": repeats, "paths": {},
        "batch": batch, "speculate": speculate, "layers": config.num_hidden_layers, "weights": weights,
        # how the projections came to be in the weights' format: "model" (none), "quantized at patch"
        # (the model built in its dtype, quantized by tileflow.patch) or "fp8 checkpoint" (FP8Linear as
        # built or loaded, fp8_checkpoint.py), with why; the device bytes the bench counted on
        "weights_form": "fp8 checkpoint" if form else "model" if weights == "model" else "quantized at patch",
        "weights_form_why": form, "device_bytes_estimate": est.total_bytes, "device_bytes_detail": est.detail or None,
    }
    chosen = [p for p in default_paths(dev, weights) if not paths or p.name in paths or p.name == "eager"]
    # paths asked for (by name, or the torchao comparison by --weights) that do not apply here
    elsewhere = {k: v for k, v in paths_not_here(dev, weights).items()
                 if (k in paths if paths else weights != "model" and k.startswith("torchao"))}
    for name, why in elsewhere.items():
        print(f"tileflow bench: warning: {name} not run: {why}", file=sys.stderr)
    record["not_shown"] = elsewhere
    if form:  # no weights in the model's dtype: only the paths that patch the model as built run
        chosen = [p if isinstance(p.setup, _Patch) else dataclasses.replace(p, unavailable=lambda m: CHECKPOINT_NOT_RUN)
                  for p in chosen]
    console.print(f"building {model_name}: {config.model_type}, {checks.count_text(est.parameters)} parameters in "
                  f"{est.dtype}, about {checks.size_text(est.total_bytes)} with the KV cache"
                  + (f" ({checks.size_text(free)} available on {dev})" if free else ""), markup=False, highlight=False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("measuring copy bandwidth", total=None)

        def say(s):  # no spinner off a terminal: a line, so a long run is never silent
            progress.update(task, description=s)
            if not console.is_terminal:
                console.print(f"  .. {s}", markup=False, highlight=False)

        bw = copy_bandwidth_gbs(dev)  # before the build: the time estimate reads it
        note = checks.warning(est, model_name, dev, bw, len(chosen) * (repeats + 1) * (new_tokens - 1), free)
        if note:
            print(f"tileflow bench: warning: {note}", file=sys.stderr)
        say(f"building {model_name}")
        model = build_model(model_name, dev, tdtype, layers, fp8_checkpoint=bool(form))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=gen).to(dev)
        context = prompt + new_tokens // 2
        if form:  # the fp8 bytes as they lie; the model-dtype figure as if its projections were in it
            nbytes, plain = fp8_checkpoint_bytes_per_token(model, context)
        else:
            plain = bytes_per_token(model, context)
            nbytes = plain if weights == "model" else quantized_bytes_per_token(model, context, weights)
        record.update(copy_bandwidth_gbs=bw, bytes_per_token=nbytes, roofline_tok_s=bw * 1e9 / nbytes["total"],
                      bytes_per_token_model_dtype=plain, roofline_tok_s_model_dtype=bw * 1e9 / plain["total"])
        reference: Optional[PathResult] = None
        ref_logits = None
        forced = None
        tokens: dict = {}
        for path in chosen:
            res, logits = run_path(path, model, ids, new_tokens, repeats, reference, ref_logits, say,
                                   breakdown=breakdown, forced=forced)
            if path.name == "eager" and not res.not_run:
                reference, ref_logits = res, logits
                if weights != "model" and not res.error:
                    say("eager: logits teacher-forced on its own tokens (the quantized paths' reference)")
                    forced = forced_reference(model, ids, res.tokens)
            entry = {k: v for k, v in res.__dict__.items()
                     if k not in ("name", "tokens") and not (v is None and k in QUANTIZED_FIELDS)
                     and not (k == "not_run" and not v)}
            if form and res.weights == "fp8":  # what compares with a model-dtype model: not measured, and why
                _checkpoint_entry(entry)
            tokens[path.name] = res.tokens
            if path.generate is not None and tokens.get("tileflow_patch"):  # the user's call vs our loop
                diff = [i for i, (a, b) in enumerate(zip(res.tokens, tokens["tileflow_patch"])) if a != b]
                entry["first_divergence_vs_patch"] = diff[0] if diff else None
            # against the roofline of the bytes this path read (eager, inductor: the model's dtype)
            roof = record["roofline_tok_s"] if res.weights != "model" else record["roofline_tok_s_model_dtype"]
            if res.projection_bytes:  # a layout of its own (torchao's): the roofline of its bytes
                own = dict(plain)
                own["weights"] += res.projection_bytes["projections"] - res.projection_bytes["projections_model_dtype"]
                own["total"] = own["weights"] + own["kv_cache"]
                roof = bw * 1e9 / own["total"]
                entry.update(bytes_per_token=own, roofline_tok_s=roof)
            entry["fraction_of_roofline"] = res.decode_tok_s / roof
            record["paths"][path.name] = entry
            if res.not_run:
                console.print(f"  {path.name:<20} not run: {res.not_run}", markup=False, highlight=False)
            else:
                console.print(f"  {path.name:<20} {res.decode_tok_s:9.1f} tok/s  ttft {res.ttft_s * 1e3:8.1f} ms"
                              f"  compile {res.compile_s:6.1f} s" + (f"  ERROR {res.error[:200]}" if res.error else ""))
            _json_path(record, out_dir).write_text(json.dumps(record, indent=1, default=str))  # a cut run keeps these
        if batch > 1 or spec:
            _rows(record, model, ids, new_tokens, repeats, batch, spec, dev, tdtype, say, out_dir)
    # the best model-dtype path that is not ours (eager, inductor, inductor + CUDA graphs); the
    # quantized patch paths also against torchao's path of the same bytes a weight
    others = [v["decode_tok_s"] for k, v in record["paths"].items()
              if not k.startswith(("tileflow", "torchao")) and v["decode_tok_s"] == v["decode_tok_s"]]
    best_other = max(others) if others else float("nan")
    eager_mem = record["paths"].get("eager", {}).get("peak_memory_gb")
    for k, v in record["paths"].items():
        if k.startswith("tileflow"):
            v["ratio_to_best_other"] = v["decode_tok_s"] / best_other
            peer = TORCHAO_PEER.get(v.get("weights"))
            peer_tok = record["paths"].get(peer, {}).get("decode_tok_s")
            if peer_tok is not None and peer_tok == peer_tok:  # ran (not nan)
                v["torchao_peer"], v["ratio_to_torchao_peer"] = peer, v["decode_tok_s"] / peer_tok
        if eager_mem and v.get("peak_memory_gb"):
            v["peak_memory_vs_eager"] = v["peak_memory_gb"] / eager_mem
    _write(record, out_dir, console)
    return record


def _checkpoint_entry(entry: dict) -> None:
    """A patch path's entry in the fp8 checkpoint form: the eager comparisons dropped (no eager
    ran: their None would read as "identical"), the patch report's errors kept as what they are
    there (the activations' rounding against the dequantized checkpoint weights), and why the
    rest is not measured (``CHECKPOINT_NOT_MEASURED``)."""
    for key in ("first_divergence", "max_rel_logit_err", "divergence_gap", "divergence_max_abs_err"):
        entry.pop(key, None)
    if "quantization_error_max" in entry:
        entry["activation_error_max"] = entry.pop("quantization_error_max")
        entry["activation_error_per_layer"] = entry.pop("quantization_error_per_layer", None)
    entry["not_measured"] = dict(CHECKPOINT_NOT_MEASURED)


def _rows(record, model, ids, new_tokens, repeats, batch, spec, dev, tdtype, say, out_dir) -> None:
    """The multi-row measurements (``bench/rows.py``) into ``record``, each written as it
    ends; one that fails records its error and the others still run."""
    from tileflow.bench import rows

    def piece(key, measure):
        try:
            record[key] = measure()
        except Exception as exc:  # noqa: BLE001 - a failed measurement is a result, not the end of the run
            record[key] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
            say(f"{key}: {record[key]['error']}")
        _json_path(record, out_dir).write_text(json.dumps(record, indent=1, default=str))

    if batch > 1:
        bids, mask = rows.padded_batch(model.config.vocab_size, batch, ids.shape[1], dev)
        piece("batch_paths", lambda: rows.batch_paths(model, bids, mask, new_tokens, repeats, say))
        patch = record["paths"].get("tileflow_patch", {}).get("decode_tok_s")
        for v in record["batch_paths"].values():
            if isinstance(v, dict) and patch and v.get("decode_tok_s"):
                v["vs_batch1_patch"] = v["decode_tok_s"] / patch
        piece("step_cost", lambda: rows.step_cost(model, ids, tuple(m for m in (1, 2, 4, 8, 16) if m <= max(batch, 16)),
                                                  progress=say))
    if spec is not None:
        kind, k, draft_name = spec
        if kind == "lookup":
            prompt = rows.repeating_prompt(model, ids, new_tokens)
            piece("speculation", lambda: rows.lookup_speculation(model, prompt, new_tokens, k, repeats, say))
        else:
            def draft_round():
                say(f"building the draft model {draft_name}")
                draft = build_model(draft_name, dev, tdtype)
                return {"draft_model": draft_name, **rows.draft_round(model, draft, ids, k, repeats, say)}

            piece("speculation", draft_round)


def _json_path(record: dict, out_dir: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = record["device"].split(" (")[0].replace(" ", "-")
    model_slug = Path(record["model"]).name or "model"  # a checkpoint folder: its name only
    return out / f"{record['date'][:10]}-{slug}-decode-{model_slug}-p{record['prompt_tokens']}.json"


def _write(record: dict, out_dir: str, console) -> None:
    from rich.table import Table

    path = _json_path(record, out_dir)
    path.write_text(json.dumps(record, indent=1, default=str))
    fmt = record.get("weights", "model")
    quantized = fmt != "model"
    if quantized:  # which bytes each roofline counts; % roofline is against the one of the bytes the path read
        roof = (f"roofline {record['roofline_tok_s']:.0f} tok/s counting {WEIGHT_BYTES[fmt]}, the embedding row, "
                f"norms, lm_head and KV cache in {record['dtype']}; {record['roofline_tok_s_model_dtype']:.0f} tok/s "
                f"counting {record['dtype']} weights")
    else:
        roof = f"roofline {record['roofline_tok_s']:.0f} tok/s"
    form = " (the fp8 checkpoint form)" if record.get("weights_form") == "fp8 checkpoint" else ""
    table = Table(title=f"{record['model']} {record['dtype']}{form} on {record['device']}: prompt "
                        f"{record['prompt_tokens']}, {record['new_tokens']} new, {roof} "
                        f"(copy {record['copy_bandwidth_gbs']:.0f} GB/s)")
    cols = ["path", "decode tok/s", "% roofline", "TTFT ms", "compile s", "peak GB", "tokens = eager", "max logit err"]
    if quantized:
        cols += ["weights", "quant err", "forced err", "forced top-1"]
    for col in cols:
        table.add_column(col, no_wrap=col == "path")
    for name, v in record["paths"].items():
        if v.get("not_run"):
            table.add_row(name, "not run", *["-"] * (len(cols) - 2))
            continue
        div = v.get("first_divergence")
        agree = "-" if name == "eager" else ("all" if div is None else f"first {div}")
        if v.get("divergence_gap") is not None:  # eager's margin there vs this path's deviation
            agree += f" (gap {v['divergence_gap']:.2g} / err {v['divergence_max_abs_err']:.2g})"
        err = v.get("max_rel_logit_err")
        if v.get("not_measured"):  # the fp8 checkpoint form: no eager to compare with
            agree = "not measured"
        mem = v.get("peak_memory_gb")
        row = [name, f"{v['decode_tok_s']:.1f}", f"{100 * v['fraction_of_roofline']:.1f}",
               f"{1e3 * v['ttft_s']:.1f}", f"{v['compile_s']:.1f}", "-" if mem is None else f"{mem:.2f}",
               agree, "-" if err is None else f"{err:.1e}"]
        if quantized:
            q, f_err, top1 = (v.get(k) for k in ("quantization_error_max", "forced_max_rel_logit_err",
                                                  "forced_top1_agreement"))
            row += [v.get("weights", "model"), "-" if q is None else f"{q:.1e}",
                    "-" if f_err is None else f"{f_err:.1e}",
                    "-" if top1 is None else f"{100 * top1:.1f}% of {v['forced_steps']}"]
            if v.get("not_measured"):
                row[-3:] = ["not measured"] * 3
        table.add_row(*row)
    console.print(table)
    if record.get("weights_form") == "fp8 checkpoint":
        console.print(f"  fp8 checkpoint form: {record.get('weights_form_why')}; on the device about "
                      f"{checks.size_text(record['device_bytes_estimate'])} ({record.get('device_bytes_detail')})",
                      markup=False, highlight=False)
        measured = next((v["not_measured"] for v in record["paths"].values() if v.get("not_measured")), {})
        for what, why in measured.items():
            console.print(f"  not measured: {what}: {why}", markup=False, highlight=False)
    for name, v in record["paths"].items():
        if v.get("not_run"):
            console.print(f"  {name}: not run: {v['not_run']}", markup=False, highlight=False)
        elif v.get("projection_bytes"):  # % roofline against the bytes of its own layout
            console.print(f"  {name}: % roofline of {v['roofline_tok_s']:.0f} tok/s, counting its projections as it "
                          f"holds them ({v['projection_bytes']['projections'] / 2**20:.1f} MiB; "
                          f"{v['projection_bytes']['projections_model_dtype'] / 2**20:.1f} MiB in {record['dtype']})",
                          markup=False, highlight=False)
    for name, why in record.get("not_shown", {}).items():
        console.print(f"  {name}: not shown: {why}", markup=False, highlight=False)
    for name, v in record["paths"].items():
        if v.get("breakdown"):
            _print_breakdown(name, v, console)
    _print_rows(record, console)
    try:
        _plot(record, path.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - a missing chart must not lose the record
        console.print(f"(no chart: {e})")
    console.print(f"wrote {path}")


def _print_rows(record: dict, console) -> None:
    """The multi-row results in a few lines (the record holds every run)."""
    for name, v in record.get("batch_paths", {}).items():
        if not isinstance(v, dict):
            console.print(f"  batch paths: {name} {v}")
            continue
        console.print(f"  batch {v.get('rows')}: {name:<28} {v.get('decode_tok_s', float('nan')):9.1f} tok/s"
                      f"  x{v.get('vs_batch1_patch', float('nan')):.2f} batch-1 patch"
                      + ("" if "tokens_equal_generate_eager" not in v else
                         f"  tokens = eager generate: {v['tokens_equal_generate_eager']}")
                      + (f"  patched steps {v['patched_steps']}" if "patched_steps" in v else ""))
    cost = record.get("step_cost", {})
    if "error" in cost:
        console.print(f"  step cost: {cost['error']}")
    elif cost:
        console.print("  step cost: " + "  ".join(f"{m} rows {c['step_ms']:.3f} ms (x{c['vs_one_row']:.2f})"
                                                  for m, c in cost.items() if isinstance(c, dict)))
    spec = record.get("speculation")
    if spec:
        console.print("  speculation: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in spec.items() if k != "patch_fallbacks"))


def _print_breakdown(name: str, entry: dict, console) -> None:
    from rich.table import Table

    rows = entry["breakdown"]
    step_us = 1e6 / entry["decode_tok_s"]
    t = Table(title=f"{name}: one decode step, {sum(r['us'] for r in rows):.0f} us profiled "
                    f"({step_us:.0f} us timed)")
    for col in ("kernel class", "us", "% step", "launches", "MB", "GB/s"):
        t.add_column(col)
    total = sum(r["us"] for r in rows) or 1.0
    for r in rows:
        t.add_row(r["class"], f"{r['us']:.1f}", f"{100 * r['us'] / total:.1f}", f"{r['launches']:.0f}",
                  f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-", "-" if r["gbs"] is None else f"{r['gbs']:.0f}")
    console.print(t)
    gaps = entry.get("idle_gaps") or []
    if gaps:
        console.print("idle: " + ", ".join(f"{g['after']} -> {g['before']} {g['us']:.1f} us ({g['gaps']:.1f} gaps)"
                                           for g in gaps))
        for g in gaps[:3]:  # which kernels the largest gaps sit between (older records lack it)
            if g.get("largest"):
                big = g["largest"]
                console.print(f"  {big['us']:.1f} us a token between {big['after'][:60]} and {big['before'][:60]}")


def _plot(record: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in record["paths"].items() if not v.get("not_run")]
    vals = [record["paths"][n]["decode_tok_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, vals, color=["#999" if not n.startswith("tileflow") else "#1f77b4" for n in names])
    fmt = record.get("weights", "model")
    ax.axhline(record["roofline_tok_s"], color="k", ls="--", lw=1,
               label=f"roofline {record['roofline_tok_s']:.0f} tok/s" + (f" ({fmt} bytes)" if fmt != "model" else ""))
    if fmt != "model":
        ax.axhline(record["roofline_tok_s_model_dtype"], color="k", ls=":", lw=1,
                   label=f"roofline {record['roofline_tok_s_model_dtype']:.0f} tok/s ({record['dtype']} bytes)")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tok/s (batch 1)")
    ax.set_title(f"{record['model']} {record['dtype']}"
                 + (f", {fmt} projections on the patch paths" if fmt != "model" else "")
                 + f", {record['device']}", fontsize=9)
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
