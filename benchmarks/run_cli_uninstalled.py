#!/usr/bin/env python3
"""Run the ``tileflow`` command from a source checkout that is not pip-installed (the
GPU machine has no network): maps ``tileflow.integrations`` / ``tileflow.patterns``
as setup.cfg does and registers the dynamo backend, then hands over to the CLI.
``PYTHONPATH=src python benchmarks/run_cli_uninstalled.py bench ...``
(``benchmarks/pytest_uninstalled.py`` does the same for the tests.)"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def map_source_packages() -> None:
    """Make ``tileflow.integrations`` / ``tileflow.patterns`` importable from the checkout
    and register the ``tileflow`` dynamo backend, as an install would."""
    for sub in ("integrations", "patterns"):
        if f"tileflow.{sub}" in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(f"tileflow.{sub}", ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"tileflow.{sub}"] = module
        spec.loader.exec_module(module)

    from torch._dynamo.backends.registry import register_backend

    from tileflow.integrations.torch.backend import tileflow_backend

    register_backend(tileflow_backend, "tileflow")


if __name__ == "__main__":
    map_source_packages()
    from tileflow.cli import main

    sys.exit(main(sys.argv[1:]))
