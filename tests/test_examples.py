"""The transformers example runs on this machine's device and its fp32 CPU paths
decode the same greedy tokens as eager."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_example_tokens_equal_eager_on_cpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU run (tiny, fp32) on any machine
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "transformers_decode.py"), "--new", "8"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("tileflow.patch: qwen2: patched") for line in lines), out.stdout
    for path in ("tileflow.patch ", 'backend="tileflow"'):
        (row,) = [line for line in lines if line.startswith(path)]
        assert "tokens all equal" in row, row
