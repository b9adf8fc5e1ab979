"""matvec_residual: ``out = x @ w.T + residual``: a projection with the residual add
fused, so the hidden state is read and written once: the attention output projection
and the MLP down projection (K the intermediate size, the layer's longest reduction).
With ``EARLY_INPUTS`` the residual loads before the dependent-launch wait, where the
caller vouches that the kernel just before does not write it."""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import (RESIDUAL_FORM, define_matvec, matvec_bytes, matvec_candidates,
                                          matvec_params, residual_params, residual_reference)
from tileflow.suite.registry import Case, SuiteKernel, register

KERNEL = register(SuiteKernel(
    name="matvec_residual",
    summary="projection + residual add (attention output, MLP down)",
    define=lambda k, p: define_matvec(RESIDUAL_FORM, k, p),
    reference=residual_reference,
    default_params=lambda s: {**matvec_params(s["N"], s["K"], m=s.get("M", 1)), **residual_params(s)},
    test_cases=[
        Case("tiny", dict(M=1, N=64, K=64)),
        Case("odd", dict(M=1, N=45, K=91)),
        Case("long-k", dict(M=1, N=29, K=333)),
        Case("splitk", dict(M=2, N=30, K=900), params=dict(SPLIT_K=4, BLOCK_K=256)),
        Case("pipeline", dict(M=1, N=29, K=1000), params=dict(PIPELINE=1, BLOCK_K=128)),
        Case("early", dict(M=1, N=45, K=91, EARLY_INPUTS=1), params=dict(PIPELINE=1)),
        # PIPELINE=2: the first round peeled off the loop and loaded before the wait
        Case("first-round", dict(M=2, N=29, K=1000), params=dict(PIPELINE=2, BLOCK_K=128)),
        Case("first-round-early", dict(M=1, N=45, K=300, EARLY_INPUTS=1), params=dict(PIPELINE=2, BLOCK_K=64)),
        Case("first-round-only", dict(M=1, N=29, K=100), params=dict(PIPELINE=2, BLOCK_K=128)),
        Case("first-round-splitk", dict(M=1, N=64, K=2000), params=dict(PIPELINE=2, SPLIT_K=4, BLOCK_K=256)),
        # several rows a program (BLOCK_M) with each way of streaming K
        Case("rows8-splitk", dict(M=8, N=30, K=600), params=dict(SPLIT_K=3, BLOCK_K=128, BLOCK_N=8)),
        Case("rows5-pipeline-early", dict(M=5, N=29, K=300, EARLY_INPUTS=1), params=dict(PIPELINE=1, BLOCK_K=64)),
        Case("rows3-first-round", dict(M=3, N=29, K=300), params=dict(PIPELINE=2, BLOCK_K=64)),
    ],
    decode_cases=lambda c: [Case("o", dict(M=1, N=c["D"], K=c["NH"] * c["DH"])),
                            Case("down", dict(M=1, N=c["D"], K=c["INTER"]))],
    candidates=lambda s: [{**c, **residual_params(s)}
                          for c in matvec_candidates(s["N"], s["K"], m=s.get("M", 1))],
    tune_keys=("M", "N", "K"),  # what is loaded early does not change the tiles
    input_makers={"w": linear_weight},
    min_bytes=matvec_bytes(1, 0, 1, 1),
    module=__name__,
))
