"""The tile definition shared by the two elementwise suite kernels: one program per
``BLOCK`` elements of a row, ``out = f(a, b)``."""


def define_elementwise(fn, k, p):
    a = k.input("a", ("M", "N"))
    b = k.input("b", ("M", "N"))
    out = k.output("out", ("M", "N"))
    with k.stage("main", grid=("M", "cdiv(N, BLOCK)")):
        row = k.program_id(0)
        cols = k.range(k.program_id(1) * k.param("BLOCK"), "BLOCK", aligned=True)
        k.store(out, (row, cols), fn(k, k.load(a, (row, cols)), k.load(b, (row, cols))))


def elementwise_params(s):
    return {"BLOCK": 1024 if s["N"] >= 1024 else max(16, 1 << (s["N"] - 1).bit_length()), "num_warps": 4}


def elementwise_candidates(s):
    return [{"BLOCK": b, "num_warps": w} for b in (256, 512, 1024, 2048) for w in (2, 4, 8)]
