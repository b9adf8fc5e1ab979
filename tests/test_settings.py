"""tileflow's options: read from the environment once, overridden per call; on CPU the
default leaves models unchanged (the suite's CPU path is the slower verified reference)."""

import subprocess
import sys

import pytest

import tileflow
from tileflow import settings


def test_a_per_call_option_overrides_the_environment():
    assert settings.ENVIRONMENT.cpu  # tests/conftest.py sets TILEFLOW_CPU=1
    assert settings.resolve({"cpu": False}).cpu is False
    assert settings.resolve(tileflow.Options(cpu=False)).cpu is False
    assert settings.resolve(None) is settings.ENVIRONMENT


def test_the_environment_is_read_once_at_import():
    code = ("import os; os.environ['TILEFLOW_CPU'] = '1'; from tileflow import settings; "
            "os.environ['TILEFLOW_CPU'] = '0'; print(settings.resolve().cpu)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "TILEFLOW_CPU": "0"})
    assert out.stdout.strip() == "True"  # the value at import, not the later one


def test_unknown_options_and_bad_values_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown option.*cpus"):
        settings.resolve({"cpus": True})
    code = "from tileflow import settings"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PATH": "", "TILEFLOW_CPU": "maybe"})
    assert out.returncode != 0 and "TILEFLOW_CPU='maybe': expected 1 or 0" in out.stderr


def test_on_cpu_the_default_leaves_the_model_unchanged():
    from tests.integrations.test_transformers_patch import tiny

    model = tiny("qwen2")
    report = tileflow.patch(model, options={"cpu": False})
    assert not report.patched and "forward" not in model.__dict__
    assert any("on CPU" in reason for _, _, reason in report.fallbacks), str(report)
    assert tileflow.patch(model, options={"cpu": True}).patched


def test_the_docs_table_lists_every_option():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    assert settings.table() in docs
