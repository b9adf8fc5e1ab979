"""Timing greedy decode, one path at a time, on the same model and prompt.

A path is how the model runs a decode step: eager transformers (dynamic cache, the
user's starting point), ``torch.compile`` with inductor (default, reduce-overhead)
on a static cache, ``torch.compile(backend="tileflow")``, or ``tileflow.patch``; with
``--weights`` on CUDA also torchao's int8 / int4 weight-only under reduce-overhead
(``torchao_paths.py``), the quantized comparison.
Prefill runs uncompiled on every path (as transformers' generate does when it
compiles) and is timed apart, as time to first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tileflow.bench.rows import time_generate
from tileflow.integrations.shared.hf import cache_keyword


@dataclass
class PathResult:
    name: str
    decode_tok_s: float = float("nan")
    ttft_s: float = float("nan")
    compile_s: float = 0.0
    tokens: list = field(default_factory=list)
    first_divergence: Optional[int] = None  # index of the first new token differing from eager
    max_rel_logit_err: Optional[float] = None  # over the first decode steps, vs eager
    # at the first divergence (when within the kept steps): eager's logit of its own token
    # minus its logit of this path's token, and this path's largest logit deviation from
    # eager there; a gap under twice the deviation is a near-tie that rounding can flip
    divergence_gap: Optional[float] = None
    divergence_max_abs_err: Optional[float] = None
    note: str = ""
    error: str = ""
    runs_tok_s: list = field(default_factory=list)
    runs_ttft_s: list = field(default_factory=list)
    # the warm-up's prompt pass. A patched model's prompt graph is keyed by the cache, which
    # the warm-up's prompt finds uninitialised: the first repeat runs the program directly,
    # the second captures, the third on replay (so REPEATS >= 3 to time the replay)
    warmup_ttft_s: float = float("nan")
    # CUDA only: peak bytes allocated while this path ran (weights, cache, its graphs and
    # workspaces), in GB; compared with eager's by the bench
    peak_memory_gb: Optional[float] = None
    # CUDA, static-cache paths, when asked: per kernel class of one decode step (breakdown.py)
    breakdown: list = field(default_factory=list)
    idle_gaps: list = field(default_factory=list)  # the step's idle time by neighbouring classes
    # the projections' format this path read: "model" (the model's dtype), "int4" or "fp8"
    # (``--weights``, when the patch quantized them: on CPU it may leave the model unchanged)
    weights: str = "model"
    # quantized paths: the patch report's measured error (max |W_q x - W x| / max |W x| on a random
    # row), the worst projection and the worst of each layer
    quantization_error_max: Optional[float] = None
    quantization_error_per_layer: Optional[dict] = None
    # quantized paths, teacher-forced on eager's tokens (prompt pass and each decode step fed
    # eager's previous token): the largest norm-wise relative and absolute logit deviation from
    # eager's logits, and the share of steps whose top-1 token is eager's
    forced_steps: Optional[int] = None
    forced_max_rel_logit_err: Optional[float] = None
    forced_max_abs_logit_err: Optional[float] = None
    forced_top1_agreement: Optional[float] = None
    # a path that could not run here (torchao not importable, int4 on a model not in bf16):
    # the one-line reason, no timing and no error
    not_run: str = ""
    # paths whose projections are in a layout of their own (torchao's): their bytes in it and in
    # the model's dtype, for the path's own roofline
    projection_bytes: Optional[dict] = None


@dataclass
class Path:
    name: str
    cache: str  # "dynamic" or "static"
    setup: Callable  # (model) -> step(tok, pos, cache) -> logits [1, V]; may patch the model
    teardown: Callable = lambda model: None
    note: str = ""
    # model.generate's keyword arguments: the path times the user's own call (its decode
    # part: a run of N new tokens less a run of one, each the best of the repeats)
    generate: Optional[dict] = None
    weights: str = "model"  # the projections' format its patch asks for (``--weights``)
    # (model) -> "" where the path can run, else why not (one line): recorded as not run
    unavailable: Optional[Callable] = None
    # the teacher-forced logits through the timed step on its own cache (reset), not an eager
    # step over the patched model: torchao's paths, whose compiled step is what was timed
    forced_on_step: bool = False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eager_step(model):
    kw = cache_keyword(model)

    def step(tok, pos, cache):
        return model(input_ids=tok, position_ids=pos, use_cache=True, **{kw: cache}).logits[:, -1]
    return step


def _compiled_step(model, **compile_kwargs):
    forward = torch.compile(model.forward, **compile_kwargs)
    kw = cache_keyword(model)

    def step(tok, pos, cache):
        return forward(input_ids=tok, position_ids=pos, use_cache=True, **{kw: cache}).logits[:, -1]
    return step


class _Patch:
    """A patch path's setup: ``tileflow.patch(model, options)``, then (``step``) the eager step
    over the patched model. Keeps the report: a model patch leaves unchanged carries none."""

    def __init__(self, options: Optional[dict], step: bool):
        self.options, self.step, self.report = options, step, None

    def __call__(self, model):
        import tileflow

        self.report = tileflow.patch(model, options=self.options)
        return _eager_step(model) if self.step else None


def _unpatch(model):
    import tileflow

    tileflow.unpatch(model)


def torchao_path(name: str) -> Path:
    """``torchao_int8`` / ``torchao_int4``: torchao's weight-only quantization of the
    projections, then ``torch.compile(mode="reduce-overhead")`` over the static-cache step
    (``torchao_paths.py``); its teardown gives the model its weights back."""
    from tileflow.bench import torchao_paths as tao

    fmt = tao.PATHS[name]
    setup = tao.TorchaoWeights(fmt, lambda m: _compiled_step(m, mode="reduce-overhead"))
    what = ("int8 weight-only, symmetric per output row" if fmt == "int8" else
            f"int4 weight-only, asymmetric per {tao.GROUP} columns (tinygemm; K padded to a multiple of 1024)")
    return Path(name, "static", setup, setup.restore, weights=fmt, forced_on_step=True,
                unavailable=lambda model: tao.unavailable(fmt, model),
                note=f"torchao {what} on q/k/v/o, gate/up/down; torch.compile(mode='reduce-overhead') "
                     f"with torchao's inductor settings")


def default_paths(device: torch.device, weights: str = "model") -> list[Path]:
    """The paths in their order (eager first: the others compare with it). ``weights`` "int4"
    / "fp8": the patch paths quantize the projections (``options={"weights": ...}``); eager and
    inductor stay the model's dtype (the comparison), and so does tileflow_compile (the torch
    backend takes no weights option; its note says so); on CUDA torchao's int8 and int4
    weight-only paths come last (quantized the same projections; :func:`torchao_path`). Last:
    torchao's quantize_ changes process-wide settings (inductor's, float32 matmul precision); its
    teardown restores them, and nothing timed after could depend on that."""
    options = None if weights == "model" else {"weights": weights}
    q = {} if options is None else {"weights": weights}
    compile_note = "" if options is None else \
        f"weights: the model's dtype (the torch backend has no {weights} projections): a model-dtype comparison"
    paths = [
        Path("eager", "dynamic", _eager_step),
        Path("inductor", "static", lambda m: _compiled_step(m, mode="default")),
        *([Path("inductor_cudagraphs", "static", lambda m: _compiled_step(m, mode="reduce-overhead"))]
          if device.type == "cuda" else []),  # no CUDA graphs on CPU: it would repeat inductor
        Path("tileflow_compile", "static", lambda m: _compiled_step(m, backend="tileflow"), note=compile_note),
        Path("tileflow_patch", "static", _Patch(options, step=True), _unpatch, **q),
        Path("tileflow_generate", "static", _Patch(options, step=False), _unpatch,
             generate={"cache_implementation": "static"},
             note="model.generate(ids, max_new_tokens=N, do_sample=False, cache_implementation='static') "
                  "on the patched model; decode = run(N) - run(1)", **q),
        Path("tileflow_generate_default_cache", "static", _Patch(options, step=False), _unpatch, generate={},
             note="model.generate(ids, max_new_tokens=N, do_sample=False) on the patched model; "
                  "decode = run(N) - run(1)", **q),
    ]
    if device.type == "cuda" and weights != "model":
        from tileflow.bench.torchao_paths import PATHS as TORCHAO

        paths += [torchao_path(name) for name in TORCHAO]
    return paths


def paths_not_here(device: torch.device, weights: str = "model") -> dict[str, str]:
    """The paths :func:`default_paths` leaves out for ``device`` and ``weights``, each with why
    (the bench says so where they were asked for)."""
    from tileflow.bench.torchao_paths import PATHS as TORCHAO

    out = {}
    if device.type != "cuda":
        out["inductor_cudagraphs"] = "CUDA graphs are CUDA-only (on cpu it would repeat inductor)"
    for name in TORCHAO:
        if device.type != "cuda":
            out[name] = (f"the torchao paths run on CUDA only (int4 is tinygemm's CUDA kernel; reduce-overhead "
                         f"without CUDA graphs would be plain inductor): not run on {device.type}")
        elif weights == "model":
            out[name] = "the torchao paths compare with the quantized patch paths: with --weights int4|fp8 only"
    return out


def make_cache(kind: str, model, max_len: int):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=max_len)


def decode_once(model, step, ids, new_tokens: int, cache, keep_logits: int = 0):
    """Prefill (uncompiled) then ``new_tokens - 1`` decode steps. Returns
    (ttft seconds, decode seconds, tokens, first ``keep_logits`` decode-step logits)."""
    device = ids.device
    n = ids.shape[1]
    positions = torch.arange(n, n + new_tokens, device=device).view(-1, 1, 1)
    logits_kept = []
    cache_kw = {cache_keyword(model): cache}  # (a signature read: kept off the prefill's clock)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, **cache_kw).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        toks = [tok]
        for i in range(new_tokens - 1):
            logits = step(tok, positions[i], cache)
            if i < keep_logits:
                logits_kept.append(logits.float().clone())
            tok = logits.argmax(-1, keepdim=True)
            toks.append(tok)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, dim=1)[0].tolist(), logits_kept


@dataclass
class Forced:
    """Eager's tokens and its teacher-forced logits over them (``teacher_forced``), the
    reference the quantized paths' logits are judged against."""

    tokens: list
    logits: torch.Tensor  # [len(tokens), V] fp32, on the host


