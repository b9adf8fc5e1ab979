"""argmax_greedy: the greedy next token, ``argmax(logits[m])``, parallel over the
vocabulary: each program reduces ``BLOCK_V`` logits to (max, index); a second stage
reduces those partials in order, keeping the earlier on equal values, so ties go to
the lowest index as with ``torch.argmax``. (NaN logits are not ranked.)"""

from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


def define(k, p):
    logits = k.input("logits", ("M", "V"))
    out = k.output("out", ("M",), dtype="i64")
    nb_expr = "cdiv(V, BLOCK_V)"
    part_v = k.workspace("part_v", ("M", nb_expr), dtype="f32")
    part_i = k.workspace("part_i", ("M", nb_expr), dtype="i32")
    with k.stage("blocks", grid=("cdiv(V, BLOCK_V)", "M")):
        blk, row = k.program_id(0), k.program_id(1)
        cols = k.range(blk * k.param("BLOCK_V"), "BLOCK_V", aligned=True)
        x = k.load(logits, (row, cols), other=float("-inf"))
        k.store(part_v, (row, blk), k.max(x, axis=0))
        k.store(part_i, (row, blk), blk * k.param("BLOCK_V") + k.argmax(x, axis=0))
    with k.stage("final", grid=("M",)):
        row = k.program_id(0)
        nb = k.cdiv(k.dim("V"), k.param("BLOCK_V"))
        best0 = (k.full((), float("-inf")), k.full((), 0, dtype="i32"))
        with k.loop(0, nb, "BLOCK_P", carry=best0) as lp:
            bv, bi = lp.carry
            j = k.range(lp.index, "BLOCK_P", aligned=True)
            vals = k.load(part_v, (row, j), limits={1: nb}, other=float("-inf"))
            idxs = k.load(part_i, (row, j), limits={1: nb})
            jm = k.argmax(vals, axis=0)
            cand_v = k.max(vals, axis=0)
            cand_i = k.sum(k.where(k.eq(j.index, lp.index + jm), idxs, 0), axis=0)
            better = cand_v > bv  # strict: an equal later block never wins
            lp.next(k.where(better, cand_v, bv), k.where(better, cand_i, bi))
        k.store(out, (row,), lp.results[1])


def reference(xp, logits):
    return {"out": xp.argmax(logits, axis=-1)}


def _logits_with_ties(gen, shape, sizes):
    """Normal logits whose maximum appears twice (a tie), far apart when possible."""
    import torch

    x = torch.randn(shape, generator=gen)
    top = x.max(dim=-1, keepdim=True).values + 1.0
    v = shape[-1]
    x[..., v // 3:v // 3 + 1] = top
    x[..., v - 1:] = top
    return x


KERNEL = register(SuiteKernel(
    name="argmax_greedy",
    summary="greedy token: argmax over the vocabulary, ties to the lowest index",
    define=define,
    reference=reference,
    default_params=lambda s: {"BLOCK_V": min(4096, next_pow2(s["V"])), "BLOCK_P": 64, "num_warps": 8},
    test_cases=[
        Case("tiny", dict(M=1, V=64)),
        Case("odd", dict(M=3, V=1001), params=dict(BLOCK_V=128, BLOCK_P=4)),
        Case("blocks", dict(M=1, V=5000), params=dict(BLOCK_V=256, BLOCK_P=8)),
    ],
    decode_cases=lambda c: [Case("vocab", dict(M=1, V=c["VOCAB"]))],
    candidates=lambda s: [{"BLOCK_V": bv, "BLOCK_P": 64, "num_warps": w}
                          for bv in (1024, 2048, 4096, 8192) for w in (4, 8, 16)],
    input_makers={"logits": _logits_with_ties},
    min_bytes=lambda s, b: s["M"] * s["V"] * b + 8 * s["M"],
    module=__name__,
))
