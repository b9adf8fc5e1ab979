"""The ``tileflow`` command.

    tileflow kernels list                       the suite, with targets and stages
    tileflow kernels show NAME --target triton  the generated source of one kernel
    tileflow verify [NAME ...]                  check kernels against the reference
    tileflow bench [--model NAME|DIR]           decode tok/s: eager, inductor, tileflow
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from tileflow.suite.registry import TARGETS


def _parse_assignments(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


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
        print(f"unknown kernel {args.name!r}; `tileflow kernels list` names them", file=sys.stderr)
        return 2
    k = KERNELS[args.name]
    case = k.decode_cases(QWEN_1_5B)[0]
    sizes = {**case.sizes, **_parse_assignments(args.sizes)}
    params = {**k.default_params(sizes), **_parse_assignments(args.set)}
    if args.target == "reference":
        import inspect

        print(inspect.getsource(k.reference))
        return 0
    print(generate(k.build(params), args.target), end="")
    return 0


def cmd_verify(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tileflow.suite import KERNELS
    from tileflow.verify import verify

    device = "cpu"
    if args.device == "cuda":
        device = "cuda"
    names = args.names or list(KERNELS)
    table = Table(title=f"verification against the float64 reference ({device})")
    for col in ("kernel", "case", "target", "dtype", "rel. error", "bound", "result"):
        table.add_column(col)
    failed = 0
    for name in names:
        k = KERNELS[name]
        for case in k.test_cases:
            for target in args.targets:
                for dtype in args.dtypes:
                    if (case.dtypes and dtype not in case.dtypes) or not case.runs_on(target):
                        continue
                    r = verify(k, case, dtype, target, device=device)
                    failed += not r.ok
                    table.add_row(name, case.label, target, dtype, f"{r.max_error:.2e}", f"{r.bound:.0e}",
                                  "ok" if r.ok else f"FAIL {r.detail}")
    Console(width=140).print(table)
    print(f"{failed} failed")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    if args.framework == "jax":
        from tileflow.bench.jax_decode import run_jax_bench

        rec = run_jax_bench(args.model, args.prompt, args.new, args.repeats, args.out, args.dtype,
                            paths=args.paths or None)
        return 1 if any(v.get("error") for v in rec["paths"].values()) else 0
    from tileflow.bench import run_bench

    rec = run_bench(args.model, args.prompt, args.new, args.paths or None, args.repeats, args.out, args.device,
                    args.dtype, breakdown=args.breakdown)
    failed = [k for k, v in rec["paths"].items() if v.get("error")]
    return 1 if failed else 0


def cmd_tune(args) -> int:
    from tileflow.bench.step_tune import run_tune

    try:
        run_tune(args.model, args.prompt, args.tokens, args.repeats, args.max_variants, args.threshold, args.out,
                 dry_run=args.dry_run, passes=args.passes, tries=args.tries)
    except (RuntimeError, ValueError) as exc:
        print(f"tileflow tune: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tileflow", description="Decode-time kernel suite for DeepSeek models")
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
    ver.set_defaults(fn=cmd_verify)
    from tileflow.bench.decode import default_paths

    path_names = [p.name for p in default_paths(__import__("torch").device("cpu"))]
    ben = sub.add_parser("bench", help="batch-1 decode tok/s side by side (the main job)")
    ben.add_argument("--model", default=None,
                     help="built-in config name or local checkpoint folder (default: the 1.5B shape on a GPU, "
                          "'tiny' on CPU)")
    ben.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128 on GPU, 32 on CPU)")
    ben.add_argument("--new", type=int, default=None, help="new tokens (default 256 on GPU, 32 on CPU)")
    from tileflow.bench.jax_decode import PATHS as JAX_PATHS

    ben.add_argument("--paths", nargs="*", choices=path_names + [p for p in JAX_PATHS if p not in path_names],
                     help="subset of paths (eager, or jax_jit with --framework jax, always runs)")
    ben.add_argument("--repeats", type=int, default=3)
    ben.add_argument("--out", default="benchmarks/results")
    ben.add_argument("--device", default=None)
    ben.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    ben.add_argument("--breakdown", action="store_true",
                     help="also profile one decode step per kernel class (us, bytes, GB/s; CUDA only)")
    ben.add_argument("--framework", choices=["torch", "jax"], default="torch",
                     help="torch: the paths above; jax: plain jax.jit vs tileflow primitives vs tileflow.jax.optimize")
    ben.set_defaults(fn=cmd_bench)
    tune = sub.add_parser("tune", help="tune the patched decode step on this GPU by timing whole steps")
    tune.add_argument("--model", default=None, help="built-in config name or local checkpoint folder (default: the 1.5B shape)")
    tune.add_argument("--prompt", type=int, default=128)
    tune.add_argument("--tokens", type=int, default=128, help="decode steps a timing")
    tune.add_argument("--repeats", type=int, default=3, help="timings a trial (median)")
    tune.add_argument("--max-variants", type=int, default=12,
                      help="variants tried a kernel a round (an H100 run kept one found 10th)")
    tune.add_argument("--threshold", type=float, default=0.003, help="least step gain that keeps a variant (0.003: 0.3%%; incumbents re-timed in one H100 run spread 0.14%%)")
    tune.add_argument("--passes", type=int, default=2,
                      help="rounds over the step's kernels, while the last one kept a change")
    tune.add_argument("--try", dest="tries", action="append", default=[], metavar="KERNEL:P=V,...[;KERNEL:P=V]",
                      help="a variant timed first against the baseline (repeatable), e.g. "
                           "attention_decode_gqa:ONE_LAUNCH=1,GROUP_C=8; --passes 0 runs only these")
    tune.add_argument("--out", default="benchmarks/results")
    tune.add_argument("--dry-run", action="store_true", help="do not record the winners in the user tuning table")
    tune.set_defaults(fn=cmd_tune)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        import torch

        gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.prompt = args.prompt or (128 if gpu else 32)
        args.new = args.new or (256 if gpu else 32)
    if getattr(args, "device", "cpu") == "cpu":
        from tileflow.runtime.torch_triton import use_interpreter_if_no_gpu

        use_interpreter_if_no_gpu()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
