"""``k.counter`` / ``k.atomic_add``: the one-launch split attention (the last program of a
group combines). Its numbers are attention_decode_gqa's ``one_launch`` suite cases;
here: the counters are back to zero after a launch, so launch after launch (a CUDA
graph replaying it) stays right, the text orders stores -> barrier -> atomic, Pallas
refuses the form clearly, and misuse fails when the kernel is built."""

import pytest
import torch

from tileflow.emit.cache import generate
from tileflow.suite import KERNELS
from tileflow.tile.builder import TileBuilder, TileDefinitionError
from tileflow.verify import compare, make_inputs, poisoned_outputs, reference_outputs


def _one_launch():
    kernel = KERNELS["attention_decode_gqa"]
    case = next(c for c in kernel.test_cases if c.label == "one_launch")
    return kernel, case, kernel.build(kernel.params_for(case))


def test_repeated_launches_stay_right_and_leave_counters_at_zero():
    from tileflow.runtime.torch_triton import triton_launcher

    kernel, case, ir = _one_launch()
    launch = triton_launcher(ir, "cpu")
    module = __import__(launch.__module__, fromlist=["_COUNTERS"])
    for seed in (1, 2, 3):
        gen = torch.Generator().manual_seed(seed)
        t = {**make_inputs(kernel, ir, case, torch.float32, gen), **poisoned_outputs(ir, case, torch.float32)}
        launch(*[t[v.name] for v in ir.arguments], *[case.scalars[s.name] for s in ir.scalars])
        ref = reference_outputs(kernel, {k: v for k, v in t.items() if k != "out"}, dict(case.scalars))
        err, problem = compare(t["out"], ref["out"])
        assert not problem and err < 1e-5, (seed, err, problem)
        counters = [c for key, c in module._COUNTERS.items() if key[0] == "done"]
        assert counters and all(int(c.abs().sum()) == 0 for c in counters)


def test_stores_then_barrier_then_atomic():
    _, _, ir = _one_launch()
    src = generate(ir, "triton")
    assert src.count("@triton.jit") - src.count("_xla(\n") == 1  # no combine stage (beside its XLA-order twin)
    last_partial = src.rindex("tl.store(part_acc_ptr")
    barrier, atomic = src.index("tl.debug_barrier()"), src.index("tl.atomic_add(")
    assert last_partial < barrier < atomic
    assert 'sem="acq_rel"' in src and src.count('cache_modifier=".cg"') == 3  # the partials, past L1


def test_pallas_refuses_counters():
    _, _, ir = _one_launch()
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


def test_accumulate_adds_then_counts_then_reads_past_l1():
    """``k.accumulate`` (rms_norm_mlp_residual): relaxed adds of every program's partial row,
    then the barrier and the acq_rel count, and the last program's reads of the sums past L1;
    Pallas refuses it; only fp32 in-place views accumulate."""
    kernel = KERNELS["rms_norm_mlp_residual"]
    ir = kernel.build(kernel.params_for(kernel.test_cases[0]))
    src = generate(ir, "triton")
    add = src.index('tl.atomic_add(acc_ptr')
    barrier, count = src.index("tl.debug_barrier()"), src.index("tl.atomic_add(done_ptr")
    assert add < barrier < count and 'sem="relaxed"' in src[add:barrier]
    read = src.index("tl.load(acc_ptr")
    assert count < read and 'cache_modifier=".cg"' in src[read:src.index("\n", read)]
    with pytest.raises(NotImplementedError, match="Triton only"):
        generate(ir, "pallas")
    k = TileBuilder("bad", {"BLOCK": 4})
    ints = k.inout("ints", ("N",), "i32")
    out = k.output("out", ("N",), "f32")
    with k.stage("main", grid=("1",)):
        tile = k.full(("BLOCK",), 1.0)
        for view in (ints, out):
            with pytest.raises(TileDefinitionError, match="only fp32 in-place views"):
                k.accumulate(view, (k.range(0, "BLOCK"),), tile)
