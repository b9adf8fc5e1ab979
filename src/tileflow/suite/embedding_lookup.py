"""embedding_lookup: ``out[m] = table[ids[m]]``: one row of the embedding per token.

An id outside ``[0, V)`` gives a row of NaN (the reference raises IndexError, as the
model's embedding does); no memory outside the table is read."""

from tileflow.suite.inputs import token_ids
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


def define(k, p):
    ids = k.input("ids", ("M",), dtype="i64")
    table = k.input("table", ("V", "D"))
    out = k.output("out", ("M", "D"))
    with k.stage("main", grid=("M", "cdiv(D, BLOCK_D)")):
        row = k.program_id(0)
        cols = k.range(k.program_id(1) * k.param("BLOCK_D"), "BLOCK_D", aligned=True)
        tok = k.load(ids, (row,))
        # an id outside [0, V) reads row 0 and yields NaN, never memory past the table:
        # the integrations check ids where they can (CPU) and NaN shows where they cannot
        inside = k.binary("and", k.binary("ge", tok, 0), k.binary("lt", tok, k.dim("V")))
        vals = k.load(table, (k.where(inside, tok, 0), cols))
        k.store(out, (row, cols), k.where(inside, vals, float("nan")))


def reference(xp, ids, table):
    return {"out": xp.take(table, ids, axis=0)}


KERNEL = register(SuiteKernel(
    name="embedding_lookup",
    summary="embedding row gather for the decode tokens",
    define=define,
    reference=reference,
    default_params=lambda s: {"BLOCK_D": min(1024, next_pow2(s["D"])), "num_warps": 4},
    test_cases=[
        Case("tiny", dict(M=1, V=50, D=64)),
        Case("odd", dict(M=3, V=97, D=45)),
        Case("blocks", dict(M=2, V=10, D=300), params=dict(BLOCK_D=128)),
    ],
    decode_cases=lambda c: [Case("token", dict(M=1, V=c["VOCAB"], D=c["D"]))],
    candidates=lambda s: [{"BLOCK_D": b, "num_warps": w} for b in (256, 512, 1024, 2048) for w in (1, 2, 4)
                          if b <= next_pow2(s["D"])],
    input_makers={"ids": token_ids("V")},
    min_bytes=lambda s, b: 2 * s["M"] * s["D"] * b + 8 * s["M"],
    module=__name__,
))
