"""``LAUNCH_AT_START``: a launch's programs let the next launch in at their start.

By default each program issues programmatic dependent launch's trigger
(``gdc_launch_dependents``) right after its own ``gdc_wait``. With the launch parameter
``LAUNCH_AT_START`` (set by the caller, e.g. the decode step's ``launch_at_start``
option; never by a tuning table) it is the program's first statement, and there is none
after the wait. The interpreter has no dependent launch (``USE_PDL`` is off there), so
CPU checks the text, that the parameter absent leaves every kernel's text as it was, and
that results do not change; ``test_triton_hopper_build.py`` checks the sm_90 PTX."""

import re

import pytest

from tileflow.emit.cache import generate
from tileflow.emit.triton import emit_triton
from tileflow.suite import KERNELS
from tileflow.suite.registry import QWEN_1_5B
from tileflow.tile.builder import TileBuilder

TRIGGER = "tl.extra.cuda.gdc_launch_dependents()"
WAIT = "tl.extra.cuda.gdc_wait()"

# the decode step's kernels, in forms that take each path of the wait's placement: the
# plain wait, weight tiles before it (PIPELINE), early inputs (EARLY_INPUTS), two stages
# (attention's split and combine)
_CASES = [("embedding_lookup", ""), ("qkv_rope_cache", "early"), ("gqa_attention", ""),
          ("gqa_attention", "early"), ("matvec_residual", "tiny"), ("matvec_residual", "first-round-early"),
          ("rms_norm_gate_up_silu", "pipeline"), ("rms_norm_matvec", "pipeline")]


def _params(name: str, label: str) -> dict:
    kernel = KERNELS[name]
    if not label:  # the 1.5B's decode shape (attention's splits: two stages)
        case = kernel.decode_cases(QWEN_1_5B)[0]
        return {**kernel.params_for(case), **kernel.structural_sizes(case.sizes)}
    return kernel.params_for(next(c for c in kernel.test_cases if c.label == label))


def _stages(src: str) -> list[str]:
    """Each ``@triton.jit`` stage function's text (the XLA wrappers only call them)."""
    body = src[:src.index("def launch(")]
    return [s for s in body.split("@triton.jit")[1:]]


@pytest.mark.parametrize("name,label", _CASES)
def test_the_trigger_comes_first_once_and_not_after_the_wait(name, label):
    params = _params(name, label)
    stages = _stages(emit_triton(KERNELS[name].build({**params, "LAUNCH_AT_START": 1})))
    assert stages
    for st in stages:
        assert st.count(TRIGGER) == 1, st
        lines = [ln.strip() for ln in st.splitlines()]
        first = lines.index("):") + 1  # the first statement of the body
        assert lines[first].startswith("if USE_PDL and LAUNCH_AT_START:")
        assert lines[first + 1] == TRIGGER
        assert st.index(TRIGGER) < st.index(WAIT)
        assert TRIGGER not in st[st.index(WAIT):]
        assert "LAUNCH_AT_START: tl.constexpr" in st


@pytest.mark.parametrize("name,label", _CASES)
def test_without_it_the_trigger_follows_the_wait(name, label):
    params = _params(name, label)
    stages = _stages(emit_triton(KERNELS[name].build(params)))
    for st in stages:
        assert st.count(TRIGGER) == 1 and st.index(WAIT) < st.index(TRIGGER)
        assert "LAUNCH_AT_START" not in st


@pytest.mark.parametrize("name,label", _CASES)
def test_at_zero_only_the_constexpr_lines_differ(name, label):
    """The parameter given as 0: the same text as without it, but for the constexpr in the
    banner, the signature, the launcher's binding and its launch lines."""
    params = _params(name, label)
    kernel = KERNELS[name]
    without = emit_triton(kernel.build(params))
    zero = emit_triton(kernel.build({**params, "LAUNCH_AT_START": 0}))
    assert zero != without

    def drop(src: str) -> str:
        src = re.sub(r", LAUNCH_AT_START=0|LAUNCH_AT_START=0, ", "", src)  # the banner's parameter list
        src = re.sub(r"LAUNCH_AT_START=LAUNCH_AT_START, ", "", src)  # the launch lines
        src = re.sub(r'"LAUNCH_AT_START": LAUNCH_AT_START, ', "", src)  # launch_xla's meta
        src = re.sub(r"LAUNCH_AT_START, ", "", src)  # the XLA wrappers' calls
        return "\n".join(ln for ln in src.splitlines() if "LAUNCH_AT_START" not in ln)

    assert drop(zero) == "\n".join(without.splitlines())


