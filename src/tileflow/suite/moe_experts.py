"""moe_experts: DeepSeekMoE's routed experts for the decode tokens,
``out[m] = sum_j topk_weight[m, j] * down_e(silu(gate_e(x[m])) * up_e(x[m]))`` with
``e = topk_idx[m, j]`` (plus ``residual`` where ``HAS_RESIDUAL``), reading the experts'
weights where transformers keeps them: ``gate_up`` is the stacked ``gate_up_proj``
parameter [E, 2 * I, D] viewed as [E, 2, I, D] (gate rows, then up rows; a view, no
copy) and ``down`` is ``down_proj`` [E, D, I].

Only the chosen experts' weights are read: each program loads its expert id from
``topk_idx`` and addresses that expert's rows, so a decode step streams K of the E
experts (the point at batch 1, where the weights are the whole cost).

Two launches: ``gate_up`` runs one program per ``BLOCK_N`` intermediate rows of each
(token, expert) pair (M * K pairs) and writes ``silu(g) * u`` to an fp32 workspace
[M * K, I]; ``down`` runs one program per ``BLOCK_D`` output rows of each token and
sums its K experts in one fp32 accumulator, the routing weight folded into the
intermediate, so the sum is deterministic (no atomics). An expert id outside
``[0, E)`` reads expert 0 and yields NaN, never memory past the weights.
"""

from tileflow.suite.inputs import linear_weight
from tileflow.suite.matvec_family import products_body, stream_k
from tileflow.suite.moe_router import DEEPSEEK_V2_LITE, DEEPSEEK_V3
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


def _expert(k, topk_idx, row, j):
    """The expert id of (token ``row``, choice ``j``), clamped into [0, E), and whether
    it was inside."""
    e = k.load(topk_idx, (row, j))
    inside = k.binary("and", k.binary("ge", e, 0), k.binary("lt", e, k.dim("E")))
    return k.where(inside, e, 0), inside


def define(k, p):
    x = k.input("x", ("M", "D"))
    topk_idx = k.input("topk_idx", ("M", "K"), dtype="i64")
    topk_weight = k.input("topk_weight", ("M", "K"), dtype="f32")
    gate_up = k.input("gate_up", ("E", "GATE_UP", "I", "D"))
    down = k.input("down", ("E", "D", "I"))
    residual = k.input("residual", ("M", "D")) if p["HAS_RESIDUAL"] else None
    out = k.output("out", ("M", "D"))
    inter = k.workspace("inter", ("(M * K)", "I"))

    with k.stage("gate_up", grid=("cdiv(I, BLOCK_N)", "M * K")):
        pair = k.program_id(1)
        row, j = pair // k.dim("K"), pair % k.dim("K")
        e, inside = _expert(k, topk_idx, row, j)
        rows = k.range(k.program_id(0) * k.param("BLOCK_N"), "BLOCK_N", aligned=True)
        acc0 = [k.full(("BLOCK_N", "BLOCK_K"), 0.0) for _ in range(2)]
        # the chosen expert's gate and up rows: the only weights this program reads
        g, u = stream_k(k, 0, k.dim("D"), acc0,
                        lambda cols: [k.load(gate_up, (e, half, rows, cols)) for half in (0, 1)],
                        products_body(k, x, row), 0)
        g, u = k.sum(g, axis=1), k.sum(u, axis=1)
        k.store(inter, (pair, rows), k.where(inside, g * k.sigmoid(g) * u, float("nan")))

    with k.stage("down", grid=("cdiv(D, BLOCK_D)", "M")):
        row = k.program_id(1)
        rows = k.range(k.program_id(0) * k.param("BLOCK_D"), "BLOCK_D", aligned=True)
        kdim = k.dim("K")
        with k.loop(0, kdim, 1, carry=[k.full(("BLOCK_D", "BLOCK_I"), 0.0)]) as lk:
            e, inside = _expert(k, topk_idx, row, lk.index)
            weight = k.where(inside, k.load(topk_weight, (row, lk.index)), float("nan"))
            with k.loop(0, k.dim("I"), "BLOCK_I", carry=[lk.carry[0]]) as li:
                cols = k.range(li.index, "BLOCK_I", aligned=True)
                h = k.load(inter, (row * kdim + lk.index, cols)) * weight
                li.next(li.carry[0] + k.load(down, (e, rows, cols)) * h[None, :])
            lk.next(li.results[0])
        y = k.sum(lk.results[0], axis=1)
        if residual is not None:
            y = y + k.load(residual, (row, rows))
        k.store(out, (row, rows), y)


