"""Layering (issue 31): every tileflow module imports on its own, no two tileflow
modules import each other (directly or around a loop, function-local imports
included), and the ladder holds:

    tile -> suite -> emit -> runtime -> bench / cli        (each imports only leftwards)
    integrations: above runtime; one framework's package never imports another's

The static checks read the source with ``ast`` (every ``import`` statement, at any
depth), so they cost nothing at run time. The import check runs one fresh interpreter
that imports the heavy third-party frameworks once (they are not under test) and then
forks one child per tileflow module, in which no tileflow module is loaded yet: the
child imports that module alone. A module whose optional dependency (jax, triton,
onnx, ...) is absent is skipped with the missing name; any other failure fails.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setup.cfg's package_dir: the package name of each source folder
PACKAGE_DIRS = {"tileflow": ROOT / "src" / "tileflow",
                "tileflow.integrations": ROOT / "integrations",
                "tileflow.patterns": ROOT / "patterns"}
# the extras of setup.cfg (what a plain `pip install tileflow` may lack), by import name
OPTIONAL = {"triton", "jax", "jaxlib", "jax_triton", "onnx", "onnxscript", "onnxruntime", "torch_xla", "flax",
            "hypothesis"}
# imported once before the fork: third-party frameworks only, never tileflow
PRELOAD = ("numpy", "torch", "transformers", "jax", "jax.numpy", "onnx", "onnxscript", "onnxruntime", "triton")

# tile -> suite -> emit -> runtime -> bench / cli: what each layer must not import
# (integrations sit above runtime)
LADDER = {
    "tileflow.tile": ("tileflow.suite", "tileflow.emit", "tileflow.runtime", "tileflow.bench", "tileflow.cli",
                      "tileflow.integrations"),
    "tileflow.suite": ("tileflow.emit", "tileflow.runtime", "tileflow.bench", "tileflow.cli",
                       "tileflow.integrations"),
    "tileflow.emit": ("tileflow.runtime", "tileflow.bench", "tileflow.cli", "tileflow.integrations"),
    "tileflow.runtime": ("tileflow.bench", "tileflow.cli", "tileflow.integrations"),
}

# integrations/shared: what several integrations read alike (version-compatibility
# helpers); any integration may import it, it imports none
SHARED = "shared"

# Violations that exist now, edge by edge (importer, imported); any other fails.
# Remove an entry once its edge is gone.
KNOWN_EDGES: set = set()
KNOWN_CYCLES: set = set()


# ------------------------------------------------------------------ the modules
def _walk(package: str, folder: Path, out: dict) -> None:
    out[package] = folder / "__init__.py"
    for info in pkgutil.iter_modules([str(folder)]):
        name = f"{package}.{info.name}"
        if name in PACKAGE_DIRS:  # mapped from a folder of its own
            continue
        if info.ispkg:
            _walk(name, folder / info.name, out)
        else:
            out[name] = folder / f"{info.name}.py"


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        _walk(package, folder, out)
    return dict(sorted(out.items()))


MODULES = _modules()


# ------------------------------------------------------------------ the graph
def _aliases() -> dict[str, str]:
    """``from tileflow import jax``: names the top-level package maps to integrations."""
    tree = ast.parse(MODULES["tileflow"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_SUBPACKAGES" for t in node.targets):
            return {f"tileflow.{k}": v for k, v in ast.literal_eval(node.value).items()}
    return {}


def _imported(name: str, path: Path):
    """(imported name, line) for every import in the module, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno  # a submodule, or a name of ``base``
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, node.lineno


def _graph() -> dict[str, dict[str, list[int]]]:
    """importer -> {imported tileflow module: [lines]}."""
    aliases = _aliases()
    graph: dict[str, dict[str, list[int]]] = {}
    for name, path in MODULES.items():
        edges = graph.setdefault(name, {})
        for target, line in _imported(name, path):
            target = aliases.get(target, target)
            while target and target not in MODULES:  # ``from a.b import name`` -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(target, []).append(line)
    return graph


GRAPH = _graph()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _where(importer: str, imported: str) -> str:
    path = MODULES[importer].relative_to(ROOT)
    return f"{importer} -> {imported} ({path}:{','.join(map(str, sorted(set(GRAPH[importer][imported]))))})"


