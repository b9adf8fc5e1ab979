"""tileflow's options: one typed object, read from the environment once, here.

Every entry point takes them as an argument and they override the environment:
``tileflow.patch(model, options={"cpu": True})``,
``torch.compile(model.forward, backend="tileflow", options={"cpu": True})``.
The environment variable of each field is ``TILEFLOW_<FIELD>`` (upper case).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Union


@dataclass(frozen=True)
class Options:
    # run the suite on CPU: there it is the verified reference (or the Triton interpreter),
    # slower than the model's own code, so by default CPU models are left unchanged
    cpu: bool = False


def _parse(field: dataclasses.Field, text: str):
    if field.type in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"TILEFLOW_{field.name.upper()}={text!r}: expected 1 or 0")
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
    names = {f.name for f in fields(Options)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"tileflow: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return dataclasses.replace(ENVIRONMENT, **dict(options))


def names() -> frozenset:
    return frozenset(f.name for f in fields(Options))


def table() -> str:
    """The options as a Markdown table (the docs' table is generated from this)."""
    rows = ["| option | environment | default |", "|---|---|---|"]
    for f in fields(Options):
        rows.append(f"| `{f.name}` | `TILEFLOW_{f.name.upper()}` | `{f.default!r}` |")
    return "\n".join(rows)


def describe(options: Optional[Options] = None) -> dict:
    return dataclasses.asdict(options or ENVIRONMENT)
