"""The tile language's cross-program mechanisms, on small kernels of their own (no suite
kernel uses them since the variants built on them measured slower, docs/decisions.md; a
dataflow step may again):

- ``k.counter`` / ``k.atomic_add``: the last program of a group to finish combines the
  group's partials (one launch instead of a second stage) and puts the counter back;
- ``k.accumulate``: every program adds its partial row into one fp32 buffer, the last (an
  acq_rel count) reads the sums past L1 and zeroes the buffer;
- ``k.signal`` / ``k.wait_ready``: a producer launch counts its stored rows per chunk, the
  launch after it waits per chunk instead of for the whole producer (no ``gdc_wait``).

Under the interpreter programs run one after another, so the numbers and the
bookkeeping (counters back at zero, launch after launch) are checked here; the text
checks the order of stores, barrier and atomics; Pallas refuses them clearly; misuse
fails when the kernel is built."""

import pytest
import torch

from tileflow.emit.cache import generate
from tileflow.tile.builder import TileBuilder, TileDefinitionError


def group_sum_ir(programs: int = 4, block: int = 16, late: bool = False, name: str = "group_sum"):
    """out[g] = sum over p of x[g, p]: program (p, g) stores its row of x as a partial,
    counts itself on ``done[g]``, and the group's last program sums the partials; with
    ``late`` the dependents are let in after the partials are stored."""
    k = TileBuilder(name, {"BLOCK": block, "P_BLOCK": programs})
    x = k.input("x", ("G", "P", "D"))
    out = k.output("out", ("G", "D"))
    part = k.workspace("part", ("G", "P", "D"))
    done = k.counter("done", ("G",))
    with k.stage("main", grid=("P", "G")):
        p, g = k.program_id(0), k.program_id(1)
        cols = k.range(0, "BLOCK", aligned=True)
        k.store(part, (g, p, cols), k.load(x, (g, p, cols)))
        if late:
            k.launch_dependents()
        last = k.eq(k.atomic_add(done, (g,), 1), k.dim("P") - 1)
        rows = k.range(0, "P_BLOCK", aligned=True)
        k.store(out, (g, cols), k.sum(k.load(part, (g, rows, cols), when=last), axis=0), when=last)
        k.store(done, (g,), 0, when=last)
    return k.finish("test: the last program of a group combines")


def row_sum_ir(block: int = 32):
    """out = sum over rows of x, by ``k.accumulate`` into ``acc`` and a count in ``done``."""
    k = TileBuilder("row_sum", {"BLOCK": block})
    x = k.input("x", ("P", "D"))
    acc = k.inout("acc", ("D",), "f32")
    done = k.inout("done", ("ONE",), "i32")
    out = k.output("out", ("D",))
    with k.stage("main", grid=("P",)):
        cols = k.range(0, "BLOCK", aligned=True)
        k.accumulate(acc, (cols,), k.load(x, (k.program_id(0), cols)))
        last = k.eq(k.atomic_add(done, (0,), 1), k.dim("P") - 1)
        k.store(out, (cols,), k.load(acc, (cols,), when=last), when=last)
        k.store(acc, (cols,), k.full(("BLOCK",), 0.0), when=last)
        k.store(done, (0,), 0, when=last)
    return k.finish("test: programs sum their rows by atomics")


