"""Launch parameters chosen by measurement, cached by device, kernel, dtype and sizes.

Block sizes, split factors, warps and stages are never hand edits of generated code:
they are parameters of the tile definition. The GPU leaderboard
(``benchmarks/gpu_suite.py``) times each kernel's candidates and records the
fastest; the records ship in ``tileflow/data/autotune.json`` and a user's own
measurements go to ``$TILEFLOW_CACHE_DIR/autotune.json``, which wins.
"""

from __future__ import annotations

import contextlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from tileflow.emit.cache import cache_dir


# launch flags a caller sets for any kernel that change when the next launch may start, never
# the tiles: not part of a tune key, and never taken from a table (``runtime.ops.tuned_params``)
CALLER_FLAGS = ("LAUNCH_AT_START",)


def tune_key(kernel: str, sizes: dict, dtype: str, device: str) -> str:
    from tileflow.suite import KERNELS

    keys = getattr(KERNELS.get(kernel), "tune_keys", ())
    if keys:
        sizes = {k: sizes[k] for k in keys if k in sizes}
    sizes = {k: v for k, v in sizes.items() if k not in CALLER_FLAGS}
    shape = ",".join(f"{k}={sizes[k]}" for k in sorted(sizes))
    return f"{device}|{kernel}|{dtype}|{shape}"


def _user_file() -> Path:
    return cache_dir() / "autotune.json"


def _read(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def user_table() -> dict:
    """The user's own measured entries (``$TILEFLOW_CACHE_DIR/autotune.json``), which win
    over the shipped ones; empty when there are none."""
    return _read(_user_file())


def shipped_table() -> dict:
    try:
        return json.loads(resources.files("tileflow").joinpath("data/autotune.json").read_text())
    except (OSError, ValueError, FileNotFoundError):
        return {}


# Devices that are one chip with different memory (GH100: H100 and H200 have the same
# 132 multiprocessors and caches), so tiles measured on one are a fair start on the
# other until it is measured itself; the device's own entries always win.
SAME_CHIP = (("H100", "H200", "GH200"),)


def _same_chip(device: str) -> list[str]:
    for group in SAME_CHIP:
        if any(g in device for g in group):
            return [g for g in group if g not in device]
    return []


# entries in force for this process only, ahead of every table (the step tuner's trials)
_OVERRIDES: dict[str, dict] = {}


@contextlib.contextmanager
def overriding(entries: dict[str, dict]):
    """Within the block, :func:`lookup` answers ``entries`` (tune key -> parameters) first.
    Launchers already built keep their parameters: the caller rebuilds what it times."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(entries)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def lookup(kernel: str, sizes: dict, dtype: str, device: str) -> Optional[dict]:
    """Measured parameters for this shape on this device (else on a device of the same
    chip, see ``SAME_CHIP``), or None."""
    key = tune_key(kernel, sizes, dtype, device)
    if key in _OVERRIDES:
        return dict(_OVERRIDES[key])
    tables = (user_table(), shipped_table())
    for table in tables:
        if key in table:
            return dict(table[key]["params"])
    suffix = key.split("|", 1)[1]
    for sibling in _same_chip(device):
        for table in tables:
            for k, v in table.items():
                if k.endswith(suffix) and sibling in k.split("|", 1)[0]:
                    return dict(v["params"])
    return None


def record(kernel: str, sizes: dict, dtype: str, device: str, params: dict, us: float,
           path: Optional[os.PathLike] = None) -> None:
    """Store a measurement (the user cache unless ``path`` names another table)."""
    record_entry(tune_key(kernel, sizes, dtype, device), params, us, path)


def record_entry(key: str, params: dict, us: float, path: Optional[os.PathLike] = None) -> Path:
    """Store ``params`` under a tune key (:func:`tune_key`); returns the table's path."""
    path = Path(path) if path else _user_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _read(path)
    table[key] = {"params": params, "us": round(us, 3)}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def tune(candidates: list[dict], time_us: Callable[[dict], float],
         progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict, list[dict]]:
    """Time every candidate (``time_us`` may raise to reject one); return the fastest
    and every trial as ``{"params", "us", "error"}``, fastest first."""
    trials = []
    for i, params in enumerate(candidates):
        try:
            trials.append({"params": params, "us": float(time_us(params)), "error": ""})
        except Exception as exc:  # a candidate that does not compile or fit is skipped
            trials.append({"params": params, "us": float("inf"), "error": f"{type(exc).__name__}: {exc}"[:300]})
        if progress:
            progress(i + 1, len(candidates))
    trials.sort(key=lambda t: t["us"])
    if not trials or trials[0]["us"] == float("inf"):
        raise RuntimeError("no candidate ran: " + (trials[0]["error"] if trials else "none given"))
    return trials[0]["params"], trials
