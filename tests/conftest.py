"""Test session set-up: the Triton interpreter on machines without a GPU (it must be
on before triton is first imported), a private generated-code cache, the `full` marker
(exhaustive sweeps, deselected unless ``--full``: docs/testing.md), and a summary of
every kernel verification (errors and bounds) at the end of the run."""

import os
import tempfile

import pytest

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
os.environ.setdefault("TILEFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="tileflow-test-cache-"))
# the tests verify the suite on CPU, where by default tileflow leaves models unchanged
os.environ.setdefault("TILEFLOW_CPU", "1")
# compiled Triton's own cache: the GPU machine's pytest found no usable default for it
if not os.environ.get("TRITON_CACHE_DIR"):
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-test-cache-")

RESULTS = []


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the exhaustive sweeps (tests marked `full`: every kernel test case x target x "
                          "dtype, as `tileflow verify --full`); docs/testing.md")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: part of an exhaustive sweep; deselected unless pytest runs with --full "
                                       "(docs/testing.md)")
    # torch's own import of torch.utils.mkldnn (inductor's passes) uses its deprecated jit.script_method:
    # shown only to code in __main__ outside pytest, so not a user's warning
    config.addinivalue_line("filterwarnings", r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    """Without --full the sweeps marked `full` are deselected (not skipped: the default
    run covers what they check at least once, docs/testing.md)."""
    if config.getoption("--full", default=False):
        return
    swept = [item for item in items if item.get_closest_marker("full")]
    if swept:
        config.hook.pytest_deselected(items=swept)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


@pytest.fixture
def tileflow_options(monkeypatch):
    """Sets tileflow options for one test: ``tileflow_options(cpu_target="triton")``. The
    environment's options are read once, at import (``tileflow.settings.ENVIRONMENT``), so a
    test replaces that object rather than setting ``TILEFLOW_*`` variables."""
    import dataclasses

    from tileflow import settings

    def set_options(**fields):
        monkeypatch.setattr(settings, "ENVIRONMENT", dataclasses.replace(settings.ENVIRONMENT, **fields))

    return set_options


@pytest.fixture
def record_verification():
    return RESULTS.append


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("kernel verification: relative error vs float64 reference (bound per dtype)")
    worst = {}
    for r in RESULTS:
        key = (r.kernel, r.target, r.dtype)
        if key not in worst or not (r.max_error <= worst[key].max_error):
            worst[key] = r
    w = max(22, 2 + max(len(k) for k, _, _ in worst))
    tr.write_line(f"{'kernel':<{w}}{'target':<10}{'dtype':<6}{'worst rel. error':>17}{'bound':>8}  cases")
    for (kernel, target, dtype), r in sorted(worst.items()):
        n = sum(1 for x in RESULTS if (x.kernel, x.target, x.dtype) == (kernel, target, dtype))
        tr.write_line(f"{kernel:<{w}}{target:<10}{dtype:<6}{r.max_error:>17.2e}{r.bound:>8.0e}  {n}"
                      + ("" if r.ok else "  FAIL"))
