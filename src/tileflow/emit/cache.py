"""Generated source on disk, imported as modules.

Triton's ``@triton.jit`` reads a function's source from its file, so generated code
is written to ``$TILEFLOW_CACHE_DIR`` (default ``~/.cache/tileflow``) under a name
holding the hash of the text, then imported. Same text, same file, same module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from tileflow.emit.pallas import emit_pallas
from tileflow.emit.triton import emit_triton
from tileflow.tile.ir import KernelIR

EMITTERS = {"triton": emit_triton, "pallas": emit_pallas}
_MODULES: dict[tuple[str, str], ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("TILEFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tileflow")
    return Path(root)


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
    folder = cache_dir() / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ir.name}_{digest}.py"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: parallel test workers may race here
    modname = f"tileflow_generated_{target}_{ir.name}_{digest}{variant}"
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    _MODULES[key] = module
    return module
