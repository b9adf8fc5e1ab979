"""down_proj_residual: ``out = h @ wd.T + residual``: the MLP down projection (K is
the intermediate size, the longest reduction of the layer) with the residual add."""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec import (RESIDUAL_FORM, define_matvec, matvec_bytes, matvec_candidates,
                                   matvec_params, residual_params, residual_reference)
from tileflow.suite.registry import Case, SuiteKernel, register

KERNEL = register(SuiteKernel(
    name="down_proj_residual",
    summary="MLP down projection + residual add",
    define=lambda k, p: define_matvec(RESIDUAL_FORM, k, p),
    reference=residual_reference,
    default_params=lambda s: {**matvec_params(s["N"], s["K"]), **residual_params(s)},
    test_cases=[
        Case("tiny", dict(M=1, N=32, K=128)),
        Case("odd", dict(M=1, N=29, K=333)),
        Case("splitk", dict(M=1, N=64, K=2000), params=dict(SPLIT_K=4, BLOCK_K=256)),
        Case("pipeline", dict(M=1, N=29, K=1000), params=dict(PIPELINE=1, BLOCK_K=128)),
        # PIPELINE=2: the first round peeled off the loop and loaded before the wait
        Case("first-round", dict(M=2, N=29, K=1000), params=dict(PIPELINE=2, BLOCK_K=128)),
        Case("first-round-only", dict(M=1, N=29, K=100), params=dict(PIPELINE=2, BLOCK_K=128)),
        Case("first-round-splitk", dict(M=1, N=64, K=2000), params=dict(PIPELINE=2, SPLIT_K=4, BLOCK_K=256)),
        Case("early", dict(M=1, N=29, K=1000, EARLY_INPUTS=1), params=dict(PIPELINE=1, BLOCK_K=128)),
    ],
    decode_cases=lambda c: [Case("down", dict(M=1, N=c["D"], K=c["INTER"]))],
    candidates=lambda s: [{**c, **residual_params(s)} for c in matvec_candidates(s["N"], s["K"])],
    tune_keys=("M", "N", "K"),  # what is loaded early does not change the tiles
    input_makers={"w": linear_weight},
    min_bytes=matvec_bytes(1, 0, 1, 1),
    module=__name__,
))
