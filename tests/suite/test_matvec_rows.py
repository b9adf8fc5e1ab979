"""A matvec step of several rows (a batch, or speculative tokens) reads each weight tile
once for all of them: ``BLOCK_M`` rows a program, the grid's third axis
``cdiv(M, BLOCK_M)``, so the weight bytes a launch reads do not grow with M (decode is
memory-bound). One row keeps the one-row program. The numbers of the many-row forms are
the suite tests' ``rows*`` cases (and every other case with M > 1)."""

import math

import pytest

from tileflow.emit.cache import generate
from tileflow.suite import KERNELS
from tileflow.suite.matvec_family import block_m
from tileflow.tile.ir import ops_in

FAMILY = ["matvec", "matvec_pair", "matvec_residual", "gate_up_silu", "rms_norm_gate_up_silu", "rms_norm_matvec"]
# the ways of streaming K: plain, split-K (two stages), pipelined, first round peeled
VARIANTS = {"plain": {}, "splitk": dict(SPLIT_K=3), "pipeline": dict(PIPELINE=1), "first-round": dict(PIPELINE=2)}


def _sizes(m: int) -> dict:
    return dict(M=m, N=96, K=1000)


def _params(name: str, m: int, variant: str) -> dict:
    kernel = KERNELS[name]
    return {**kernel.default_params(_sizes(m)), "BLOCK_K": 128, **VARIANTS[variant]}


def _weights(ir) -> set:
    return {v.name for v in ir.inputs if v.shape == ("N", "K")}


def weight_tiles_read(name: str, m: int, variant: str) -> int:
    """Weight rows the matvec stage loads over its whole grid for one K round each
    (programs x weight loads in a program's body x BLOCK_N: the many-row tiles differ)."""
    ir = KERNELS[name].build(_params(name, m, variant))
    stage = ir.stages[0]
    env = {**_sizes(m), **ir.params, "cdiv": lambda a, b: -(-a // b)}
    programs = math.prod(eval(g, env) for g in stage.grid)  # noqa: S307 (the IR's own grid text)
    loads = [op for op in ops_in(stage.body) if op.name == "load" and op.args[0].name in _weights(ir)]
    return programs * len(loads) * ir.params["BLOCK_N"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", FAMILY)
def test_weight_reads_do_not_grow_with_rows(name, variant):
    one = weight_tiles_read(name, 1, variant)
    for m in (2, 5, 8, 16):
        assert weight_tiles_read(name, m, variant) == one, m


@pytest.mark.parametrize("name", FAMILY)
def test_generated_triton_tiles_rows(name):
    one = generate(KERNELS[name].build(_params(name, 1, "plain")), "triton")
    many = generate(KERNELS[name].build(_params(name, 8, "plain")), "triton")
    ir = KERNELS[name].build(_params(name, 8, "plain"))
    assert ir.stages[0].grid == ("cdiv(N, BLOCK_N)", "SPLIT_K", "cdiv(M, BLOCK_M)")
    assert "[(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))](" in many
    assert "BLOCK_M: tl.constexpr" in many and "BLOCK_M" not in one
    for w in _weights(ir):
        # one weight load a K round whatever the rows; x's rows masked to M
        assert many.count(f"tl.load({w}_ptr") == one.count(f"tl.load({w}_ptr") == 1
    assert " < M)" in many.split("tl.load(x_ptr", 1)[1].split("\n")[0]


@pytest.mark.parametrize("name", FAMILY)
def test_x_tile_is_rows_by_k(name):
    ir = KERNELS[name].build(_params(name, 8, "plain"))
    x_loads = [op for op in ops_in(ir.stages[0].body) if op.name == "load" and op.args[0].name == "x"]
    w_loads = [op for op in ops_in(ir.stages[0].body) if op.name == "load" and op.args[0].name in _weights(ir)]
    assert x_loads and all(op.result.shape == ("BLOCK_M", "BLOCK_K") for op in x_loads)
    assert all(op.result.shape == ("BLOCK_N", "BLOCK_K") for op in w_loads)


def test_rows_a_program():
    assert [block_m(m) for m in (2, 3, 5, 8, 9, 16, 17, 64)] == [2, 4, 8, 8, 16, 16, 16, 16]
    for name in FAMILY:
        kernel = KERNELS[name]
        # one row: no BLOCK_M at all, so the one-row program's text is what it was
        assert "BLOCK_M" not in kernel.default_params(_sizes(1))
        # several rows: a tensor-core dot, every tile side at least 16 (rows past M masked)
        many = kernel.default_params(_sizes(5))
        assert many["BLOCK_M"] == 16 and many["DOT"] == 1 and many["BLOCK_N"] >= 16
        cands = kernel.candidates(dict(M=8, N=1536, K=1536))
        assert cands and {c["BLOCK_M"] for c in cands} == {16} and all(c["DOT"] for c in cands)
        assert all("BLOCK_M" not in c for c in kernel.candidates(dict(M=1, N=1536, K=1536)))


@pytest.mark.parametrize("name", FAMILY)
def test_several_rows_multiply_on_tensor_cores(name):
    """The default many-row program sums a round's products with one ``tl.dot`` of the
    weights as stored (no per-round [BLOCK_M, BLOCK_N, BLOCK_K] reduction on the CUDA
    cores, which made a step of M rows cost about M steps of one)."""
    ir = KERNELS[name].build(KERNELS[name].default_params(_sizes(8)))
    body = list(ops_in(ir.stages[0].body))
    dots = [op for op in body if op.name == "dot"]
    assert len(dots) == len(_weights(ir))
    assert not [op for op in body if op.name == "reduce" and len(op.args[0].shape) == 3]
    text = generate(ir, "triton")
    assert text.count("tl.dot(") == len(dots)
