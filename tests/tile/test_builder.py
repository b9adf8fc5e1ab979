"""The tile language rejects malformed definitions at definition time."""

import pytest

from tileflow.tile import TileBuilder, TileDefinitionError


def _builder(**params):
    return TileBuilder("t", {"B": 16, "C": 32, **params})


def test_store_shape_must_match_block():
    k = _builder()
    x = k.input("x", ("N",))
    out = k.output("out", ("N",))
    with pytest.raises(TileDefinitionError, match="storing"):
        with k.stage("s", grid=("1",)):
            r16 = k.range(0, "B")
            r32 = k.range(0, "C")
            k.store(out, (r32,), k.load(x, (r16,)))


def test_broadcast_mismatch_is_an_error():
    k = _builder()
    x = k.input("x", ("N",))
    with pytest.raises(TileDefinitionError, match="broadcast"):
        with k.stage("s", grid=("1",)):
            _ = k.load(x, (k.range(0, "B"),)) + k.load(x, (k.range(0, "C"),))


def test_storage_dtype_tiles_only_feed_dots():
    k = _builder()
    x = k.input("x", ("N", "M"))
    with pytest.raises(TileDefinitionError, match="only feeds dot"):
        with k.stage("s", grid=("1",)):
            t = k.load(x, (k.range(0, "B"), k.range(0, "C")), for_dot=True)
            _ = t * 2.0


def test_unknown_block_parameter():
    k = _builder()
    k.input("x", ("N",))
    with pytest.raises(TileDefinitionError, match="not a parameter"):
        with k.stage("s", grid=("1",)):
            k.range(0, "NOPE")


def test_loop_carry_must_keep_its_type():
    k = _builder()
    x = k.input("x", ("N",))
    with pytest.raises(TileDefinitionError, match="carried value"):
        with k.stage("s", grid=("1",)):
            acc = k.full(("B",), 0.0)
            with k.loop(0, k.dim("N"), "B", carry=[acc]) as lp:
                lp.next(k.sum(lp.carry[0] + k.load(x, (k.range(lp.index, "B"),)), axis=0))


def test_index_rank_must_match_view():
    k = _builder()
    x = k.input("x", ("N", "M"))
    with pytest.raises(TileDefinitionError, match="rank"):
        with k.stage("s", grid=("1",)):
            k.load(x, (k.range(0, "B"),))
