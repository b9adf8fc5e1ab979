"""matvec: ``out = x @ w.T (+ b)``: the query projection, and (bias-free) any
plain decode matvec such as the lm_head. ``HAS_BIAS`` is 1 for Qwen2, 0 for Llama."""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import MatvecForm, define_matvec, matvec_bytes, matvec_candidates, matvec_params
from tileflow.suite.registry import Case, SuiteKernel, register

FORM = MatvecForm(
    weights=("w",),
    outputs=("out",),
    extras=lambda p: (("b", ("N",)),) if p["HAS_BIAS"] else (),
    epilogue=lambda k, sums, ex: [sums[0] + ex["b"] if "b" in ex else sums[0]],
)


def reference(xp, x, w, b=None):
    y = x @ xp.matrix_transpose(w)
    return {"out": y + b if b is not None else y}


def default_params(s):
    return matvec_params(s["N"], s["K"], m=s.get("M", 1), HAS_BIAS=s.get("HAS_BIAS", 1))


KERNEL = register(SuiteKernel(
    name="matvec",
    summary="query projection x @ Wq.T + bq (also the lm_head, bias-free)",
    define=lambda k, p: define_matvec(FORM, k, p),
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("tiny", dict(M=1, N=32, K=64)),
        Case("odd", dict(M=1, N=37, K=50)),
        Case("rows", dict(M=3, N=70, K=130)),
        Case("splitk", dict(M=1, N=40, K=1100), params=dict(SPLIT_K=3, BLOCK_K=256)),
        Case("nobias", dict(M=2, N=33, K=77, HAS_BIAS=0)),
        # several rows a program (BLOCK_M): one weight tile for all of them, rows masked to M
        Case("rows5", dict(M=5, N=37, K=50)),
        Case("rows16", dict(M=16, N=21, K=70)),
    ],
    decode_cases=lambda c: [
        Case("q", dict(M=1, N=c["NH"] * c["DH"], K=c["D"], HAS_BIAS=c.get("BIAS", 1))),
        Case("lm_head", dict(M=1, N=c["VOCAB"], K=c["D"], HAS_BIAS=0)),
    ],
    candidates=lambda s: matvec_candidates(s["N"], s["K"], m=s.get("M", 1), HAS_BIAS=s.get("HAS_BIAS", 1)),
    input_makers={"w": linear_weight},
    min_bytes=lambda s, b: matvec_bytes(1, s.get("HAS_BIAS", 1), 0, 1)(s, b),
    module=__name__,
))
