"""down_proj_residual: ``out = h @ wd.T + residual``: the MLP down projection (K is
the intermediate size, the longest reduction of the layer) with the residual add."""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec import MatvecForm, define_matvec, matvec_bytes, matvec_candidates, matvec_params
from tileflow.suite.registry import Case, SuiteKernel, register

FORM = MatvecForm(
    weights=("w",),
    outputs=("out",),
    extras=lambda p: (("r", ("M", "N")),),
    epilogue=lambda k, sums, ex: [sums[0] + ex["r"]],
)


def reference(xp, x, w, r):
    return {"out": x @ xp.matrix_transpose(w) + r}


KERNEL = register(SuiteKernel(
    name="down_proj_residual",
    summary="MLP down projection + residual add",
    define=lambda k, p: define_matvec(FORM, k, p),
    reference=reference,
    default_params=lambda s: matvec_params(s["N"], s["K"]),
    test_cases=[
        Case("tiny", dict(M=1, N=32, K=128)),
        Case("odd", dict(M=1, N=29, K=333)),
        Case("splitk", dict(M=1, N=64, K=2000), params=dict(SPLIT_K=4, BLOCK_K=256)),
    ],
    decode_cases=lambda c: [Case("down", dict(M=1, N=c["D"], K=c["INTER"]))],
    candidates=lambda s: matvec_candidates(s["N"], s["K"]),
    input_makers={"w": linear_weight},
    min_bytes=matvec_bytes(1, 0, 1, 1),
    module=__name__,
))
