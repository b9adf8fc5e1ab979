"""matvec_pair: ``k = x @ wk.T + bk`` and ``v = x @ wv.T + bv`` in one launch.

Both projections read the same ``x``; one program computes the same rows of both, so
the two small weights stream together (Hugging Face keeps them as two
``nn.Linear``: they are read where they lie)."""

from tileflow.suite import matvec
from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import MatvecForm, define_matvec, matvec_bytes
from tileflow.suite.registry import Case, SuiteKernel, register

FORM = MatvecForm(
    weights=("wk", "wv"),
    outputs=("k", "v"),
    extras=lambda p: (("bk", ("N",)), ("bv", ("N",))) if p["HAS_BIAS"] else (),
    epilogue=lambda k, sums, ex: [sums[0] + ex["bk"], sums[1] + ex["bv"]] if ex else list(sums),
)


def reference(xp, x, wk, wv, bk=None, bv=None):
    k = x @ xp.matrix_transpose(wk)
    v = x @ xp.matrix_transpose(wv)
    if bk is not None:
        k, v = k + bk, v + bv
    return {"k": k, "v": v}


KERNEL = register(SuiteKernel(
    name="matvec_pair",
    summary="fused K and V projections (+ biases) over one read of x",
    define=lambda k, p: define_matvec(FORM, k, p),
    reference=reference,
    default_params=matvec.KERNEL.default_params,  # tiled as one matvec (the q projection)
    test_cases=[
        Case("tiny", dict(M=1, N=32, K=64)),
        Case("odd", dict(M=1, N=24, K=45)),
        Case("splitk", dict(M=2, N=48, K=700), params=dict(SPLIT_K=2, BLOCK_K=256)),
        Case("nobias", dict(M=1, N=40, K=96, HAS_BIAS=0)),
        Case("rows8", dict(M=8, N=24, K=45)),
    ],
    decode_cases=lambda c: [Case("kv", dict(M=1, N=c["NKV"] * c["DH"], K=c["D"], HAS_BIAS=c.get("BIAS", 1)))],
    candidates=matvec.KERNEL.candidates,
    input_makers={"wk": linear_weight, "wv": linear_weight},
    min_bytes=lambda s, b: matvec_bytes(2, 2 * s.get("HAS_BIAS", 1), 0, 2)(s, b),
    module=__name__,
))
