"""residual_add: ``out = a + b`` in fp32, rounded once to the storage dtype."""

from tileflow.suite.elementwise import define_elementwise, elementwise_candidates, elementwise_params
from tileflow.suite.registry import Case, SuiteKernel, register


def reference(xp, a, b):
    return {"out": a + b}


KERNEL = register(SuiteKernel(
    name="residual_add",
    summary="residual add of two hidden states",
    define=lambda k, p: define_elementwise(lambda k, a, b: a + b, k, p),
    reference=reference,
    default_params=elementwise_params,
    test_cases=[Case("tiny", dict(M=1, N=64)), Case("odd", dict(M=2, N=1537))],
    decode_cases=lambda c: [Case("hidden", dict(M=1, N=c["D"]))],
    candidates=elementwise_candidates,
    min_bytes=lambda s, b: 3 * s["M"] * s["N"] * b,
    module=__name__,
))
