"""o_proj_residual: ``out = attn @ wo.T + residual``: the output projection with the
residual add fused, so the hidden state is read and written once. With ``EARLY_INPUTS``
the residual loads before the dependent-launch wait, where the caller vouches that the
kernel just before does not write it."""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec import (RESIDUAL_FORM, define_matvec, matvec_bytes, matvec_candidates,
                                   matvec_params, residual_params, residual_reference)
from tileflow.suite.registry import Case, SuiteKernel, register

KERNEL = register(SuiteKernel(
    name="o_proj_residual",
    summary="attention output projection + residual add",
    define=lambda k, p: define_matvec(RESIDUAL_FORM, k, p),
    reference=residual_reference,
    default_params=lambda s: {**matvec_params(s["N"], s["K"]), **residual_params(s)},
    test_cases=[
        Case("tiny", dict(M=1, N=64, K=64)),
        Case("odd", dict(M=1, N=45, K=91)),
        Case("splitk", dict(M=2, N=30, K=900), params=dict(SPLIT_K=4, BLOCK_K=256)),
        Case("early", dict(M=1, N=45, K=91, EARLY_INPUTS=1), params=dict(PIPELINE=1)),
        Case("first-round", dict(M=1, N=45, K=300, EARLY_INPUTS=1), params=dict(PIPELINE=2, BLOCK_K=64)),
    ],
    decode_cases=lambda c: [Case("o", dict(M=1, N=c["D"], K=c["NH"] * c["DH"]))],
    candidates=lambda s: [{**c, **residual_params(s)} for c in matvec_candidates(s["N"], s["K"])],
    tune_keys=("M", "N", "K"),  # what is loaded early does not change the tiles
    input_makers={"w": linear_weight},
    min_bytes=matvec_bytes(1, 0, 1, 1),
    module=__name__,
))
