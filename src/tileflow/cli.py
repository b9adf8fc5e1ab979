"""The ``tileflow`` command.

    tileflow kernels list                       the suite, with targets and stages
    tileflow kernels show NAME --target triton  the generated source of one kernel
    tileflow verify [NAME ...] [--full]         check kernels against the reference
    tileflow bench [--model NAME|DIR]           decode tok/s: eager, inductor, tileflow
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional

from tileflow.suite.registry import TARGETS

# results go outside the source tree (a run must not dirty a checkout); benchmarks/results
# holds only the records the docs cite
DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "tileflow", "results")


class UsageError(Exception):
    """A misuse found after parsing; ``main`` prints it as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the misuse itself is the news
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int, why: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{why}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _parse_assignments(items: list[str], flag: str) -> dict:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"{flag}: expected NAME=VALUE, got {item!r}")
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise UsageError(f"{flag} {item}: the value must be a number") from None
    return out


def _out_folder(out: str) -> None:
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"argument --out: {out} is a file, not a folder") from None
    except OSError as e:
        raise UsageError(f"argument --out: cannot create {out}: {e.strerror or e}") from None


def cmd_kernels_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tileflow.suite import KERNELS

    n_fused = sum(k.fused for k in KERNELS.values())
    table = Table(title=f"tileflow decode suite: {len(KERNELS) - n_fused} kernels + {n_fused} fused")
    for col in ("kernel", "targets", "stages", "what it computes"):
        table.add_column(col)
    from tileflow.suite.registry import QWEN_1_5B

    for name, k in KERNELS.items():
        stages = {s.name: None for c in k.test_cases + k.decode_cases(QWEN_1_5B)
                  for s in k.build(k.params_for(c)).stages}
        table.add_row(name + (" (fused)" if k.fused else ""), ", ".join(TARGETS), " + ".join(stages),
                      k.summary)
    Console(width=140).print(table)
    return 0


def cmd_kernels_show(args) -> int:
    from tileflow.emit.cache import generate
    from tileflow.suite import KERNELS
    from tileflow.suite.registry import QWEN_1_5B

    if args.name not in KERNELS:
        raise UsageError(f"unknown kernel {args.name!r}; `tileflow kernels list` names them")
    k = KERNELS[args.name]
    case = k.decode_cases(QWEN_1_5B)[0]
    given = _parse_assignments(args.sizes, "--sizes")
    flags = k.structural_sizes(case.sizes)  # HAS_BIAS, ROPE_KIND: 0 is a value
    for key, value in given.items():
        if key not in case.sizes:  # it would be ignored
            raise UsageError(f"--sizes {key}: {args.name} has sizes {', '.join(case.sizes)}")
        if not (isinstance(value, int) and value >= (0 if key in flags else 1)):
            raise UsageError(f"--sizes {key}={value}: expected an integer >= {0 if key in flags else 1}")
    sizes = {**case.sizes, **given}
    params = {**k.default_params(sizes), **_parse_assignments(args.set, "--set")}
    if args.target == "reference":
        import inspect

        print(inspect.getsource(k.reference))
        return 0
    print(generate(k.build(params), args.target), end="")
    return 0


