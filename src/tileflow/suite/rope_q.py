"""rope_q: rotary embedding of the query heads at each row's position (see rope.py)."""

from tileflow.suite.inputs import positions
from tileflow.suite.registry import Case, SuiteKernel, register
from tileflow.suite.rope import LLAMA3, define_rope, rope_candidates, rope_params, rope_reference


def reference(xp, x, pos, **scalars):
    return {"out": rope_reference(xp, x, pos, **scalars)}


KERNEL = register(SuiteKernel(
    name="rope_q",
    summary="RoPE (rotate-half) on the query heads; theta and rope scaling from the config",
    define=lambda k, p: define_rope(k, p, "NH", cache=False),
    reference=reference,
    default_params=lambda s: rope_params(s, "NH"),
    test_cases=[
        Case("tiny", dict(M=1, NH=2, DH=16, P=64), dict(theta=10000.0)),
        Case("odd", dict(M=3, NH=5, DH=24, P=50), dict(theta=1e6)),
        Case("llama3", dict(M=2, NH=3, DH=64, P=40, ROPE_KIND=2), dict(LLAMA3)),
        Case("linear", dict(M=1, NH=4, DH=32, P=30, ROPE_KIND=1), dict(theta=10000.0, factor=4.0)),
        Case("far", dict(M=2, NH=3, DH=128, P=32768), dict(theta=10000.0), dtypes=("bf16", "fp16")),
    ],
    decode_cases=lambda c: [Case("q", dict(M=1, NH=c["NH"], DH=c["DH"], P=4096), dict(theta=10000.0))],
    candidates=lambda s: rope_candidates(s, "NH"),
    input_makers={"pos": positions("P")},
    min_bytes=lambda s, b: 2 * s["M"] * s["NH"] * s["DH"] * b + 8 * s["M"],
    module=__name__,
))
