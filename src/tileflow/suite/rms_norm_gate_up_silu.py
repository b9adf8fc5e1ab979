"""rms_norm_gate_up_silu (fused): ``silu(n @ wg.T) * (n @ wu.T)`` with ``n`` the RMSNorm
of ``x`` (the post-attention norm): the norm, both MLP projections and the activation
in one launch. Same tiles as ``gate_up_silu`` with the matvec family's norm
prologue (see matvec.py)."""

from dataclasses import replace

from tileflow.suite import gate_up_silu, rms_norm
from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import define_matvec, matvec_bytes
from tileflow.suite.registry import Case, SuiteKernel, register

FORM = replace(gate_up_silu.FORM, norm=True)


def reference(xp, x, ln_w, wg, wu, eps):
    return gate_up_silu.reference(xp, rms_norm.reference(xp, x, ln_w, eps)["out"], wg, wu)


KERNEL = register(SuiteKernel(
    name="rms_norm_gate_up_silu",
    summary="fused: RMSNorm, then MLP gate/up projections with SiLU(gate) * up",
    define=lambda k, p: define_matvec(FORM, k, p),
    reference=reference,
    default_params=gate_up_silu.KERNEL.default_params,
    test_cases=[
        Case("tiny", dict(M=1, N=64, K=32), dict(eps=1e-6)),
        Case("odd", dict(M=1, N=99, K=61), dict(eps=1e-5)),
        Case("loopk", dict(M=2, N=37, K=600), dict(eps=1e-6), params=dict(BLOCK_K=256)),
        Case("splitk", dict(M=2, N=50, K=600), dict(eps=1e-6), params=dict(SPLIT_K=2, BLOCK_K=256)),
        Case("pipeline", dict(M=1, N=37, K=600), dict(eps=1e-6), params=dict(PIPELINE=1, BLOCK_K=128)),
        Case("pipe-splitk", dict(M=2, N=50, K=700), dict(eps=1e-6), params=dict(PIPELINE=1, SPLIT_K=3, BLOCK_K=128)),
        Case("first-round", dict(M=2, N=37, K=600), dict(eps=1e-6), params=dict(PIPELINE=2, BLOCK_K=128)),
        # several rows a program (BLOCK_M): the norm's scale per row, gathered in the K loop
        # or (split-K) from a pass of its own
        Case("rows8", dict(M=8, N=21, K=300), dict(eps=1e-6), params=dict(BLOCK_K=128)),
        Case("rows16-splitk", dict(M=16, N=13, K=300), dict(eps=1e-6), params=dict(SPLIT_K=2, BLOCK_K=64, BLOCK_N=4)),
    ],
    decode_cases=lambda c: [Case("gate_up", dict(M=1, N=c["INTER"], K=c["D"]), dict(eps=1e-6))],
    candidates=gate_up_silu.KERNEL.candidates,
    tune_keys=("M", "N", "K"),
    input_makers={"wg": linear_weight, "wu": linear_weight},
    min_bytes=lambda s, b: matvec_bytes(2, 0, 0, 1)(s, b) + s["K"] * b,
    fused=True,
    module=__name__,
))
