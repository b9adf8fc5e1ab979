"""``k.launch_dependents()``: where the next launch's programs may start.

By default a stage lets its dependents launch right after its own dependent-launch
wait. A definition may place the point itself (e.g. after a stage's partial results are
stored, before a last program's combine); the emitter then issues it there and nowhere
else. The interpreter has no dependent launch, so CPU checks the text, on a small kernel
of its own (the one-launch attention that used it measured slower: docs/decisions.md)."""

import pytest

from tests.emit.test_counters import group_sum_ir
from tileflow.emit.cache import generate
from tileflow.tile.builder import TileBuilder, TileDefinitionError


def _stage(late: bool) -> str:
    """The group sum of tests/emit/test_counters.py, its stage's generated Triton body."""
    src = generate(group_sum_ir(late=late, name="late"), "triton")
    return src[src.index("def late_main("):src.index("def launch(")]


def test_late_launch_follows_the_partial_stores():
    body = _stage(late=True)
    assert body.count("tl.extra.cuda.gdc_launch_dependents()") == 1
    launch = body.index("tl.extra.cuda.gdc_launch_dependents()")
    assert body.index("tl.extra.cuda.gdc_wait()") < body.rindex("tl.store(part_ptr", 0, launch) < launch
    assert launch < body.index("tl.atomic_add(done_ptr")  # before the count that picks the combining program


def test_without_it_dependents_launch_right_after_the_wait():
    body = _stage(late=False)
    assert body.count("tl.extra.cuda.gdc_launch_dependents()") == 1
    after_wait = body[body.index("tl.extra.cuda.gdc_wait()"):]
    assert after_wait.index("gdc_launch_dependents") < after_wait.index("tl.load(")


def _builder():
    k = TileBuilder("probe", {"BLOCK": 16})
    return k, k.input("w", ("N",)), k.output("out", ("N",))


def test_launch_dependents_inside_a_loop_or_twice_is_refused():
    k, w, out = _builder()
    with k.stage("main", grid=("1",)):
        with k.loop(0, 4, 1, carry=[k.full(("BLOCK",), 0.0)]) as lp:
            with pytest.raises(TileDefinitionError, match="top level"):
                k.launch_dependents()
            lp.next(lp.carry[0])
        k.launch_dependents()
        with pytest.raises(TileDefinitionError, match="once"):
            k.launch_dependents()


def test_launch_dependents_before_the_wait_is_refused():
    k, w, _ = _builder()
    with k.stage("main", grid=("1",)):
        with k.before_wait():
            with pytest.raises(TileDefinitionError, match="not before the wait"):
                k.launch_dependents()