def reference(xp, x, topk_idx, topk_weight, gate_up, down, residual=None):
    out = xp.zeros(x.shape, dtype=x.dtype) if residual is None else residual
    for j in range(topk_idx.shape[1]):
        e = topk_idx[:, j]
        w = xp.take(gate_up, e, axis=0)  # [M, 2, I, D]: the tokens' j-th experts
        g = xp.matmul(w[:, 0], x[:, :, None])[..., 0]
        u = xp.matmul(w[:, 1], x[:, :, None])[..., 0]
        h = g / (1 + xp.exp(-g)) * u
        y = xp.matmul(xp.take(down, e, axis=0), h[:, :, None])[..., 0]
        out = out + topk_weight[:, j:j + 1] * y
    return {"out": out}


def default_params(s):
    i, d = s["I"], s["D"]
    return {"BLOCK_N": 4 if i >= 512 else 2, "BLOCK_K": min(1024, next_pow2(d)),
            "BLOCK_D": 4 if d >= 512 else 2, "BLOCK_I": min(1024, next_pow2(i)),
            "GATE_UP": 2, "HAS_RESIDUAL": s.get("HAS_RESIDUAL", 0), "num_warps": 4, "num_stages": 2}


def candidates(s):
    base = default_params(s)
    out = []
    for bn, bk in ((2, 1024), (4, 512), (4, 1024), (8, 512), (8, 256), (16, 256)):
        for bd, bi in ((2, 1024), (4, 512), (4, 1024), (8, 256), (8, 512)):
            if bk > next_pow2(s["D"]) or bi > next_pow2(s["I"]):
                continue
            for nw in (4, 8):
                out.append({**base, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd, "BLOCK_I": bi, "num_warps": nw})
    return out


def expert_ids(gen, shape, sizes):
    """K distinct experts per token, as a router picks them."""
    import torch

    m, k = shape
    return torch.stack([torch.randperm(sizes["E"], generator=gen)[:k] for _ in range(m)])


def routing_weights(gen, shape, sizes):
    """Positive weights, as the router's (sigmoid or softmax scores)."""
    import torch

    return torch.rand(shape, generator=gen) + 0.1


def _decode_cases(_config):
    # MoE shapes come from DeepSeek's configs, not from the (dense) model config passed in
    return [Case(label, dict(M=1, E=c["E"], K=c["K"], D=c["D"], I=c["I"]))
            for label, c in (("v2lite", DEEPSEEK_V2_LITE), ("v3", DEEPSEEK_V3))]


KERNEL = register(SuiteKernel(
    name="moe_experts",
    summary="DeepSeekMoE routed experts: the chosen experts' SiLU-gated MLPs, weighted sum per token",
    define=define,
    reference=reference,
    default_params=default_params,
    test_cases=[
        Case("tiny", dict(M=1, E=8, K=2, D=32, I=16)),
        # tiles of several K / I rounds; few programs, so the Triton interpreter stays quick
        Case("rows", dict(M=3, E=16, K=4, D=64, I=48), params=dict(BLOCK_N=32, BLOCK_K=32, BLOCK_D=32, BLOCK_I=16)),
        Case("odd", dict(M=2, E=12, K=3, D=45, I=37), params=dict(BLOCK_N=8, BLOCK_D=16)),
        Case("v3-like", dict(M=2, E=64, K=8, D=96, I=64),
             params=dict(BLOCK_N=64, BLOCK_K=32, BLOCK_D=64, BLOCK_I=32)),
        Case("residual", dict(M=2, E=32, K=6, D=40, I=24, HAS_RESIDUAL=1), params=dict(BLOCK_N=8, BLOCK_D=8)),
    ],
    decode_cases=_decode_cases,
    candidates=candidates,
    input_makers={"topk_idx": expert_ids, "topk_weight": routing_weights,
                  "gate_up": linear_weight, "down": linear_weight},
    # x, the chosen experts' weights (at most M * K of the E), the routing, the output (and residual)
    min_bytes=lambda s, b: (b * (min(s["M"] * s["K"], s["E"]) * 3 * s["I"] * s["D"] + (2 + s.get("HAS_RESIDUAL", 0))
                                 * s["M"] * s["D"]) + 12 * s["M"] * s["K"]),
    module=__name__,
))
