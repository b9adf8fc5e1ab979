"""``k.load_pick``: one load through a base pointer chosen at run time (Triton), each view
read under its condition elsewhere. Its numbers are checked by qkv_rope_cache's suite test
on every target; here: the Triton text really issues one load per tile, views whose
strides differ are refused at launch (the tile offsets use the first view's strides),
and a definition that misuses it fails when it is built."""

import pytest
import torch

from tileflow.emit.cache import generate
from tileflow.suite import KERNELS
from tileflow.tile.builder import TileBuilder, TileDefinitionError


def _tiny_qkv():
    kernel = KERNELS["qkv_rope_cache"]
    case = next(c for c in kernel.test_cases if c.label == "tiny")
    return kernel, case, kernel.build(kernel.params_for(case))


def test_triton_issues_one_weight_load_per_tile():
    _, _, ir = _tiny_qkv()
    src = generate(ir, "triton")
    loop = src[src.index("for start"):src.index("tl.sum(")]
    weight_loads = [ln for ln in loop.splitlines() if "tl.load(base" in ln]
    assert len(weight_loads) == 2  # the lo and hi halves of the rotated pairs
    assert "wk_ptr" not in "".join(weight_loads)  # picked before the loop's loads, not per view
    assert src.count("tl.where(") >= 4  # q/k then k/v selects for two tiles' bases


def test_views_with_other_strides_are_refused():
    from tileflow.runtime.torch_triton import triton_launcher
    from tileflow.verify import make_inputs, poisoned_outputs

    kernel, case, ir = _tiny_qkv()
    gen = torch.Generator().manual_seed(0)
    t = {**make_inputs(kernel, ir, case, torch.float32, gen), **poisoned_outputs(ir, case, torch.float32)}
    wide = torch.randn(t["wk"].shape[0], t["wk"].shape[1] * 2, generator=gen)
    t["wk"] = wide[:, : t["wk"].shape[1]]  # same values' shape, row stride doubled
    launch = triton_launcher(ir, "cpu")
    names = [v.name for v in ir.arguments]
    with pytest.raises(ValueError, match="strides"):
        launch(*[t[n] for n in names], *[case.scalars[s.name] for s in ir.scalars])


def test_misuse_fails_at_build_time():
    k = TileBuilder("bad", {"BLOCK": 4})
    a = k.input("a", ("N", "K"))
    b = k.input("b", ("N", "J"))
    with k.stage("main", grid=("1",)):
        pid = k.program_id(0)
        rows, cols = k.range(0, "BLOCK"), k.range(0, "BLOCK")
        with pytest.raises(TileDefinitionError, match="shaped like"):
            k.load_pick([(pid < 1, a, 0), (pid >= 1, b, 0)], (rows, cols), limits={0: 2})
        with pytest.raises(TileDefinitionError, match="limit"):
            k.load_pick([(pid < 1, a, 0), (pid >= 1, a, 4)], (rows, cols), limits={})
        with pytest.raises(TileDefinitionError, match="condition"):
            k.load_pick([(None, a, 0)], (rows, cols), limits={0: 2})
