"""tileflow's options: one typed object, read from the environment once, here.

Every entry point takes them as an argument and they override the environment:
``tileflow.patch(model, options={"cpu": True})``,
``torch.compile(model.forward, backend="tileflow", options={"cpu": True})``.
The environment variable of each field is ``TILEFLOW_<FIELD>`` (upper case).

This module is the only place tileflow reads the environment. Besides the fields, three
variables are read live, not once: ``TRITON_INTERPRET`` (Triton's own switch, which
Triton reads itself when a kernel module is imported; :func:`triton_interpret`),
``TILEFLOW_CACHE_DIR`` (where generated code and tuning entries go; :func:`cache_dir`)
and ``TILEFLOW_COMMIT`` (the commit a benchmark record names; :func:`commit`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Optional, Union

_AUTO_ON_OFF = ("auto", "1", "0")

# The bf16 decode step's launches by role (integrations/transformers/decode_step.py), as the
# option launch_at_start names them; attention is its two launches (split and combine).
STEP_LAUNCHES = ("embedding", "qkv", "attention", "o", "gate_up", "down", "lm_head")


def _choice(default: str, choices: tuple) -> dataclasses.Field:
    return field(default=default, metadata={"choices": choices})


def _launches(default: str) -> dataclasses.Field:
    """A set of the step's launches: ``0`` none, ``1`` every one, else a comma list of roles."""
    return field(default=default, metadata={"launches": STEP_LAUNCHES})


@dataclass(frozen=True)
class Options:
    # run the suite on CPU: there it is the verified reference (or the Triton interpreter),
    # slower than the model's own code, so by default CPU models are left unchanged
    cpu: bool = False
    # what CPU tensors run: the kernels' references in fp32, or the generated Triton code
    # under the interpreter (how the tests check the integrations against the real kernels)
    cpu_target: str = _choice("reference", ("reference", "triton"))
    # programmatic dependent launch on sm90+ (each kernel starts while its predecessor
    # drains); off only to measure what it buys
    pdl: bool = True
    # one-row (decode) Triton launches with every stride and size compiled in
    static_shapes: bool = True
    # the decode step lets qkv, attention and o load the inputs it vouches for (positions,
    # lengths, residual) before the dependent-launch wait
    early_inputs: bool = True
    # decode step launches (0 none, 1 all, or e.g. qkv,attention,o) whose programs let the next
    # launch in at their start, before their own dependent-launch wait, instead of after it;
    # the launch after such a one loads no early inputs (docs/study-dataflow.md, E1)
    launch_at_start: str = _launches("0")
    # tileflow.patch runs a prompt into an empty static cache as its own program
    prefill: bool = True
    # ... and captures that program in a CUDA graph per prompt length (GPU)
    prefill_graphs: bool = True
    # generate's plain greedy calls on a patched model run a lean loop that reads the
    # device back every few tokens instead of every token (the same tokens; off: transformers' loop)
    generate_loop: bool = True
    # the torch backend's rewrite of the dynamo graph to the fused decode kernels
    compile_fused: bool = True
    # what tileflow's JAX primitives lower to
    jax_target: str = _choice("auto", ("auto", "pallas", "triton", "reference"))
    # Pallas under its interpreter: auto = interpreted except on TPU (and on CPU)
    pallas_interpret: str = _choice("auto", _AUTO_ON_OFF)
    # generated Pallas code stores partial blocks with masked stores: auto = compiled on a GPU
    pallas_masked_stores: str = _choice("auto", _AUTO_ON_OFF)
    # what matched patterns run on torch-xla
    xla_target: str = _choice("auto", ("auto", "pallas", "pallas-interpret", "reference"))
    # tileflow.patch's projection weights: as the model has them, or quantized copies held by the
    # decode program (int4: group-wise, 128 columns; fp8: 128 x 128 blocks) read by the low-precision matvecs
    weights: str = _choice("model", ("model", "int4", "fp8"))

    def __post_init__(self):
        for f in fields(self):
            _check_choice(f, getattr(self, f.name), f"tileflow: option {f.name}")


