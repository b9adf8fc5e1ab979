"""Tuning a patched model's decode step by timing the whole step (``tileflow tune``).

The kernel leaderboard (``benchmarks/gpu_suite.py``) times each kernel after launches of
itself. In the decode step a kernel follows a different one, and programmatic dependent
launch overlaps its start with that predecessor's tail, so the fastest kernel alone is not
always the fastest in the step: the leaderboard's attention splits ran slower in the step,
and loading the first weight round before the wait (``PIPELINE=2``) paid on down and qkv
but not on gate-up and o (docs/notebook.md).

This tunes what the step runs: coordinate descent over the suite kernels one decode step
launches. For each in turn, a few variants of its current parameters one change away
(``PIPELINE`` 0 / 1 / 2 first, then the kernel's candidate tiles that differ in one
parameter) are timed as whole decode steps, every other kernel as it stands; a variant is
kept only when the step is faster than the incumbent, timed just before it, by more than
``threshold``. The winners go to the user's tuning table, which wins over the shipped one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tileflow.emit import autotune
from tileflow.runtime import ops
from tileflow.suite import KERNELS


@dataclass(frozen=True)
class Launch:
    """A suite kernel the step launches: name, sizes (structural ones included), dtype, device."""

    name: str
    sizes: tuple  # sorted (size, value) pairs, as the launcher cache keys them
    dtype: torch.dtype
    device: torch.device

    @property
    def key(self) -> str:
        return autotune.tune_key(self.name, dict(self.sizes), ops.DTYPE_NAMES[self.dtype],
                                 ops._device_name(self.device))

    def params(self) -> dict:
        """The parameters it launches with on a GPU now (overrides first)."""
        return ops.tuned_params(self.name, dict(self.sizes), self.dtype, self.device)


def launches_in_order() -> list[Launch]:
    """The launches whose launchers exist now, in the order they were first built (clear
    ``ops._LAUNCHERS`` and run one freshly captured step first)."""
    out = []
    for name, sizes, dtype, dev_type, dev_index in ops._LAUNCHERS:
        launch = Launch(name, sizes, dtype, torch.device(dev_type, dev_index))
        if launch not in out:
            out.append(launch)
    return out


def _value(params: dict, key: str):
    """``params[key]``; an absent ``PIPELINE`` is 0 (the kernels' default)."""
    return params.get(key, 0 if key == "PIPELINE" else None)


def neighbours(launch: Launch, limit: int) -> list[dict]:
    """Up to ``limit`` variants of the launch's current parameters, one or two changes
    away: the other ``PIPELINE`` modes first (where the kernel takes the parameter), half and
    twice the warps, then the kernel's candidates that differ in one tuned parameter, then
    those that differ in two, nearest values first. A candidate is also taken with the
    current warps (warps never change what a kernel computes; other parameters may be
    coupled, such as attention's ``SPLITS`` and ``SPLITS_BLOCK``, so they change only as a
    candidate has them)."""
    kernel, sizes = KERNELS[launch.name], dict(launch.sizes)
    current = launch.params()
    cands = kernel.candidates(sizes) if kernel.candidates else []
    out = []
    # a kernel takes PIPELINE if its candidates or its verified test cases set it
    if any("PIPELINE" in c for c in cands) or any("PIPELINE" in case.params for case in kernel.test_cases):
        out += [{**current, "PIPELINE": v} for v in (0, 1, 2) if _value(current, "PIPELINE") != v]
    # half and twice the warps, whether or not the candidate list has them: in the step a
    # kernel's warps also set how much of its successor's and predecessor's time it takes
    # (qkv at 2 warps, in no candidate list, was faster in the step; docs/notebook.md)
    if "num_warps" in current:
        out += [{**current, "num_warps": w} for w in (current["num_warps"] // 2, current["num_warps"] * 2)
                if 1 <= w <= 16 and w != current["num_warps"]]
    singles, pairs = [], []  # (changed parameters, variant)
    for c in cands:
        for base in (c, {**c, "num_warps": current["num_warps"]} if "num_warps" in current else c):
            variant = {**current, **base, **kernel.structural_sizes(sizes)}
            changed = tuple(k for k in variant if variant[k] != _value(current, k))
            if not changed or len(changed) > 2 or "PIPELINE" in changed or variant in out or \
                    any(variant == v for _, v in singles + pairs):
                continue
            (singles if len(changed) == 1 else pairs).append((changed, variant))
    values: dict = {}  # parameter -> the values tried for it and the current one
    for changed, variant in singles + pairs:
        for k in changed:
            values.setdefault(k, {current.get(k)}).add(variant[k])

    def distance(item) -> int:
        # how many of the values tried for a parameter lie between the current one and this
        changed, variant = item
        order = {k: sorted(values[k], key=lambda v: (v is None, v)) for k in changed}
        return sum(abs(order[k].index(variant[k]) - order[k].index(current.get(k))) for k in changed)

    # then two changes at once where a parameter never changes alone in the candidates:
    # coupled ones (attention's SPLITS with SPLITS_BLOCK); two
    # that can each change alone are left to coordinate descent, one at a time
    alone = {k for changed, _ in singles for k in changed} | {"num_warps"}
    pairs = [(changed, v) for changed, v in pairs if not set(changed) <= alone]
    out += [v for _, v in sorted(singles, key=distance)] + [v for _, v in sorted(pairs, key=distance)]
    return out[:limit]


@dataclass
class StepTrial:
    kernel: str
    change: str  # "baseline", or "PARAM: old -> new"
    us: float  # µs a decode step
    kept: bool = False


@dataclass
class StepTuneResult:
    baseline_us: float
    final_us: float
    trials: list = field(default_factory=list)  # StepTrial
    chosen: dict = field(default_factory=dict)  # tune key -> the kept variant's whole parameter set


def _change(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {_value(old, k)} -> {v}" for k, v in new.items() if v != _value(old, k))


def parse_try(text: str) -> dict[str, dict]:
    """A ``--try`` variant, ``"kernel:P=V,P=V[;kernel:P=V]"``, as {kernel: {param: value}}
    (values are ints where they read as ints). Raises ValueError on an unknown kernel."""
    out: dict[str, dict] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, assigns = part.partition(":")
        if name not in KERNELS:
            raise ValueError(f"--try {text!r}: no suite kernel {name!r}")
        params = out.setdefault(name, {})
        for a in filter(None, assigns.split(",")):
            key, eq, value = a.partition("=")
            if not eq:
                raise ValueError(f"--try {text!r}: {a!r} is not PARAM=VALUE")
            params[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


def tried_entries(changes: dict[str, dict], order: list) -> dict[str, dict]:
    """The tuning entries of a ``--try`` variant: each launch of a named kernel in the step
    (``order``) with its parameters now in force, changed as asked."""
    return {launch.key: {**launch.params(), **changes[launch.name]} for launch in order if launch.name in changes}


def tune_step(rebuild: Callable[[], None], time_step: Callable[[], float], max_variants: int = 12,
              threshold: float = 0.003, progress: Callable[[str], None] = lambda s: None,
              passes: int = 2, tries: Optional[list[str]] = None) -> StepTuneResult:
    """Coordinate descent over the kernels of one decode step, up to ``passes`` times
    over them (a later pass only while the one before kept something: a kernel's best
    tiles can move once its neighbours changed).

    ``rebuild()`` must drop what was built with the old parameters and run one step
    afresh (so ``ops._LAUNCHERS`` lists the step's launches); ``time_step()`` returns µs a
    step with the parameters in force. Trials run under :func:`autotune.overriding`, so
    nothing is written; the caller records ``chosen``. Each kernel's incumbent, re-timed
    before its challengers, is a trial too (change ``"incumbent"``): the spread between
    incumbents is the noise a kept gain must clear.

    ``tries`` (``parse_try`` texts) are timed first, each as one trial against the
    baseline: changes more than one step away from the tables, or parameters no candidate
    list holds yet (an experiment). The fastest that clears ``threshold`` is kept before the
    descent starts, then the next fastest of other kernels, and so on; with ``passes=0``
    only the tries run."""
    chosen: dict[str, dict] = {}
    trials: list[StepTrial] = []

    def timed() -> float:
        with autotune.overriding(chosen):
            rebuild()
            return time_step()

    def trial(entries: dict, change: str) -> tuple[float, str]:
        """µs a step with ``entries`` in force, and ``change`` (with why, if it failed)."""
        try:
            with autotune.overriding(entries):
                rebuild()
                return time_step(), change
        except Exception as exc:  # a variant that does not build or run is no candidate
            return float("inf"), f"{change} (failed: {type(exc).__name__}: {str(exc)[:120]})"

    with autotune.overriding({}):
        rebuild()
        order = launches_in_order()
    baseline = timed()
    trials.append(StepTrial("", "baseline", baseline, True))
    tried: list[tuple[float, dict, StepTrial]] = []
    for text in tries or []:
        with autotune.overriding(chosen):
            entries = tried_entries(parse_try(text), order)
        if not entries:
            trials.append(StepTrial("", f"try {text} (no launch of it in the step)", float("inf")))
            continue
        progress(f"try {text}")
        us, label = trial(entries, f"try {text}")
        trials.append(StepTrial(",".join(sorted({k.split("|")[1] for k in entries})), label, us))
        tried.append((us, entries, trials[-1]))
    # the fastest try that pays is kept, then the next fastest whose launches none kept
    # touches, and so on (tries of different kernels combine; the final timing checks the sum)
    for us, entries, trial in sorted(tried, key=lambda t: t[0]):
        if us < baseline * (1 - threshold) and not set(entries) & set(chosen):
            chosen.update(entries)
            trial.kept = True
    for _ in range(passes):
        kept_this_pass = False
        for launch in order:
            with autotune.overriding(chosen):
                current, variants = launch.params(), neighbours(launch, max_variants)
            if not variants:
                continue
            incumbent = timed()  # re-timed next to its challengers: the machine drifts
            trials.append(StepTrial(launch.name, "incumbent", incumbent))
            best: Optional[tuple[float, dict, StepTrial]] = None
            for variant in variants:
                change = _change(current, variant)
                progress(f"{launch.name}: {change}")
                us, change = trial({**chosen, launch.key: variant}, change)
                trials.append(StepTrial(launch.name, change, us))
                if best is None or us < best[0]:
                    best = (us, variant, trials[-1])
            if best is not None and best[0] < incumbent * (1 - threshold):
                chosen[launch.key] = best[1]
                best[2].kept = kept_this_pass = True
        if not kept_this_pass:
            break
    final = timed() if chosen else baseline
    return StepTuneResult(baseline, final, trials, chosen)


def decode_step_us(model, ids: torch.Tensor, cache, tokens: int = 128, reps: int = 3) -> float:
    """Median µs a greedy decode step of ``model`` (patched) over ``reps`` runs of
    ``tokens`` new tokens after a prompt ``ids`` (one warm-up run captures the step)."""
    from tileflow.bench.decode import _eager_step, decode_once

    step = _eager_step(model)
    runs = []
    for i in range(reps + 1):
        cache.reset()
        _, seconds, _, _ = decode_once(model, step, ids, tokens, cache)
        if i:
            runs.append(seconds / (tokens - 1) * 1e6)
    return statistics.median(runs)


def patched_step_rebuilder(model, ids: torch.Tensor, cache) -> Callable[[], None]:
    """``rebuild`` for :func:`tune_step` on a transformers model: patch it afresh (so the
    decode step is captured again with the parameters now in force), run the prompt,
    then one decode step with only the step's launchers built."""
    import tileflow
    from tileflow.integrations.shared.hf import cache_keyword

    def rebuild():
        tileflow.unpatch(model)
        ops._LAUNCHERS.clear()
        tileflow.patch(model)
        cache.reset()
        kw = {cache_keyword(model): cache}
        with torch.no_grad():
            tok = model(input_ids=ids, use_cache=True, **kw).logits[:, -1].argmax(-1, keepdim=True)
            ops._LAUNCHERS.clear()  # the prompt pass's launches are not the step's
            pos = torch.full((1, 1), ids.shape[1], device=ids.device, dtype=torch.long)
            model(input_ids=tok, position_ids=pos, use_cache=True, **kw)
    return rebuild


def run_tune(model_name: Optional[str] = None, prompt: int = 128, tokens: int = 128, reps: int = 3,
             max_variants: int = 12, threshold: float = 0.003, out_dir: str = "benchmarks/results",
             dry_run: bool = False, device: str = "cuda",
             time_step: Optional[Callable[[], float]] = None, passes: int = 2,
             tries: Optional[list[str]] = None) -> dict:
    """``tileflow tune``: tune the patched decode step of a built-in config (or a local
    checkpoint) on this GPU, record the winners in the user's tuning table (unless
    ``dry_run``) and write a JSON record. Raises RuntimeError without a CUDA GPU: on CPU the
    kernels run as the reference, whose speed no launch parameter changes. (``device`` and
    ``time_step``, a stand-in timer, let the tests run the whole command on CPU.)"""
    import datetime as dt
    import json

    from rich.console import Console
    from rich.table import Table

    from tileflow.bench import _commit, _json_path, versions
    from tileflow.bench.decode import make_cache
    from tileflow.bench.checks import available_bytes, check_memory, count_text, estimate
    from tileflow.bench.models import build_model, model_config

    for text in tries or []:
        parse_try(text)  # a typo is reported before the model is built
    if not torch.cuda.is_available():
        raise RuntimeError("tileflow tune needs a CUDA GPU: on CPU the suite kernels run as the reference "
                           "(or the Triton interpreter), whose speed no launch parameter changes")
    console = Console(width=150)
    dev = torch.device(device)
    model_name = model_name or "deepseek-r1-distill-qwen-1.5b"
    est = estimate(model_config(model_name), torch.bfloat16, dev, prompt + tokens + 8)
    check_memory(est, model_name, dev, available_bytes(dev))  # a one-line refusal, not an OOM mid-build
    console.print(f"building {model_name} ({count_text(est.parameters)} parameters, bf16)", markup=False)
    model = build_model(model_name, dev, torch.bfloat16)
    gpu_name = torch.cuda.get_device_name() if dev.type == "cuda" else str(dev)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(dev)
    cache = make_cache("static", model, prompt + tokens + 8)
    rebuild = patched_step_rebuilder(model, ids, cache)
    with console.status("tuning the decode step") as status:
        result = tune_step(rebuild, time_step or (lambda: decode_step_us(model, ids, cache, tokens, reps)),
                           max_variants, threshold, progress=lambda s: status.update(f"tuning the decode step: {s}"),
                           passes=passes, tries=tries)
    table = Table(title=f"{model_name} decode step on {gpu_name}: µs a token")
    for col in ("kernel", "change", "µs", "kept"):
        table.add_column(col, justify="right" if col == "µs" else "left")
    for t in result.trials:
        table.add_row(t.kernel or "-", t.change, f"{t.us:.1f}", "yes" if t.kept else "")
    console.print(table)
    where = "not recorded (dry run)"
    if not dry_run:
        for key, params in result.chosen.items():
            where = f"recorded in {autotune.record_entry(key, params, result.final_us)}"
    console.print(f"step {result.baseline_us:.1f} -> {result.final_us:.1f} µs "
                  f"({1e6 / result.baseline_us:.1f} -> {1e6 / result.final_us:.1f} tok/s), "
                  + (f"{len(result.chosen)} entr{'y' if len(result.chosen) == 1 else 'ies'} {where}"
                     if result.chosen else "no change kept"))
    record = {"what": "decode step tuned by whole-step timing (tileflow tune)",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": gpu_name, "versions": versions(), "commit": _commit(),
              "model": model_name, "dtype": "bfloat16", "prompt_tokens": prompt, "new_tokens": tokens, "repeats": reps,
              "passes": passes, "threshold": threshold, "tries": list(tries or []),
              "baseline_us": result.baseline_us, "final_us": result.final_us, "chosen": result.chosen,
              "trials": [t.__dict__ for t in result.trials], "recorded": not dry_run}
    path = _json_path(record, out_dir)
    path = path.with_name(path.name.replace("-decode-", "-step-tune-"))
    path.write_text(json.dumps(record, indent=1, default=str))
    plot_tune(record, path.with_suffix(".png"))
    console.print(f"wrote {path} (and .png)")
    return record


def plot_tune(record: dict, png) -> None:
    """Every trial of a ``tileflow tune`` record as µs a step in the order run, one colour
    a kernel, the kept changes starred, the incumbent as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = record["trials"]
    kernels = list(dict.fromkeys(t["kernel"] for t in trials if t["kernel"]))
    colours = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kernels)}
    finite = [t["us"] for t in trials if t["us"] != float("inf")]
    top = min(max(finite), 1.15 * record["baseline_us"])  # a few far-off trials would flatten the rest
    fig, ax = plt.subplots(figsize=(10, 4.5))
    best, line, labelled = record["baseline_us"], [], set()
    for i, t in enumerate(trials):
        best = t["us"] if t["kept"] else best
        line.append(best)
        if not t["kernel"]:
            continue
        y = min(t["us"], top)
        ax.scatter(i, y, s=90 if t["kept"] else 18, marker="*" if t["kept"] else ("^" if y < t["us"] else "o"),
                   color=colours[t["kernel"]], edgecolors="k" if t["kept"] else "none", zorder=3,
                   label=None if t["kernel"] in labelled else t["kernel"])
        labelled.add(t["kernel"])
        if t["kept"]:
            ax.annotate(t["change"], (i, y), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.step(range(len(trials)), line, where="post", color="k", lw=1, label="kept so far")
    ax.set_ylim(top=top * 1.005)
    ax.set_xlabel("trial (in the order run; triangles: off the top)")
    ax.set_ylabel("µs a decode step")
    ax.set_title(f"tileflow tune: {record['model']} on {record['device']}: "
                 f"{record['baseline_us']:.1f} -> {record['final_us']:.1f} µs a step", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