def _cycles(graph: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _violations(graph: dict) -> list[tuple[str, str, str]]:
    """(importer, imported, rule) for every edge the ladder or the integration rule forbids."""
    out = []
    for importer, edges in graph.items():
        for imported in edges:
            for layer, forbidden in LADDER.items():
                if _in(importer, layer) and any(_in(imported, f) for f in forbidden):
                    out.append((importer, imported, f"{layer} imports nothing of {', '.join(forbidden)}"))
            if _in(importer, "tileflow.integrations") and _in(imported, "tileflow.integrations"):
                mine, theirs = importer.split(".")[2:3], imported.split(".")[2:3]
                if mine and theirs and mine != theirs and theirs != [SHARED]:
                    out.append((importer, imported, "an integration never imports another integration"))
    return sorted(out)


def test_the_graph_sees_every_module_and_function_local_imports():
    assert "tileflow.tile.ir" in MODULES and "tileflow.integrations.jax.lowering" in MODULES
    assert "tileflow.patterns.rms_norm" in MODULES
    # tileflow/__init__.py imports the transformers patch inside patch(): counted
    assert "tileflow.integrations.transformers.patch" in GRAPH["tileflow"]
    assert "tileflow.tile.ir" in GRAPH["tileflow.tile.builder"]


def test_no_import_cycle():
    cycles = [c for c in _cycles(GRAPH) if frozenset(c) not in KNOWN_CYCLES]
    lines = []
    for component in cycles:
        inside = set(component)
        edges = [_where(a, b) for a in component for b in GRAPH[a] if b in inside]
        lines.append(" <-> ".join(component) + "\n    " + "\n    ".join(edges))
    assert not cycles, "import cycles among tileflow modules (function-local imports included):\n" + "\n".join(lines)


def test_the_ladder_holds_and_integrations_stay_apart():
    new = [(a, b, rule) for a, b, rule in _violations(GRAPH) if (a, b) not in KNOWN_EDGES]
    assert not new, "layering violations:\n" + "\n".join(f"{_where(a, b)}: {rule}" for a, b, rule in new)


def test_the_checks_catch_a_violation():
    """The rules above are not vacuous: an edge of each kind is reported."""
    graph = {importer: dict(edges) for importer, edges in GRAPH.items()}
    graph["tileflow.tile.ir"]["tileflow.emit.cache"] = [1]
    graph["tileflow.integrations.jax.ops"]["tileflow.integrations.onnx.files"] = [1]
    found = {(a, b) for a, b, _ in _violations(graph)}
    assert ("tileflow.tile.ir", "tileflow.emit.cache") in found
    assert ("tileflow.integrations.jax.ops", "tileflow.integrations.onnx.files") in found
    assert any({"tileflow.tile.ir", "tileflow.emit.cache"} <= set(c) for c in _cycles(graph))


# ------------------------------------------------------------------ importing each alone
_RUNNER = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    modules, preload, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    loaded = [m for m in sys.modules if m == "tileflow" or m.startswith("tileflow.")]
    assert not loaded, f"preloading imported tileflow modules: {loaded}"

    def child(name):
        try:
            importlib.import_module(name)
            result = {"ok": True}
        except ModuleNotFoundError as e:
            result = {"ok": False, "missing": (e.name or "").split(".")[0], "error": traceback.format_exc()}
        except BaseException:
            result = {"ok": False, "missing": "", "error": traceback.format_exc()}
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(result, f)

    running, jobs = {}, max(2, os.cpu_count() or 1)
    pending = list(modules)
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            sys.stdout.flush(); sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    child(name)
                finally:
                    os._exit(0)
            running[pid] = name
        pid, status = os.wait()
        name = running.pop(pid)
        if not os.path.exists(os.path.join(out, name + ".json")):
            with open(os.path.join(out, name + ".json"), "w") as f:
                json.dump({"ok": False, "missing": "", "error": f"the child died (wait status {status})"}, f)
""")


@pytest.fixture(scope="module")
def imported_alone(tmp_path_factory):
    out = tmp_path_factory.mktemp("imports")
    if hasattr(os, "fork"):
        proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(list(MODULES)), json.dumps(PRELOAD),
                               str(out)], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return {name: json.loads((out / f"{name}.json").read_text()) for name in MODULES}
    results = {}  # no fork: one interpreter a module
    for name in MODULES:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        missing = ""
        if "ModuleNotFoundError: No module named '" in proc.stderr:
            missing = proc.stderr.rsplit("No module named '", 1)[1].split("'")[0].split(".")[0]
        results[name] = {"ok": proc.returncode == 0, "missing": missing, "error": proc.stderr[-4000:]}
    return results


@pytest.mark.parametrize("module", list(MODULES))
def test_module_imports_alone(module, imported_alone):
    result = imported_alone[module]
    if result["ok"]:
        return
    if result["missing"] in OPTIONAL:
        pytest.skip(f"{module}: optional dependency {result['missing']!r} is not installed")
    pytest.fail(f"`import {module}` in a fresh interpreter failed:\n{result['error']}", pytrace=False)