def _check_choice(f: dataclasses.Field, value, where: str) -> None:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{where}={value!r}: expected one of {', '.join(choices)}")
    roles = f.metadata.get("launches")
    if roles and (not isinstance(value, str) or value not in ("0", "1")
                  and any(r.strip() not in roles for r in value.split(","))):
        raise ValueError(f"{where}={value!r}: expected 0, 1 or a comma list of {', '.join(roles)}")


def launch_set(value: str) -> frozenset:
    """The step launches a launch-set option (``launch_at_start``) names: ``0`` none, ``1``
    every one of :data:`STEP_LAUNCHES`, else its comma list."""
    if value == "0":
        return frozenset()
    if value == "1":
        return frozenset(STEP_LAUNCHES)
    return frozenset(r.strip() for r in value.split(","))


def _parse(f: dataclasses.Field, text: str):
    where = f"TILEFLOW_{f.name.upper()}"
    if f.type in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{where}={text!r}: expected 1 or 0")
    if f.type in (int, "int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}={text!r}: expected an integer") from None
    text = text or f.default
    _check_choice(f, text, where)
    return text


def _from_environment() -> Options:
    values = {}
    for f in fields(Options):
        text = os.environ.get(f"TILEFLOW_{f.name.upper()}")
        if text is not None:
            values[f.name] = _parse(f, text)
    return Options(**values)


ENVIRONMENT = _from_environment()  # read once, at import


def resolve(options: Union[None, Options, Mapping] = None) -> Options:
    """The options in force for one call: the environment's, overridden by ``options``
    (an :class:`Options` replaces them; a mapping overrides the fields it names)."""
    if options is None:
        return ENVIRONMENT
    if isinstance(options, Options):
        return options
    known = {f.name: f for f in fields(Options)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"tileflow: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(ENVIRONMENT, **dict(options))


def names() -> frozenset:
    return frozenset(f.name for f in fields(Options))


def table() -> str:
    """The options as a Markdown table (the docs' table is generated from this)."""
    rows = ["| option | environment | default | values |", "|---|---|---|---|"]
    for f in fields(Options):
        values = " / ".join(f"`{c}`" for c in f.metadata.get("choices", ())) or (
            "`1` / `0`" if f.type in (bool, "bool") else
            "`0` / `1` (all) / a comma list of " + ", ".join(f"`{r}`" for r in f.metadata["launches"])
            if "launches" in f.metadata else f.type)
        rows.append(f"| `{f.name}` | `TILEFLOW_{f.name.upper()}` | `{f.default!r}` | {values} |")
    return "\n".join(rows)


def describe(options: Optional[Options] = None) -> dict:
    return dataclasses.asdict(options or ENVIRONMENT)


def changed(options: Optional[Options] = None) -> dict:
    """The fields that differ from their defaults, by environment name (a benchmark
    record names them: A/B runs differ only in these)."""
    o = options or ENVIRONMENT
    return {f"TILEFLOW_{f.name.upper()}": getattr(o, f.name) for f in fields(Options)
            if getattr(o, f.name) != f.default}


# -- read live: not options, but the environment of the process as it is now ---------

def triton_interpret() -> bool:
    """Whether Triton runs kernels under its interpreter in this process
    (``TRITON_INTERPRET=1``). Triton reads the variable itself when a module of
    ``@triton.jit`` functions is imported, and :func:`use_triton_interpreter` may set it
    after tileflow's import, so it is read live."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton_interpreter() -> None:
    """Turn Triton's interpreter on for this process (``TRITON_INTERPRET=1``): before
    triton is first imported, as Triton reads it there."""
    os.environ["TRITON_INTERPRET"] = "1"


def cache_dir() -> Path:
    """Where generated code and the user's tuning entries go: ``TILEFLOW_CACHE_DIR``, else
    ``~/.cache/tileflow`` (read live: a process, or a test, may point it elsewhere)."""
    root = os.environ.get("TILEFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tileflow")
    return Path(root)


def library_default(name: str, value: str) -> None:
    """Set a library's environment variable for this process unless it is set already
    (e.g. ``XLA_PYTHON_CLIENT_PREALLOCATE`` before JAX starts its backend)."""
    os.environ.setdefault(name, value)


def commit() -> str:
    """``TILEFLOW_COMMIT``: the commit a benchmark record names when the run has no git
    checkout (a device machine's copy), else ""."""
    return os.environ.get("TILEFLOW_COMMIT", "")
