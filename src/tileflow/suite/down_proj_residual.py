"""down_proj_residual: ``out = h @ wd.T + residual``: the MLP down projection (K is
the intermediate size, the longest reduction of the layer) with the residual add.

With ``AHEAD`` > 0 its programs also bring the inputs ``ahead0..`` (the next layer's
attention weights, in the decode step) into L2 while the long down projection streams
(see ``suite.ahead``)."""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec import (RESIDUAL_FORM, define_matvec, matvec_bytes, matvec_candidates,
                                   matvec_params, residual_params, residual_reference)
from tileflow.suite.ready import complete_counts
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
        Case("ahead", dict(M=1, N=48, K=320, AHEAD=2, A0=1000, A1=77), params=dict(BLOCK_N=4, AHEAD_BLOCK=4)),
        Case("early", dict(M=1, N=29, K=1000, EARLY_INPUTS=1), params=dict(PIPELINE=1, BLOCK_K=128)),
        Case("ahead_keep", dict(M=1, N=48, K=320, AHEAD=1, AHEAD_KEEP=1, A0=1000), params=dict(BLOCK_N=4)),
        # waits on the gate-up launch's counters (chunks of 96 rows of h) instead of for all of it
        Case("ready", dict(M=2, N=29, K=333, READY_WAIT=1, NC=4, RC=96), dict(ready_chunk=96),
             params=dict(PIPELINE=1, BLOCK_K=64), targets=("triton", "reference")),
        Case("ready-first-round", dict(M=2, N=29, K=333, READY_WAIT=1, NC=4, RC=96), dict(ready_chunk=96),
             params=dict(PIPELINE=2, BLOCK_K=64), targets=("triton", "reference")),
    ],
    decode_cases=lambda c: [Case("down", dict(M=1, N=c["D"], K=c["INTER"]))],
    candidates=lambda s: [{**c, **residual_params(s)} for c in matvec_candidates(s["N"], s["K"])],
    tune_keys=("M", "N", "K"),  # what is prefetched ahead, or loaded early, does not change the tiles
    input_makers={"w": linear_weight, "ready": complete_counts},
    min_bytes=matvec_bytes(1, 0, 1, 1),
    module=__name__,
))
