#!/usr/bin/env python3
"""Run pytest from a source checkout that is not pip-installed (the GPU machine):
``PYTHONPATH=src python benchmarks/pytest_uninstalled.py -q tests/...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

from run_cli_uninstalled import map_source_packages  # noqa: E402

if __name__ == "__main__":
    map_source_packages()
    sys.exit(pytest.main(sys.argv[1:]))