def cmd_verify(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from tileflow.suite import KERNELS
    from tileflow.verify import verification_matrix, verify

    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    unknown = [n for n in args.names if n not in KERNELS]
    if unknown:
        raise UsageError(f"unknown kernel{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                         "`tileflow kernels list` names them")
    names = args.names or list(KERNELS)
    jobs = [(name, case, target, dtype) for name in names
            for case, target, dtype in verification_matrix(KERNELS[name], args.targets, args.dtypes, args.full)]
    if not jobs:  # an empty table would read as a pass
        raise UsageError(f"nothing to verify: no test case of {', '.join(names)} runs on targets "
                         f"[{', '.join(args.targets)}] in dtypes [{', '.join(args.dtypes)}]")
    table = Table(title=f"verification against the float64 reference ({device}, "
                        f"{'full sweep' if args.full else 'default set'})")
    for col in ("kernel", "case", "target", "dtype", "rel. error", "bound", "result"):
        table.add_column(col)
    failed = 0
    # a long run shows where it is (on stderr, gone when done); the table follows
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("verifying", total=len(jobs))
        results = []
        for name, case, target, dtype in jobs:
            progress.update(task, description=f"{name} {case.label} {target} {dtype}")
            results.append(verify(KERNELS[name], case, dtype, target, device=device))
            progress.advance(task)
    for (name, case, target, dtype), r in zip(jobs, results):
        failed += not r.ok
        table.add_row(name, case.label, target, dtype, f"{r.max_error:.2e}", f"{r.bound:.0e}",
                      "ok" if r.ok else f"FAIL {r.detail}")
    Console(width=140).print(table)
    print(f"{failed} failed")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    _out_folder(args.out)
    if args.framework == "jax":
        from tileflow.bench.jax_decode import run_jax_bench

        if args.weights:
            raise UsageError("--weights is for the torch paths (tileflow.patch); --framework jax has no quantized "
                             "projections")
        rec = run_jax_bench(args.model, args.prompt, args.new, args.repeats, args.out, args.dtype,
                            paths=args.paths or None)
        return 1 if any(v.get("error") for v in rec["paths"].values()) else 0
    from tileflow.bench import run_bench

    rec = run_bench(args.model, args.prompt, args.new, args.paths or None, args.repeats, args.out, args.device,
                    args.dtype, breakdown=args.breakdown, batch=args.batch, speculate=args.speculate,
                    layers=args.layers, weights=args.weights)
    failed = [k for k, v in rec["paths"].items() if v.get("error")]
    return 1 if failed else 0


def cmd_tune(args) -> int:
    from tileflow.bench.step_tune import run_tune

    _out_folder(args.out)
    try:
        run_tune(args.model, args.prompt, args.tokens, args.repeats, args.max_variants, args.threshold, args.out,
                 dry_run=args.dry_run, passes=args.passes, tries=args.tries)
    except (RuntimeError, ValueError) as exc:
        print(f"tileflow tune: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="tileflow", description="Decode-time kernel suite for DeepSeek models")
    sub = ap.add_subparsers(dest="command", required=True)
    kern = sub.add_parser("kernels", help="list the suite or show a generated kernel")
    ksub = kern.add_subparsers(dest="action", required=True)
    ksub.add_parser("list", help="every suite kernel").set_defaults(fn=cmd_kernels_list)
    show = ksub.add_parser("show", help="the generated source of a kernel")
    show.add_argument("name")
    show.add_argument("--target", choices=TARGETS, default="triton")
    show.add_argument("--set", nargs="*", default=[], metavar="PARAM=V", help="launch parameters")
    show.add_argument("--sizes", nargs="*", default=[], metavar="SIZE=V",
                      help="sizes (default: DeepSeek-R1-Distill-Qwen-1.5B decode)")
    show.set_defaults(fn=cmd_kernels_show)
    ver = sub.add_parser("verify", help="check kernels against the float64 reference")
    ver.add_argument("names", nargs="*")
    ver.add_argument("--targets", nargs="*", default=list(TARGETS), choices=TARGETS)
    ver.add_argument("--dtypes", nargs="*", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    ver.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ver.add_argument("--full", action="store_true",
                     help="every test case x target x dtype (default: each kernel x target x dtype and each "
                          "case x target at least once, as the test suite; docs/testing.md)")
    ver.set_defaults(fn=cmd_verify)
    from tileflow.bench.decode import default_paths

    path_names = [p.name for p in default_paths(__import__("torch").device("cuda"), "int4")]  # every path's name
    ben = sub.add_parser("bench", help="batch-1 decode tok/s side by side (the main job)")
    ben.add_argument("--model", default=None,
                     help="built-in config name or local checkpoint folder (default: the 1.5B shape on a GPU, "
                          "'tiny' on CPU)")
    ben.add_argument("--prompt", type=_int_at_least(1), default=None,
                     help="prompt tokens (default 128 on GPU, 32 on CPU)")
    ben.add_argument("--new", type=_int_at_least(2, " (the first new token comes from the prompt pass)"),
                     default=None, help="new tokens (default 256 on GPU, 32 on CPU)")
    from tileflow.bench.jax_decode import PATHS as JAX_PATHS

    ben.add_argument("--paths", nargs="*", choices=path_names + [p for p in JAX_PATHS if p not in path_names],
                     help="subset of paths (eager, or jax_jit with --framework jax, always runs)")
    ben.add_argument("--repeats", type=_int_at_least(1), default=3)
    ben.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON record and chart (default {DEFAULT_OUT})")
    ben.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    ben.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    ben.add_argument("--breakdown", action="store_true",
                     help="also profile one decode step per kernel class (us, bytes, GB/s; CUDA only)")
    ben.add_argument("--batch", type=_int_at_least(1), default=1,
                     help="also generate on N left-padded prompts per path (aggregate tok/s) and time the patched "
                          "step at 1-16 rows")
    ben.add_argument("--speculate", default=None, metavar="lookup:K|draft:K:MODEL",
                     help="also prompt lookup with K drafts (tok/s, acceptance, tokens identical), or MODEL as the "
                          "assistant: its draft round against the verify step, and the implied speed-up")
    ben.add_argument("--layers", type=_int_at_least(1), default=None,
                     help="only the model's first N decoder layers, at its real widths (a model too big for one "
                          "card, e.g. deepseek-v3)")
    ben.add_argument("--weights", choices=["int4", "fp8", "fp8-checkpoint"], default=None,
                     help="the patch paths quantize the projections (options={'weights': ...}); eager and inductor "
                          "stay the model's dtype; the roofline counts the format's bytes; on CUDA torchao's int8 / "
                          "int4 weight-only paths (reduce-overhead) run too (default: the model's dtype, or "
                          "TILEFLOW_WEIGHTS). fp8-checkpoint (and fp8 where the model in its dtype does not fit the "
                          "device, or its projections the host while patched; an fp8 checkpoint folder always): the "
                          "model built as a fine-grained fp8 checkpoint loads, FP8Linear projections made on the "
                          "device, only the patch paths run")
    ben.add_argument("--framework", choices=["torch", "jax"], default="torch",
                     help="torch: the paths above; jax: plain jax.jit vs tileflow primitives vs tileflow.jax.optimize")
    ben.set_defaults(fn=cmd_bench)
    tune = sub.add_parser("tune", help="tune the patched decode step on this GPU by timing whole steps")
    tune.add_argument("--model", default=None, help="built-in config name or local checkpoint folder (default: the 1.5B shape)")
    tune.add_argument("--prompt", type=_int_at_least(1), default=128)
    tune.add_argument("--tokens", type=_int_at_least(2, " (the first new token comes from the prompt pass)"),
                      default=128, help="decode steps a timing")
    tune.add_argument("--repeats", type=_int_at_least(1), default=3, help="timings a trial (median)")
    tune.add_argument("--max-variants", type=_int_at_least(1), default=12,
                      help="variants tried a kernel a round (an H100 run kept one found 10th)")
    tune.add_argument("--threshold", type=_fraction, default=0.003, help="least step gain that keeps a variant (0.003: 0.3%%; incumbents re-timed in one H100 run spread 0.14%%)")
    tune.add_argument("--passes", type=_int_at_least(0), default=2,
                      help="rounds over the step's kernels, while the last one kept a change")
    tune.add_argument("--try", dest="tries", action="append", default=[], metavar="KERNEL:P=V,...[;KERNEL:P=V]",
                      help="a variant timed first against the baseline (repeatable), e.g. "
                           "gqa_attention:SPLITS=16,SPLITS_BLOCK=16; --passes 0 runs only these")
    tune.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON record and chart (default {DEFAULT_OUT})")
    tune.add_argument("--dry-run", action="store_true", help="do not record the winners in the user tuning table")
    tune.set_defaults(fn=cmd_tune)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        import torch

        gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.prompt = (128 if gpu else 32) if args.prompt is None else args.prompt
        args.new = (256 if gpu else 32) if args.new is None else args.new
    if getattr(args, "device", "cpu") == "cpu":
        from tileflow.runtime.torch_triton import use_interpreter_if_no_gpu

        use_interpreter_if_no_gpu()
    from tileflow.bench.checks import BenchError

    try:
        return args.fn(args)
    except (UsageError, BenchError) as e:
        print(f"tileflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
