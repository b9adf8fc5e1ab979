"""silu_mul: ``out = silu(a) * b``: the MLP activation when gate and up were
computed apart (prefill through a library GEMM)."""

from tileflow.suite.elementwise import define_elementwise, elementwise_candidates, elementwise_params
from tileflow.suite.registry import Case, SuiteKernel, register


def reference(xp, a, b):
    return {"out": a / (1 + xp.exp(-a)) * b}


KERNEL = register(SuiteKernel(
    name="silu_mul",
    summary="SiLU(gate) * up, elementwise",
    define=lambda k, p: define_elementwise(lambda k, a, b: a * k.sigmoid(a) * b, k, p),
    reference=reference,
    default_params=elementwise_params,
    test_cases=[Case("tiny", dict(M=1, N=64)), Case("odd", dict(M=3, N=1000)),
                Case("blocks", dict(M=2, N=2500))],
    decode_cases=lambda c: [Case("inter", dict(M=1, N=c["INTER"]))],
    candidates=elementwise_candidates,
    min_bytes=lambda s, b: 3 * s["M"] * s["N"] * b,
    module=__name__,
))
