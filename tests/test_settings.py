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


# ---------------------------------------------------------------- every option a field


def _fresh(env: dict, code: str) -> str:
    """``code``'s output in a fresh interpreter whose environment is ``env``."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "", **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_each_field_reads_its_variable_typed():
    env = {"TILEFLOW_PDL": "0", "TILEFLOW_EARLY_INPUTS": "false", "TILEFLOW_CPU_TARGET": "triton",
           "TILEFLOW_JAX_TARGET": "pallas", "TILEFLOW_PALLAS_INTERPRET": "1", "TILEFLOW_STATIC_SHAPES": "",
           "TILEFLOW_XLA_TARGET": ""}  # an empty value: the default (bool: off)
    got = _fresh(env, "from tileflow import settings as s; e = s.ENVIRONMENT; "
                      "print(e.pdl, e.early_inputs, e.cpu_target, e.jax_target, e.pallas_interpret, "
                      "e.static_shapes, e.xla_target, e.prefill)")
    assert got == "False False triton pallas 1 False auto True"


def test_a_value_outside_a_fields_choices_is_a_one_line_error():
    out = subprocess.run([sys.executable, "-c", "import tileflow"], capture_output=True, text=True,
                         env={"PATH": "", "TILEFLOW_JAX_TARGET": "gpu"})
    assert out.returncode != 0 and "TILEFLOW_JAX_TARGET='gpu': expected one of auto, pallas, triton, reference" \
        in out.stderr
    with pytest.raises(ValueError, match="option cpu_target='cuda'"):
        settings.resolve({"cpu_target": "cuda"})
    with pytest.raises(ValueError, match="option xla_target"):
        tileflow.Options(xla_target="tpu")


def test_only_settings_reads_the_environment():
    """Every option is a field read here once; the rest of tileflow reads no environment."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = [f"{p.relative_to(root)}:{i}" for d in ("src", "integrations", "patterns") for p in (root / d).rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"os\.environ|os\.getenv|getenv\(", line) and p.name != "settings.py"]
    assert found == []


def test_generated_triton_reads_no_environment():
    from tileflow.emit.cache import generate
    from tileflow.suite import KERNELS

    for name in ("qkv_rope_cache", "matvec_residual", "gqa_attention"):
        kernel = KERNELS[name]
        case = kernel.test_cases[0]
        src = generate(kernel.build(kernel.params_for(case)), "triton")
        assert "os.environ" not in src and "import os" not in src, name
        assert "def launch(" in src and "*, pdl=True, interpret=False):" in src


def test_the_decode_program_takes_early_inputs_per_call(tileflow_options):
    from tests.integrations.test_transformers_patch import tiny
    from tileflow.integrations.transformers.decode_step import DecodeProgram
    from tileflow.integrations.transformers.compat import rope_config_of

    model = tiny("qwen2")
    rope, _ = rope_config_of(model.config)
    tileflow_options(early_inputs=True)
    assert DecodeProgram(model, rope).early is True
    assert DecodeProgram(model, rope, options={"early_inputs": False}).early is False
    tileflow_options(early_inputs=False)
    assert DecodeProgram(model, rope).early is False
    assert DecodeProgram(model, rope, options=tileflow.Options(early_inputs=True)).early is True


def test_graphed_prefill_takes_prefill_graphs_per_call(tileflow_options):
    from tests.integrations.test_transformers_patch import tiny
    from tileflow.integrations.transformers.prefill import GraphedPrefill, PrefillProgram

    program = PrefillProgram(tiny("llama"))
    tileflow_options(prefill_graphs=True)
    assert GraphedPrefill(program).enabled and not GraphedPrefill(program, options={"prefill_graphs": False}).enabled
    tileflow_options(prefill_graphs=False)
    assert not GraphedPrefill(program).enabled and GraphedPrefill(program, options={"prefill_graphs": True}).enabled


def test_the_backend_takes_compile_fused_per_call(tileflow_options, monkeypatch):
    """``torch.compile(..., backend="tileflow", options={"compile_fused": False})`` skips the
    fused rewrite of the dynamo graph whatever the environment says, and the other way round."""
    import torch

    from tileflow.integrations.torch import decode_graph

    runs = []
    monkeypatch.setattr(decode_graph, "rewrite_decode_graph", lambda gm, report, architectures=(): runs.append(1))
    x = torch.randn(4, 8)
    for env, given, want in ((True, {}, 1), (True, {"compile_fused": False}, 0), (False, {}, 0),
                             (False, {"compile_fused": True}, 1)):
        tileflow_options(compile_fused=env)
        runs.clear()
        torch._dynamo.reset()
        fn = torch.compile(lambda t: t * 2 + 1, backend="tileflow", options={"cpu": True, **given})
        assert torch.equal(fn(x), x * 2 + 1)
        assert len(runs) == want, (env, given)
    torch._dynamo.reset()


def test_cpu_target_is_read_when_a_launcher_is_built(tileflow_options):
    import torch

    from tileflow.runtime import ops

    x, w = torch.randn(1, 64), torch.rand(64) + 0.5
    try:
        for target in ("reference", "triton"):
            tileflow_options(cpu_target=target)
            ops._LAUNCHERS.clear()
            assert ops.cpu_target() == target
            torch.testing.assert_close(ops.rms_norm(x, w, 1e-6),
                                       x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
            fn = next(iter(ops._LAUNCHERS.values()))
            assert getattr(fn, "__qualname__", "").startswith("_reference_launcher") == (target == "reference")
    finally:
        ops._LAUNCHERS.clear()


def test_pdl_is_a_launch_argument_fixed_when_the_launcher_is_built(tileflow_options):
    from tileflow.runtime.torch_triton import triton_launcher
    from tileflow.suite import KERNELS

    kernel = KERNELS["rms_norm"]
    ir = kernel.build(kernel.params_for(kernel.test_cases[0]))
    tileflow_options(pdl=False)
    assert triton_launcher(ir, "cpu").keywords == {"pdl": False, "interpret": True}
    tileflow_options(pdl=True)
    assert triton_launcher(ir, "cpu").keywords == {"pdl": True, "interpret": True}


def test_jax_target_per_call_and_per_block(tileflow_options):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from tileflow import jax as tfj

    seen = []

    def step(x):
        seen.append(tfj.jax_target())
        return x + 1

    tileflow_options(jax_target="reference")
    tfj.optimize(step, options={"jax_target": "pallas"})(jnp.ones(3))  # traced, then run (nothing swapped)
    tfj.optimize(step)(jnp.ones(3))
    with tfj.targeting("triton"):
        inside = tfj.jax_target()
    assert seen == ["pallas", "pallas", "reference", "reference"] and inside == "triton"
    assert tfj.jax_target() == "reference"
    with pytest.raises(ValueError, match="target 'gpu'"):
        with tfj.targeting("gpu"):
            pass


def test_pallas_options_fix_the_launch(tileflow_options):
    pytest.importorskip("jax")
    from tileflow.runtime import jax_pallas
    from tileflow.suite import KERNELS

    kernel = KERNELS["rms_norm"]
    ir = kernel.build(kernel.params_for(kernel.test_cases[0]))
    tileflow_options(pallas_interpret="0", pallas_masked_stores="1")
    assert jax_pallas.default_interpret() is False
    assert jax_pallas.pallas_launcher(ir).keywords == {"masked_stores": True}
    tileflow_options(pallas_interpret="1", pallas_masked_stores="auto")
    assert jax_pallas.default_interpret() is True and not hasattr(jax_pallas.pallas_launcher(ir), "keywords")


def test_the_docs_describe_every_option():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    for name in settings.names():
        assert f"- `{name}`:" in docs, name
