"""gate_up_silu: ``out = silu(x @ wg.T) * (x @ wu.T)``: the gate and up
projections of the MLP and its activation in one pass; the two [INTER] intermediates
never reach memory."""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import MatvecForm, define_matvec, matvec_bytes, matvec_candidates, matvec_params
from tileflow.suite.registry import Case, SuiteKernel, register

FORM = MatvecForm(
    weights=("wg", "wu"),
    outputs=("out",),
    extras=lambda p: (),
    epilogue=lambda k, sums, ex: [sums[0] * k.sigmoid(sums[0]) * sums[1]],
)


def reference(xp, x, wg, wu):
    g = x @ xp.matrix_transpose(wg)
    u = x @ xp.matrix_transpose(wu)
    return {"out": g / (1 + xp.exp(-g)) * u}


KERNEL = register(SuiteKernel(
    name="gate_up_silu",
    summary="MLP gate and up projections with SiLU(gate) * up fused",
    define=lambda k, p: define_matvec(FORM, k, p),
    reference=reference,
    default_params=lambda s: matvec_params(s["N"], s["K"], m=s.get("M", 1)),
    test_cases=[
        Case("tiny", dict(M=1, N=64, K=32)),
        Case("odd", dict(M=1, N=99, K=61)),
        Case("splitk", dict(M=2, N=50, K=600), params=dict(SPLIT_K=2, BLOCK_K=256)),
        Case("rows5", dict(M=5, N=45, K=61)),
    ],
    decode_cases=lambda c: [Case("gate_up", dict(M=1, N=c["INTER"], K=c["D"]))],
    candidates=lambda s: matvec_candidates(s["N"], s["K"], m=s.get("M", 1)),
    input_makers={"wg": linear_weight, "wu": linear_weight},
    min_bytes=matvec_bytes(2, 0, 0, 1),
    module=__name__,
))
