"""Generated source on disk, imported as modules.

Triton's ``@triton.jit`` reads a function's source from its file, so generated code
is written to ``$TILEFLOW_CACHE_DIR`` (default ``~/.cache/tileflow``; ``settings.cache_dir``)
under a name holding the hash of the text, then imported. Same text, same file, same module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from tileflow import settings
from tileflow.emit.pallas import emit_pallas
from tileflow.emit.triton import emit_triton
from tileflow.tile.ir import KernelIR

EMITTERS = {"triton": emit_triton, "pallas": emit_pallas}
_MODULES: dict[tuple[str, str], ModuleType] = {}
_LOCKS: dict[tuple[str, str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def cache_dir() -> Path:
    return settings.cache_dir()


def generate(ir: KernelIR, target: str) -> str:
    """The generated source of ``ir`` for ``target`` ("triton" or "pallas")."""
    try:
        return EMITTERS[target](ir)
    except KeyError:
        raise ValueError(f"no emitter for target {target!r}; known: {sorted(EMITTERS)}") from None


def load_generated(ir: KernelIR, target: str, variant: str = "") -> ModuleType:
    """Import the generated module of ``ir`` for ``target`` (cached by text hash).

    ``variant`` separates imports of the same text that must not be shared, e.g.
    Triton under its interpreter and compiled (``triton.jit`` decides at import).
    """
    text = generate(ir, target)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    key = (target, digest, variant)
    if key in _MODULES:
        return _MODULES[key]
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:  # one thread writes and imports a key; the others wait and share its module
        if key in _MODULES:
            return _MODULES[key]
        folder = cache_dir() / target
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ir.name}_{digest}.py"
        if not path.exists() or path.read_text() != text:
            _write_atomic(path, text)
        modname = f"tileflow_generated_{target}_{ir.name}_{digest}{variant}"
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(modname, None)
            raise
        _MODULES[key] = module
        return module


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file of its own in the same folder:
    other processes may write the same file at once, and os.replace of equal text is harmless."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