def producer_ir(block: int = 8):
    """h = 2 x, each program then counting its stored rows on ``ready[chunk]``."""
    k = TileBuilder("ready_producer", {"BLOCK": block})
    x = k.input("x", ("N",))
    h = k.output("h", ("N",))
    ready = k.inout("ready", ("NC",), "i32")
    chunk = k.scalar("chunk", "i32")
    with k.stage("main", grid=("cdiv(N, BLOCK)",)):
        first = k.program_id(0) * k.param("BLOCK")
        rows = k.range(first, "BLOCK", aligned=True)
        k.store(h, (rows,), k.load(x, (rows,)) * 2.0)
        k.signal(ready, (first // chunk,), k.minimum(k.param("BLOCK"), k.dim("N") - first))
    return k.finish("test: a producer that signals per chunk")


def consumer_ir(block: int = 8):
    """y = sum(h) + r, each round of ``BLOCK`` rows of h waiting only for its chunks."""
    k = TileBuilder("ready_consumer", {"BLOCK": block})
    h = k.input("h", ("N",))
    r = k.input("r", ("ONE",))
    ready = k.input("ready", ("NC",), "i32")
    y = k.output("y", ("ONE",))
    chunk = k.scalar("chunk", "i32")
    with k.stage("main", grid=("1",)):
        n = k.dim("N")
        with k.loop(0, n, "BLOCK", carry=[k.full(("BLOCK",), 0.0)]) as lp:
            k.wait_ready(ready, lp.index, k.minimum(lp.index + k.param("BLOCK"), n), chunk, n, 1, guards=h)
            lp.next(lp.carry[0] + k.load(h, (k.range(lp.index, "BLOCK", aligned=True),)))
        one = k.range(0, "BLOCK", aligned=True)
        total = k.sum(lp.results[0], axis=0)
        k.store(y, (one,), k.load(r, (one,)) + total, limits={0: 1})
    return k.finish("test: a consumer that waits per chunk")


def _launch(ir):
    from tileflow.runtime.torch_triton import triton_launcher

    return triton_launcher(ir, "cpu")


def _module(launch):
    return __import__(launch.func.__module__, fromlist=["_COUNTERS"])


def test_repeated_launches_stay_right_and_leave_counters_at_zero():
    ir = group_sum_ir()
    launch = _launch(ir)
    for seed in (1, 2, 3):  # launch after launch, as a CUDA graph replays it
        x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(seed))
        out = torch.full((3, 16), float("nan"))
        launch(x, out)
        torch.testing.assert_close(out, x.sum(1), rtol=1e-5, atol=1e-5)
        counters = [c for key, c in _module(launch)._COUNTERS.items() if key[0] == "done"]
        assert counters and all(int(c.abs().sum()) == 0 for c in counters)


def test_stores_then_barrier_then_atomic():
    src = generate(group_sum_ir(), "triton")
    partial = src.index("tl.store(part_ptr")
    barrier, atomic = src.index("tl.debug_barrier()"), src.index("tl.atomic_add(done_ptr")
    assert partial < barrier < atomic and 'sem="acq_rel"' in src[atomic:src.index("\n", atomic)]
    read = src.index("tl.load(part_ptr")
    assert atomic < read and 'cache_modifier=".cg"' in src[read:src.index("\n", read)]  # past L1


def test_counters_have_no_custom_call_form():
    from tileflow.runtime.triton_xla import torch_call, torch_empty, xla_launcher

    launch = xla_launcher(group_sum_ir(), interpret=True)
    with pytest.raises(NotImplementedError, match="persistent counters"):
        launch(torch_call, torch_empty, torch.zeros(3, 4, 16), torch.zeros(3, 16))


def test_pallas_refuses_counters_accumulation_and_ready_counters():
    for ir in (group_sum_ir(), row_sum_ir(), producer_ir(), consumer_ir()):
        with pytest.raises(NotImplementedError, match="Triton only"):
            generate(ir, "pallas")


def test_atomic_misuse_fails_at_build_time():
    k = TileBuilder("bad", {"BLOCK": 4})
    ws = k.workspace("ws", ("BLOCK",), "i32")
    c = k.counter("c", ("BLOCK",))
    w = k.input("w", ("N",))
    with k.stage("main", grid=("1",)):
        with pytest.raises(TileDefinitionError, match="only counters"):
            k.atomic_add(ws, (0,), 1)
        with pytest.raises(TileDefinitionError, match="one element"):
            k.atomic_add(c, (k.range(0, "BLOCK"),), 1)
        with pytest.raises(TileDefinitionError, match="atomic_add before the wait"):
            with k.before_wait():
                k.load(w, (k.range(0, "BLOCK"),))
                k.atomic_add(c, (0,), 1)


def test_accumulate_sums_every_program_and_leaves_the_buffer_at_zero():
    ir = row_sum_ir()
    launch = _launch(ir)
    acc, done = torch.zeros(32), torch.zeros(1, dtype=torch.int32)
    for seed in (4, 5):
        x = torch.randn(6, 32, generator=torch.Generator().manual_seed(seed))
        out = torch.full((32,), float("nan"))
        launch(x, acc, done, out)
        torch.testing.assert_close(out, x.sum(0), rtol=1e-5, atol=1e-5)
        assert float(acc.abs().sum()) == 0.0 and int(done.abs().sum()) == 0


def test_accumulate_adds_then_counts_then_reads_past_l1():
    src = generate(row_sum_ir(), "triton")
    add = src.index("tl.atomic_add(acc_ptr")
    barrier, count = src.index("tl.debug_barrier()"), src.index("tl.atomic_add(done_ptr")
    assert add < barrier < count and 'sem="relaxed"' in src[add:barrier]
    read = src.index("tl.load(acc_ptr")
    assert count < read and 'cache_modifier=".cg"' in src[read:src.index("\n", read)]


def test_accumulate_misuse_fails_at_build_time():
    k = TileBuilder("bad", {"BLOCK": 4})
    ints = k.inout("ints", ("N",), "i32")
    out = k.output("out", ("N",), "f32")
    with k.stage("main", grid=("1",)):
        tile = k.full(("BLOCK",), 1.0)
        for view in (ints, out):
            with pytest.raises(TileDefinitionError, match="only fp32 in-place views"):
                k.accumulate(view, (k.range(0, "BLOCK"),), tile)


def test_a_consumer_waits_per_chunk_on_the_producers_counts():
    produce, consume = _launch(producer_ir()), _launch(consumer_ir())
    n, chunk = 37, 16  # 3 chunks, the last one partial; 5 producer programs of 8 rows
    x, r = torch.randn(n, generator=torch.Generator().manual_seed(6)), torch.tensor([0.5])
    for _ in range(2):  # the caller clears the counters between pairs
        ready = torch.zeros(3, dtype=torch.int32)
        h, y = torch.full((n,), float("nan")), torch.full((1,), float("nan"))
        produce(x, h, ready, chunk)
        assert ready.tolist() == [16, 16, 5]  # each chunk's rows, as the consumer's waits expect
        consume(h, r, ready, y, chunk)
        torch.testing.assert_close(y, (2 * x).sum().reshape(1) + r, rtol=1e-5, atol=1e-5)


def test_signal_releases_after_the_stores_and_the_wait_replaces_gdc_wait():
    src = generate(producer_ir(), "triton")
    store, barrier = src.index("tl.store(h_ptr"), src.index("tl.debug_barrier()")
    signal = src.index("tl.atomic_add(ready_ptr")
    assert store < barrier < signal and 'sem="release"' in src[signal:src.index("\n", signal)]
    src = generate(consumer_ir(), "triton")
    body = src[src.index("def ready_consumer_main("):src.index("def launch(")]
    assert "gdc_wait()" not in body and "ready counters instead of gdc_wait" in body
    poll = body.index('sem="acquire"')
    read = body.index("tl.load(h_ptr")
    assert poll < read and 'cache_modifier=".cg"' in body[read:body.index("\n", read)]


def test_ready_counter_misuse_fails_at_build_time():
    k = TileBuilder("bad", {"BLOCK": 4})
    ints_in = k.input("ints_in", ("N",), "i32")
    ints = k.inout("ints", ("N",), "i32")
    floats = k.input("floats", ("N",))
    with k.stage("main", grid=("1",)):
        with pytest.raises(TileDefinitionError, match="only int32 in-place views"):
            k.signal(ints_in, (0,), 1)
        with pytest.raises(TileDefinitionError, match="one element"):
            k.signal(ints, (k.range(0, "BLOCK"),), 1)
        with pytest.raises(TileDefinitionError, match="only a 1-D int32 input"):
            k.wait_ready(ints, 0, 4, 4, 4, 1, guards=floats)
        with pytest.raises(TileDefinitionError, match="no signal before the wait"):
            with k.before_wait():
                k.signal(ints, (0,), 1)
