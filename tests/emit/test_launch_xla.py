"""``launch_xla``: each generated Triton kernel's stages with their pointers reordered
for an XLA custom call (the JAX Triton target). Run here on torch tensors under the Triton
interpreter (target ``triton_xla`` of ``tileflow.verify``): every kernel's first case,
against the float64 reference with poisoned outputs and workspaces, and bit for bit
against the torch ``launch`` of the same kernel on the same inputs."""

import pytest

from tileflow.suite import KERNELS
from tileflow.verify import verify

# each kernel's first case for every target, else (a Triton-only kernel) its first Triton case
CASES = [(name, next((c for c in k.test_cases if not c.targets), None)
          or next(c for c in k.test_cases if c.runs_on("triton"))) for name, k in sorted(KERNELS.items())]


@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_custom_call_form_matches_launch(name, case):
    kernel = KERNELS[name]
    got = verify(kernel, case, "fp32", "triton_xla", seed=1234)
    assert got.ok, got.line()
    same = verify(kernel, case, "fp32", "triton", seed=1234)
    assert got.errors == same.errors, (got.errors, same.errors)


def test_static_launch_keeps_a_torch_views_strides():
    """The static-shape launch (option ``static_shapes``): torch tensors may be views; their
    own strides are compiled in (row-major is only what XLA hands over)."""
    import torch

    from tileflow.runtime.torch_triton import triton_launcher, use_interpreter_if_no_gpu
    from tileflow.runtime.torch_triton import torch_static_launcher

    kernel = KERNELS["matvec_residual"]
    sizes = {"M": 1, "N": 32, "K": 64}
    ir = kernel.build({**kernel.default_params(sizes), **kernel.structural_sizes(sizes)})
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2 * 64, generator=gen)[:, ::2]  # stride 2 along K
    w, r = torch.randn(32, 64, generator=gen), torch.randn(1, 32, generator=gen)
    want, got = torch.full((1, 32), float("nan")), torch.full((1, 32), float("nan"))
    triton_launcher(ir, "cpu")(x, w, r, want)
    torch_static_launcher(ir, use_interpreter_if_no_gpu())(x, w, r, got)
    assert torch.equal(got, want) and torch.allclose(want, x @ w.T + r, atol=1e-4)


def test_decode_launches_compile_their_shapes_in(tileflow_options):
    """One-row launches take the constant-shape form; prefill-sized ones, kernels with
    persistent counters, and the option ``static_shapes=False`` keep the generic launcher."""
    from tests.emit.test_counters import group_sum_ir
    from tileflow.runtime.torch_triton import static_shapes_wanted

    mv = KERNELS["matvec_residual"]
    one, many = {"M": 1, "N": 32, "K": 64}, {"M": 7, "N": 32, "K": 64}
    build = lambda k, s: k.build({**k.default_params(s), **k.structural_sizes(s)})  # noqa: E731
    tileflow_options(static_shapes=True)
    assert static_shapes_wanted(build(mv, one), one)
    assert not static_shapes_wanted(build(mv, many), many)
    assert not static_shapes_wanted(group_sum_ir(), {"B": 1})  # counters: the generic launcher owns them
    assert not static_shapes_wanted(build(mv, one), one, {"static_shapes": False})  # a call's options win
    tileflow_options(static_shapes=False)
    assert not static_shapes_wanted(build(mv, one), one)


# the shipped H100 tables run down and qkv with PIPELINE=2 (first round before the wait),
# which the JAX step looks up too
FIRST_ROUND = [(name, next(c for c in KERNELS[name].test_cases if c.label == "first-round"))
               for name in ("matvec_residual", "qkv_rope_cache")]


@pytest.mark.parametrize("name,case", FIRST_ROUND, ids=[n for n, _ in FIRST_ROUND])
def test_custom_call_form_of_the_first_round_form(name, case):
    got = verify(KERNELS[name], case, "fp32", "triton_xla", seed=99)
    assert got.ok, got.line()
