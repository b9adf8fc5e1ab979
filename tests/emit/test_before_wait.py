"""``k.before_wait()``: weight loads issued before the programmatic-dependent-launch wait.

The interpreter has no dependent launch, so what CPU can check is the text: a
pipelined matvec's first weight tiles come before ``gdc_wait`` (under ``EARLY``, with
the wait first otherwise), ``x`` (which the previous kernel writes) only after it, and
a definition that would read a kernel's output or store early fails when built. The
numbers of the pipelined forms are the suite tests' ``pipeline`` cases."""

import pytest

from tileflow.emit.cache import generate
from tileflow.suite import KERNELS
from tileflow.tile.builder import TileBuilder, TileDefinitionError


def _source(kernel_name: str, label: str = "pipeline") -> str:
    kernel = KERNELS[kernel_name]
    case = next(c for c in kernel.test_cases if c.label == label)
    return generate(kernel.build(kernel.params_for(case)), "triton")


@pytest.mark.parametrize("name", ["rms_norm_gate_up_silu", "matvec_residual", "rms_norm_matvec", "qkv_rope_cache"])
def test_first_weight_tiles_load_before_the_wait(name):
    src = _source(name)
    body = src[src.index("@triton.jit"):src.index("def launch(")]
    skip_wait = body.index("if USE_PDL and not EARLY:")
    late_wait = body.index("if EARLY:\n")
    first_load = body.index("tl.load(")
    assert skip_wait < first_load < late_wait  # early: loads, then the wait; EARLY=0: the wait first
    assert "x_ptr" not in body[:late_wait].split("tl.load(", 1)[1].split("for start")[0]  # x is not read early
    assert body.index("tl.extra.cuda.gdc_launch_dependents()") > late_wait
    assert "EARLY = USE_PDL\n" in src  # on with dependent launch, read from no environment


def test_unpipelined_kernel_keeps_one_wait():
    src = _source("matvec_residual", "tiny")
    assert "EARLY: tl.constexpr" not in src and "if EARLY" not in src
    assert src.count("tl.extra.cuda.gdc_wait()") == 1


def _builder():
    k = TileBuilder("probe", {"BLOCK": 16})
    return k, k.input("w", ("N",)), k.output("out", ("N",))


def test_early_load_of_an_output_is_refused():
    k, _, out = _builder()
    with k.stage("main", grid=("1",)):
        with pytest.raises(TileDefinitionError, match="not an input"):
            with k.before_wait():
                k.load(out, (k.range(0, "BLOCK"),))


def test_early_store_is_refused():
    k, w, out = _builder()
    with k.stage("main", grid=("1",)):
        with pytest.raises(TileDefinitionError, match="no store"):
            with k.before_wait():
                k.store(out, (k.range(0, "BLOCK"),), k.load(w, (k.range(0, "BLOCK"),)))


def test_before_wait_inside_a_loop_is_refused():
    k, w, _ = _builder()
    with k.stage("main", grid=("1",)):
        with k.loop(0, 4, 1, carry=[k.full(("BLOCK",), 0.0)]) as lp:
            with pytest.raises(TileDefinitionError, match="top level"):
                with k.before_wait():
                    pass
            lp.next(lp.carry[0])
