"""rms_norm: ``out = x * rsqrt(mean(x^2) + eps) * w`` per row (Qwen2/Llama RMSNorm).

One program per row; the row lives in one block (D up to a few thousand), summed in
fp32. ``eps`` is a runtime scalar taken from the config, never a constant.
"""

from tileflow.suite.registry import QWEN_1_5B, Case, SuiteKernel, next_pow2, register


def define(k, p):
    x = k.input("x", ("M", "D"))
    w = k.input("w", ("D",))
    out = k.output("out", ("M", "D"))
    eps = k.scalar("eps")
    with k.stage("main", grid=("M",)):
        row = k.program_id(0)
        cols = k.range(0, "BLOCK_D", aligned=True)
        xv = k.load(x, (row, cols))
        wv = k.load(w, (cols,))
        ms = k.sum(xv * xv, axis=0) / k.cast(k.dim("D"), "f32")
        k.store(out, (row, cols), xv * k.rsqrt(ms + eps) * wv)


def reference(xp, x, w, eps):
    ms = xp.sum(x * x, axis=-1, keepdims=True) / x.shape[-1]
    return {"out": x / xp.sqrt(ms + eps) * w}


def default_params(s):
    return {"BLOCK_D": next_pow2(s["D"]), "num_warps": 4 if s["D"] <= 2048 else 8}


KERNEL = register(SuiteKernel(
    name="rms_norm",
    summary="RMSNorm of each row with gamma; eps from the config",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("tiny", dict(M=1, D=64), dict(eps=1e-6)),
        Case("odd", dict(M=3, D=37), dict(eps=1e-5)),
        Case("rows", dict(M=5, D=200), dict(eps=1e-6)),
    ],
    decode_cases=lambda c: [Case("hidden", dict(M=1, D=c["D"]), dict(eps=1e-6))],
    candidates=lambda s: [{"BLOCK_D": next_pow2(s["D"]), "num_warps": nw} for nw in (2, 4, 8, 16)],
    min_bytes=lambda s, b: (2 * s["M"] * s["D"] + s["D"]) * b,
    module=__name__,
))
