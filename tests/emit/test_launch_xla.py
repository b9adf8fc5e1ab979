"""``launch_xla``: each generated Triton kernel's stages with their pointers reordered
for an XLA custom call (jax_triton). Run here on torch tensors under the Triton
interpreter (target ``triton_xla`` of ``tileflow.verify``): every kernel's first case,
against the float64 reference with poisoned outputs and workspaces, and bit for bit
against the torch ``launch`` of the same kernel on the same inputs."""

import pytest

from tileflow.emit.cache import generate
from tileflow.suite import KERNELS
from tileflow.verify import verify

CASES = [(name, next(c for c in k.test_cases if c.runs_on("triton") and not c.targets))
         for name, k in sorted(KERNELS.items())]


@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_custom_call_form_matches_launch(name, case):
    kernel = KERNELS[name]
    got = verify(kernel, case, "fp32", "triton_xla", seed=1234)
    assert got.ok, got.line()
    same = verify(kernel, case, "fp32", "triton", seed=1234)
    assert got.errors == same.errors, (got.errors, same.errors)


def test_counters_have_no_custom_call_form():
    from tileflow.verify import make_inputs, poisoned_outputs
    import torch

    kernel = KERNELS["attention_decode_gqa"]
    case = next(c for c in kernel.test_cases if c.label == "one_launch")
    ir = kernel.build(kernel.params_for(case))
    assert "def launch_xla(" in generate(ir, "triton")
    with pytest.raises(NotImplementedError, match="persistent counters"):
        verify(kernel, case, "fp32", "triton_xla", seed=1)
