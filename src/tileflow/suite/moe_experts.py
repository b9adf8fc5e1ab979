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

With ``SHARED`` the shared experts (one SiLU MLP of ``NS * I`` rows: ``s_gate`` / ``s_up``
[NS * I, D], ``s_down`` [D, NS * I], as transformers keeps them) run in the same two
launches as ``NS`` more experts of weight 1 a token: their ``I``-row slices are extra pairs
of the gate_up stage and extra rounds of the down stage's sum, each program reading one
kind's weights by a ``when``-guarded load (the step saves the shared MLP's two launches).
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
    if p.get("SHARED", 0):
        define_shared(k, p, x, topk_idx, topk_weight, gate_up, down, residual, out)
        return
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


def define_shared(k, p, x, topk_idx, topk_weight, gate_up, down, residual, out) -> None:
    """The SHARED form: pairs ``p < M * K`` are (token, choice) as above; the next ``M * NS``
    are (token, shared slice); the down stage's rounds ``j >= K`` are the shared slices."""
    s_gate = k.input("s_gate", ("NSI", "D"))
    s_up = k.input("s_up", ("NSI", "D"))
    s_down = k.input("s_down", ("D", "NSI"))
    inter = k.workspace("inter", ("(M * K + NSI // I * M)", "I"))

    def sizes():  # K, shared slices NS, I, the routed pairs M * K (dims exist inside a stage)
        kdim, inter_w = k.dim("K"), k.dim("I")
        return kdim, k.dim("NSI") // inter_w, inter_w, k.dim("M") * kdim

    with k.stage("gate_up", grid=("cdiv(I, BLOCK_N)", "M * K + NSI // I * M")):
        kdim, ns, inter_w, routed = sizes()
        pair = k.program_id(1)
        shared = k.binary("ge", pair, routed)
        mine = k.binary("lt", pair, routed)
        rp = k.minimum(pair, routed - 1)
        sp = k.maximum(pair - routed, 0)
        e, inside = _expert(k, topk_idx, rp // kdim, rp % kdim)
        row = k.where(shared, sp // ns, rp // kdim)
        block = k.program_id(0) * k.param("BLOCK_N")
        rows = k.range(block, "BLOCK_N", aligned=True)
        srows = k.range((sp % ns) * inter_w + block, "BLOCK_N")
        s_end = (sp % ns) * inter_w + inter_w
        acc0 = [k.full(("BLOCK_N", "BLOCK_K"), 0.0) for _ in range(2)]

        def tiles(cols):  # one kind's rows read, the other's load predicated off
            return [k.load(gate_up, (e, half, rows, cols), when=mine)
                    + k.load(w, (srows, cols), limits={0: s_end}, when=shared)
                    for half, w in ((0, s_gate), (1, s_up))]

        g, u = stream_k(k, 0, k.dim("D"), acc0, tiles, products_body(k, x, row), 0)
        g, u = k.sum(g, axis=1), k.sum(u, axis=1)
        ok = k.binary("or", inside, shared)
        k.store(inter, (pair, rows), k.where(ok, g * k.sigmoid(g) * u, float("nan")))

    with k.stage("down", grid=("cdiv(D, BLOCK_D)", "M")):
        kdim, ns, inter_w, routed = sizes()
        row = k.program_id(1)
        rows = k.range(k.program_id(0) * k.param("BLOCK_D"), "BLOCK_D", aligned=True)
        with k.loop(0, kdim + ns, 1, carry=[k.full(("BLOCK_D", "BLOCK_I"), 0.0)]) as lk:
            shared = k.binary("ge", lk.index, kdim)
            mine = k.binary("lt", lk.index, kdim)
            j = k.minimum(lk.index, kdim - 1)
            js = k.maximum(lk.index - kdim, 0)
            e, inside = _expert(k, topk_idx, row, j)
            weight = k.where(shared, 1.0, k.where(inside, k.load(topk_weight, (row, j)), float("nan")))
            at = k.where(shared, routed + row * ns + js, row * kdim + j)
            with k.loop(0, inter_w, "BLOCK_I", carry=[lk.carry[0]]) as li:
                cols = k.range(li.index, "BLOCK_I", aligned=True)
                h = k.load(inter, (at, cols), limits={1: inter_w}) * weight
                scols = k.range(js * inter_w + li.index, "BLOCK_I")
                wd = (k.load(down, (e, rows, cols), when=mine)
                      + k.load(s_down, (rows, scols), limits={1: js * inter_w + inter_w}, when=shared))
                li.next(li.carry[0] + wd * h[None, :])
            lk.next(li.results[0])
        y = k.sum(lk.results[0], axis=1)
        if residual is not None:
            y = y + k.load(residual, (row, rows))
        k.store(out, (row, rows), y)


def reference(xp, x, topk_idx, topk_weight, gate_up, down, residual=None, s_gate=None, s_up=None, s_down=None):
    out = xp.zeros(x.shape, dtype=x.dtype) if residual is None else residual
    if s_gate is not None:  # SHARED: the shared experts' MLP, weight 1
        g, u = x @ xp.matrix_transpose(s_gate), x @ xp.matrix_transpose(s_up)
        out = out + (g / (1 + xp.exp(-g)) * u) @ xp.matrix_transpose(s_down)
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
            "GATE_UP": 2, "HAS_RESIDUAL": s.get("HAS_RESIDUAL", 0), "num_warps": 4, "num_stages": 2,
            **({"SHARED": 1} if s.get("SHARED", 0) else {})}


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
        # the shared experts as NSI / I more experts of weight 1 (two slices here; odd I, tiles past it)
        Case("shared", dict(M=2, E=16, K=3, D=40, I=20, NSI=40, SHARED=1, HAS_RESIDUAL=1),
             params=dict(BLOCK_N=8, BLOCK_K=16, BLOCK_D=8, BLOCK_I=16)),
        Case("shared-one", dict(M=1, E=8, K=2, D=32, I=16, NSI=16, SHARED=1)),
    ],
    decode_cases=_decode_cases,
    candidates=candidates,
    input_makers={"topk_idx": expert_ids, "topk_weight": routing_weights,
                  "gate_up": linear_weight, "down": linear_weight, "s_gate": linear_weight, "s_up": linear_weight,
                  "s_down": linear_weight},
    # x, the chosen experts' weights (at most M * K of the E), the routing, the output (and residual)
    min_bytes=lambda s, b: (b * (min(s["M"] * s["K"], s["E"]) * 3 * s["I"] * s["D"] + (2 + s.get("HAS_RESIDUAL", 0))
                                 * s["M"] * s["D"]) + 12 * s["M"] * s["K"]),
    module=__name__,
))
