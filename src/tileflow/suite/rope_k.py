"""rope_k: rotary embedding of the key heads, written straight into the static KV
cache at each row's position, with the value heads copied beside them (the cache
update of transformers' StaticCache, fused). See rope.py for the rotation."""

from tileflow.suite.inputs import positions
from tileflow.suite.registry import Case, SuiteKernel, register
from tileflow.suite.rope import LLAMA3, define_rope, rope_candidates, rope_params, rope_reference


def reference(xp, x, pos, v, k_cache, v_cache, **scalars):
    rot = rope_reference(xp, x, pos, **scalars)  # [M, H, DH]
    s = k_cache.shape[2]
    at = (xp.arange(s)[None, :] == pos[:, None])[:, None, :, None]  # [M, 1, S, 1]
    return {"k_cache": xp.where(at, rot[:, :, None, :], k_cache),
            "v_cache": xp.where(at, v[:, :, None, :], v_cache)}


KERNEL = register(SuiteKernel(
    name="rope_k",
    summary="RoPE on the key heads + static KV-cache write of K and V at the position",
    define=lambda k, p: define_rope(k, p, "NKV", cache=True),
    reference=reference,
    default_params=lambda s: rope_params(s, "NKV"),
    test_cases=[
        Case("tiny", dict(M=1, NKV=1, DH=16, S=8, P=8), dict(theta=10000.0)),
        Case("odd", dict(M=2, NKV=3, DH=24, S=37, P=37), dict(theta=1e6)),
        Case("llama3", dict(M=1, NKV=2, DH=64, S=20, P=20, ROPE_KIND=2), dict(LLAMA3)),
        Case("far", dict(M=1, NKV=2, DH=128, S=5000, P=5000), dict(theta=10000.0), dtypes=("bf16", "fp16")),
    ],
    decode_cases=lambda c: [Case("k", dict(M=1, NKV=c["NKV"], DH=c["DH"], S=4096, P=4096),
                                 dict(theta=10000.0))],
    candidates=lambda s: rope_candidates(s, "NKV"),
    input_makers={"pos": positions("P")},
    min_bytes=lambda s, b: 4 * s["M"] * s["NKV"] * s["DH"] * b + 8 * s["M"],
    module=__name__,
))