def teacher_forced(model, step, ids, tokens: list, cache) -> torch.Tensor:
    """[len(tokens), V] fp32 logits on the host: the prompt pass's last row, then each decode
    step fed ``tokens[i]`` (whatever the model would have chosen), predicting ``tokens[i + 1]``.
    Kept on the host: a later path's peak device memory must not count them."""
    n = ids.shape[1]
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}).logits[:, -1]
        out.append(logits.float().cpu())
        for i, t in enumerate(tokens[:-1]):
            tok = torch.tensor([[t]], device=ids.device)
            pos = torch.tensor([[n + i]], device=ids.device)
            out.append(step(tok, pos, cache).float().cpu())
    return torch.cat(out)


def forced_reference(model, ids, tokens: list) -> Forced:
    """Eager transformers (dynamic cache, the model unpatched) teacher-forced over ``tokens``."""
    cache = make_cache("dynamic", model, ids.shape[1] + len(tokens))
    return Forced(list(tokens), teacher_forced(model, _eager_step(model), ids, tokens, cache))


def _record_weights(path: Path, model, ids, res: PathResult, forced: Optional[Forced],
                    progress: Callable[[str], None], step=None, cache=None) -> None:
    """For a path asking for quantized weights: the format it really read (the patch may have
    quantized nothing: on CPU without ``cpu``, or a model it declines), the report's measured
    projection errors, and its logits teacher-forced on eager's tokens against eager's (through
    ``step`` on ``cache``, reset, where the path asks: ``Path.forced_on_step``)."""
    if path.weights == "model":
        return
    report = getattr(path.setup, "report", None) or getattr(model, "_tileflow_patch", None)
    errors = dict(getattr(report, "quantized", None) or {})
    if not errors:
        why = "; ".join(f[2] for f in report.fallbacks)[:300] if report is not None else "not patched"
        res.note = (res.note + f"; weights {path.weights} asked, none quantized ({why}): the model's dtype ran"
                    ).lstrip("; ")
        return
    res.weights = path.weights
    res.quantization_error_max = max(errors.values())
    per_layer: dict = {}
    for where, err in errors.items():  # model.layers.<i>.<part>.<name>
        layer = where.rsplit(".", 2)[0]
        per_layer[layer] = max(per_layer.get(layer, 0.0), err)
    res.quantization_error_per_layer = per_layer
    if getattr(path.setup, "projections", None):  # a layout of its own: the bytes of its roofline
        res.projection_bytes = {"projections": path.setup.projections,
                                "projections_model_dtype": path.setup.projections_model_dtype}
    if forced is None:
        return
    progress(f"{path.name}: logits teacher-forced on eager's tokens")
    try:
        if path.forced_on_step and step is not None:
            cache.reset()
            got = teacher_forced(model, step, ids, forced.tokens, cache)
        else:
            cache = make_cache("static", model, ids.shape[1] + len(forced.tokens))
            got = teacher_forced(model, _eager_step(model), ids, forced.tokens, cache)
    except Exception as e:  # noqa: BLE001 - the timing stands without the accuracy figures
        res.note = (res.note + f"; teacher-forced logits failed: {type(e).__name__}: {e}")[:800]
        return
    ref = forced.logits
    res.forced_steps = int(ref.shape[0])
    res.forced_max_rel_logit_err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
    res.forced_max_abs_logit_err = (got - ref).abs().max().item()
    res.forced_top1_agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def profile_decode(model, step, ids, cache, steps: int = 32) -> tuple[list, list]:
    """The per-class breakdown (``breakdown.as_records``) and the idle gaps
    (``breakdown.idle_gaps``) of ``steps`` decode steps right after a prefill of ``ids``
    into the (reset) static ``cache``."""
    from tileflow.bench import breakdown as bd

    cache.reset()
    n = ids.shape[1]
    positions = torch.arange(n, n + steps, device=ids.device).view(-1, 1, 1)
    with torch.no_grad():
        tok = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}).logits[:, -1]
        tok = tok.argmax(-1, keepdim=True)

        def run():
            nonlocal tok
            for i in range(steps):
                tok = step(tok, positions[i], cache).argmax(-1, keepdim=True)

        timeline = bd.device_timeline(run)
    table = bd.suite_bytes(model.config, n + steps // 2, model.get_input_embeddings().weight.element_size())
    rows = bd.breakdown(timeline, steps, table)
    return bd.as_records(rows), bd.idle_gaps(timeline, steps)


def run_generate_path(path: Path, model, ids, new_tokens: int, repeats: int, res: PathResult,
                      progress: Callable[[str], None]) -> None:
    """Time ``model.generate`` itself (greedy, ``rows.time_generate``): decode tok/s = (N - 1) /
    (best run of N new tokens less best run of one), the one-token run's time as TTFT."""
    path.setup(model)
    t = time_generate(model, ids, new_tokens, repeats, {"do_sample": False, **path.generate}, progress, path.name)
    res.tokens = t["tokens"][0]
    res.ttft_s, res.runs_ttft_s = t["ttft_s"], t["runs_ttft_s"]
    res.decode_tok_s, res.runs_tok_s = t["decode_tok_s"], t["runs_tok_s"]
    res.warmup_ttft_s, res.compile_s = t["warmup_s"], t["compile_s"]
    if len(res.tokens) < new_tokens:
        res.note += f" (stopped at an end-of-sequence token after {len(res.tokens)})"
    report = getattr(model, "_tileflow_patch", None)
    if report is not None:
        res.note += f"; patched steps run: {report.steps}"


def run_path(path: Path, model, ids, new_tokens: int, repeats: int, reference: Optional[PathResult],
             ref_logits: Optional[list], progress: Callable[[str], None] = lambda s: None,
             keep_logits: int = 8, breakdown: bool = False, forced: Optional[Forced] = None
             ) -> tuple[PathResult, list]:
    """Time ``path`` on ``model``; compare its tokens and first ``keep_logits`` logits with
    ``reference`` / ``ref_logits`` (eager's). A path asking for quantized weights also records
    what ``_record_weights`` measures, against ``forced`` (eager teacher-forced), after its timing."""
    res = PathResult(path.name, note=path.note)
    max_len = ids.shape[1] + new_tokens
    cuda = ids.device.type == "cuda"
    why = path.unavailable(model) if path.unavailable is not None else ""
    if why:
        res.not_run = why
        progress(f"{path.name}: not run: {why}")
        return res, []
    try:
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ids.device)
        if path.generate is not None:
            run_generate_path(path, model, ids, new_tokens, repeats, res, progress)
            if cuda:
                res.peak_memory_gb = torch.cuda.max_memory_allocated(ids.device) / 1e9
            if reference is not None:
                diff = [i for i, (a, b) in enumerate(zip(res.tokens, reference.tokens)) if a != b]
                res.first_divergence = diff[0] if diff else None
            _record_weights(path, model, ids, res, forced, progress)
            return res, []
        step = path.setup(model)
        cache = make_cache(path.cache, model, max_len)
        progress(f"{path.name}: warm-up (compile)")
        t0 = time.perf_counter()
        res.warmup_ttft_s = decode_once(model, step, ids, new_tokens, cache)[0]
        warm = time.perf_counter() - t0
        best = None
        for r in range(repeats):
            progress(f"{path.name}: run {r + 1}/{repeats}")
            if path.cache == "static":
                cache.reset()  # same tensors: captured graphs keep their addresses
            else:
                cache = make_cache(path.cache, model, max_len)
            ttft, dec, toks, logits = decode_once(model, step, ids, new_tokens, cache, keep_logits)
            res.runs_tok_s.append((new_tokens - 1) / dec)
            res.runs_ttft_s.append(ttft)
            if best is None or dec < best[1]:
                best = (ttft, dec, toks, logits)
        ttft, dec, toks, logits = best
        # the best of the repeats for prefill too, as for decode: a batch-1 prefill of a
        # short prompt is launch-bound, so one run's host jitter swings it by 30%+
        res.ttft_s, res.tokens = min(res.runs_ttft_s), toks
        res.decode_tok_s = max(res.runs_tok_s)
        res.compile_s = max(0.0, warm - ttft - dec)
        if cuda:
            res.peak_memory_gb = torch.cuda.max_memory_allocated(ids.device) / 1e9
        if breakdown and cuda and path.cache == "static":
            progress(f"{path.name}: step breakdown")
            try:
                res.breakdown, res.idle_gaps = profile_decode(model, step, ids, cache)
            except Exception as e:  # noqa: BLE001 - a profiler problem must not lose the timing
                res.note = (res.note + f" breakdown failed: {type(e).__name__}: {e}")[:400]
        if reference is not None:
            diff = [i for i, (a, b) in enumerate(zip(toks, reference.tokens)) if a != b]
            res.first_divergence = diff[0] if diff else None
            if ref_logits:
                n = min(len(ref_logits), len(logits), (diff[0] if diff else len(logits)))
                errs = [((a - b).norm() / b.norm()).item() for a, b in zip(logits[:n], ref_logits[:n])]
                res.max_rel_logit_err = max(errs) if errs else None
                d = diff[0] if diff else None
                if d is not None and 1 <= d <= min(len(ref_logits), len(logits)):
                    ref, got = ref_logits[d - 1][0], logits[d - 1][0]  # token d came from step d - 1
                    res.divergence_gap = (ref[reference.tokens[d]] - ref[toks[d]]).item()
                    res.divergence_max_abs_err = (got - ref).abs().max().item()
        _record_weights(path, model, ids, res, forced, progress, step, cache)
        return res, logits
    except Exception as e:  # a path that fails is reported, the others still run
        res.error = f"{type(e).__name__}: {e}"[:800]
        return res, []
    finally:
        path.teardown(model)
        torch._dynamo.reset()
