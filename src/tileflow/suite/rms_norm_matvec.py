"""rms_norm_matvec (fused): ``rmsnorm(x) @ w.T (+ b)``: the final norm and the lm_head
in one launch (bias-free there). Same tiles as ``matvec`` with the matvec
family's norm prologue (see matvec.py)."""

from dataclasses import replace

from tileflow.suite import matvec, rms_norm
from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import define_matvec, matvec_bytes, matvec_candidates, matvec_params
from tileflow.suite.registry import Case, SuiteKernel, register

FORM = replace(matvec.FORM, norm=True)


def reference(xp, x, ln_w, w, eps, b=None):
    return matvec.reference(xp, rms_norm.reference(xp, x, ln_w, eps)["out"], w, b)


KERNEL = register(SuiteKernel(
    name="rms_norm_matvec",
    summary="fused: RMSNorm then x @ W.T (+ b): the final norm and the lm_head",
    define=lambda k, p: define_matvec(FORM, k, p),
    reference=reference,
    default_params=lambda s: matvec_params(s["N"], s["K"], m=s.get("M", 1), HAS_BIAS=s.get("HAS_BIAS", 0)),
    test_cases=[
        Case("tiny", dict(M=1, N=32, K=64, HAS_BIAS=0), dict(eps=1e-6)),
        Case("odd", dict(M=3, N=37, K=50, HAS_BIAS=1), dict(eps=1e-5)),
        Case("loopk", dict(M=1, N=70, K=1100, HAS_BIAS=0), dict(eps=1e-6), params=dict(BLOCK_K=256)),
        Case("pipeline", dict(M=1, N=70, K=1100, HAS_BIAS=1), dict(eps=1e-6), params=dict(BLOCK_K=256, PIPELINE=1)),
        Case("first-round", dict(M=1, N=70, K=1100, HAS_BIAS=1), dict(eps=1e-6), params=dict(BLOCK_K=256, PIPELINE=2)),
        Case("rows5", dict(M=5, N=37, K=300, HAS_BIAS=1), dict(eps=1e-5), params=dict(BLOCK_K=128, PIPELINE=1)),
    ],
    decode_cases=lambda c: [Case("lm_head", dict(M=1, N=c["VOCAB"], K=c["D"], HAS_BIAS=0), dict(eps=1e-6))],
    candidates=lambda s: matvec_candidates(s["N"], s["K"], m=s.get("M", 1), HAS_BIAS=s.get("HAS_BIAS", 0)),
    input_makers={"w": linear_weight},
    min_bytes=lambda s, b: matvec_bytes(1, s.get("HAS_BIAS", 0), 0, 1)(s, b) + s["K"] * b,
    fused=True,
    module=__name__,
))