def test_a_definitions_own_launch_point_gives_way():
    """A stage that places ``k.launch_dependents`` itself: with LAUNCH_AT_START the
    trigger is the program's first statement and the definition's point issues nothing."""
    def build(at_start: int) -> str:
        params = {"BLOCK": 16, **({"LAUNCH_AT_START": 1} if at_start else {})}
        k = TileBuilder("late", params)
        w, out = k.input("w", ("N",)), k.output("out", ("N",))
        with k.stage("main", grid=("1",)):
            r = k.range(0, "BLOCK")
            v = k.load(w, (r,), limits={0: k.dim("N")})
            k.launch_dependents()
            k.store(out, (r,), v * 2.0, limits={0: k.dim("N")})
        st = _stages(generate(k.finish("probe"), "triton"))[0]
        return st

    st = build(1)
    assert st.count(TRIGGER) == 1 and st.index(TRIGGER) < st.index(WAIT)
    assert "k.launch_dependents: let in at the program's start" in st
    late = build(0)
    assert late.index(WAIT) < late.index("tl.load(") < late.index(TRIGGER)


@pytest.mark.parametrize("name,label", [("matvec_residual", "first-round-early"), ("gqa_attention", "early"),
                                        ("qkv_rope_cache", "early")])
def test_results_do_not_change(name, label):
    """Under the interpreter (no dependent launch) the kernel with the parameter computes
    what its reference does."""
    from tileflow.verify import verify

    kernel = KERNELS[name]
    case = next(c for c in kernel.test_cases if c.label == label)
    res = verify(kernel, case, "fp32", "triton", params={**kernel.params_for(case), "LAUNCH_AT_START": 1}, seed=3)
    assert res.ok, res.line()


def test_a_tuning_table_never_sets_it_and_the_tune_key_ignores_it(monkeypatch):
    """Only the caller says LAUNCH_AT_START: a table's entry that has it is not taken (the
    launch after must know, to load no early inputs), and the flag is no part of the key,
    so the tiles measured without it are the ones used with it."""
    import torch

    from tileflow.emit import autotune
    from tileflow.runtime import ops

    sizes = {"M": 1, "N": 45, "K": 91}
    key = autotune.tune_key("matvec_residual", sizes, "bf16", "NVIDIA H200")
    assert autotune.tune_key("matvec_residual", {**sizes, "LAUNCH_AT_START": 1}, "bf16", "NVIDIA H200") == key
    assert autotune.tune_key("embedding_lookup", {"M": 1, "D": 8, "V": 9, "LAUNCH_AT_START": 1}, "bf16", "x") \
        == autotune.tune_key("embedding_lookup", {"M": 1, "D": 8, "V": 9}, "bf16", "x")
    monkeypatch.setattr(ops, "_device_name", lambda device: "NVIDIA H200")
    entry = {**KERNELS["matvec_residual"].default_params(sizes), "BLOCK_N": 4, "LAUNCH_AT_START": 1}
    with autotune.overriding({key: entry}):
        got = ops.tuned_params("matvec_residual", sizes, torch.bfloat16, torch.device("cpu"))
        assert got["BLOCK_N"] == 4 and "LAUNCH_AT_START" not in got
        got = ops.tuned_params("matvec_residual", {**sizes, "LAUNCH_AT_START": 1}, torch.bfloat16,
                               torch.device("cpu"))
        assert got["BLOCK_N"] == 4 and got["LAUNCH_AT_START"] == 1
