"""attention_o_proj_residual (fused): ``out = attention(q, K, V) @ wo.T + residual``:
GQA decode attention, the output projection and the residual add in two launches
instead of three (attention's partial and combine stages, then o_proj_residual).

- Stage ``partial`` is attention_decode_gqa's (one program per KV head and split of
  the filled cache, ``split_pass``), writing each split's running max, sum and output
  per query head into [B, SPLITS, NH(, DH)] partials.
- Stage ``o_proj``: each program owns ``BLOCK_O`` rows of ``wo`` (viewed [N, NH, DH])
  and combines every split of every head itself, as one [SPLITS_BLOCK, HEADS_BLOCK,
  BLOCK_DH] load of the partials from L2, before the product: the combine stage's
  launch boundary (a dependent round trip on an H200, ~2 us a layer in the decode step)
  is traded for each program re-reading SPLITS x NH x DH fp32 values from L2, which is
  why splits are few and ``BLOCK_O`` rows many by default.
- The attention output never goes through memory, so it is not rounded to the storage
  dtype between the two products (the unfused kernels round it once).
- ``EARLY_INPUTS``: the lengths (stage 1) and the residual (stage 2) load before the
  dependent-launch wait, where the caller vouches that neither is the output of the
  kernel just before. ``o_proj``'s weight tile always loads before its wait (a weight
  is no kernel's output), so it streams while the partial stage runs. ``AHEAD``: as
  for attention (``suite.ahead``).

Measured on an H200 (NOTES.md, 2026-12-04): slower than the three launches it replaces
(best 11.0 us alone against 3.3 + 3.1; in the 1.5B step 676 against 882 tok/s). Per stage,
o_proj took 3.7 us with one split, 16.2 with four (BLOCK_O 8), 36.7 with four at BLOCK_O 2:
its programs' re-reads of the same partials grow far faster than their bytes. Kept as a
tested, tuned opt-in (``TILEFLOW_ATTENTION_O=1``), not the default.
"""

from tileflow.suite import attention_decode_gqa
from tileflow.suite.ahead import ahead_inputs, ahead_params, prefetch_ahead
from tileflow.suite.registry import Case, SuiteKernel, next_pow2, register


def define(k, p):
    views = attention_decode_gqa.attention_inputs(k, p)
    wo = k.input("wo", ("N", "NH", "DH"))  # o_proj's [N, NH * DH] weight, per head
    r = k.input("r", ("B", "N"))
    out = k.output("out", ("B", "N"))
    ahead = ahead_inputs(k, p)
    scale = k.scalar("scale")
    ws_m = k.workspace("part_m", ("B", "SPLITS", "NH"))
    ws_l = k.workspace("part_l", ("B", "SPLITS", "NH"))
    ws_acc = k.workspace("part_acc", ("B", "SPLITS", "NH", "DH"))

    with k.stage("partial", grid=("NKV", "SPLITS", "B")):
        prefetch_ahead(k, ahead, p)
        b, kvh, sp, heads, heads_end, d, m, l, acc = attention_decode_gqa.split_pass(k, p, views, scale)
        k.store(ws_m, (b, sp, heads), m, limits={2: heads_end})
        k.store(ws_l, (b, sp, heads), l, limits={2: heads_end})
        k.store(ws_acc, (b, sp, heads, d), acc, limits={2: heads_end})

    with k.stage("o_proj", grid=("cdiv(N, BLOCK_O)", "B")):
        b = k.program_id(1)
        rows = k.range(k.program_id(0) * k.param("BLOCK_O"), "BLOCK_O", aligned=True)
        h = k.range(0, "HEADS_BLOCK", aligned=True)
        d = k.range(0, "BLOCK_DH", aligned=True)
        with k.before_wait():  # a weight: no kernel of the step writes it
            wt = k.load(wo, (rows, h, d))
        if p.get("EARLY_INPUTS", 0):  # the caller vouches: not the previous kernel's output
            with k.before_wait():
                res = k.load(r, (b, rows))
        sp = k.range(0, "SPLITS_BLOCK", aligned=True)
        m = k.load(ws_m, (b, sp, h), other=float("-inf"))  # [SPLITS_BLOCK, HEADS_BLOCK]
        # padded heads (past NH) hold -inf in every split: give them max 0 and sum 1 so
        # they come out 0, not NaN; a real head whose keys are all hidden stays NaN, as in SDPA
        real = h.index < k.dim("NH")
        mx = k.where(real, k.max(m, axis=0), 0.0)
        wgt = k.exp(m - mx[None, :])  # empty splits hold m = -inf: weight 0
        tot = k.sum(wgt * k.load(ws_l, (b, sp, h)), axis=0)
        tot = k.where(real, tot, 1.0)
        acc = k.sum(wgt[:, :, None] * k.load(ws_acc, (b, sp, h, d)), axis=0)  # [HEADS_BLOCK, BLOCK_DH]
        attn = acc / tot[:, None]
        y = k.sum(k.sum(wt * attn[None, :, :], axis=2), axis=1)
        if not p.get("EARLY_INPUTS", 0):
            res = k.load(r, (b, rows))
        k.store(out, (b, rows), y + res)


def reference(xp, q, k_cache, v_cache, lengths, wo, r, scale, key_mask=None):
    att = attention_decode_gqa.reference(xp, q, k_cache, v_cache, lengths, scale, key_mask)["out"]
    bsz, n = r.shape
    return {"out": xp.reshape(att, (bsz, -1)) @ xp.matrix_transpose(xp.reshape(wo, (n, -1))) + r}


def fused_params(s, splits: int = 0, block_n: int = 64, block_o: int = 8, num_warps: int = 8) -> dict:
    """Parameters for sizes ``s`` (attention's, plus ``N`` rows of ``wo``). By default at
    most 4 splits (each o_proj program re-reads every split's partials) and 8 rows a
    program (fewer programs re-reading them)."""
    if not splits:
        splits = 1 if s["S"] <= 64 else min(4, -(-s["S"] // block_n))
    att = attention_decode_gqa.attention_params(s, block_n, splits, num_warps)
    keep = ("HAS_MASK", "EARLY_INPUTS", "BLOCK_N", "GROUP_BLOCK", "BLOCK_DH", "num_stages")
    return {**{n: att[n] for n in keep}, **ahead_params(s), "SPLITS": splits, "SPLITS_BLOCK": next_pow2(splits),
            "HEADS_BLOCK": next_pow2(s["NH"]), "BLOCK_O": min(block_o, next_pow2(s["N"])), "num_warps": num_warps}


def candidates(s):
    out = []
    for splits in (1, 2, 4, 8):
        if splits > 1 and splits * 16 > 2 * s["S"]:
            continue
        for block_n in (32, 64):
            for block_o in (2, 4, 8, 16):
                for nw in (4, 8):
                    out.append(fused_params(s, splits, block_n, block_o, nw))
    return out


def _o_weight(gen, shape, sizes):
    import math

    import torch

    return torch.randn(shape, generator=gen) / math.sqrt(shape[1] * shape[2])


KERNEL = register(SuiteKernel(
    name="attention_o_proj_residual",
    summary="fused: GQA decode attention (split-KV), then the output projection + residual add",
    define=define,
    reference=reference,
    default_params=fused_params,
    test_cases=[
        Case("tiny", dict(B=1, NH=2, NKV=1, DH=16, S=16, N=24), dict(scale=0.25)),
        Case("gqa6", dict(B=1, NH=12, NKV=2, DH=24, S=70, L=65, N=40), dict(scale=0.2)),
        Case("split", dict(B=1, NH=6, NKV=2, DH=32, S=300, L=259, N=50), dict(scale=0.17),
             params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16, BLOCK_O=4)),
        Case("split_odd", dict(B=2, NH=10, NKV=2, DH=16, S=200, L=150, N=33), dict(scale=0.25),
             params=dict(SPLITS=3, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("split_empty", dict(B=1, NH=4, NKV=2, DH=16, S=100, L=20, N=16), dict(scale=0.25),
             params=dict(SPLITS=8, SPLITS_BLOCK=8, BLOCK_N=16)),
        Case("mask", dict(B=2, NH=4, NKV=2, DH=16, S=70, L=61, N=20, HAS_MASK=1), dict(scale=0.25),
             params=dict(BLOCK_N=16)),
        Case("early", dict(B=1, NH=6, NKV=2, DH=32, S=300, L=259, N=50, EARLY_INPUTS=1), dict(scale=0.17),
             params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16)),
        Case("ahead", dict(B=1, NH=6, NKV=2, DH=32, S=300, L=259, N=50, AHEAD=2, A0=1500, A1=70),
             dict(scale=0.17), params=dict(SPLITS=4, SPLITS_BLOCK=4, BLOCK_N=16, AHEAD_BLOCK=8)),
    ],
    # as attention: parameters are looked up by the capacity bucket, never the fill
    decode_cases=lambda c: [
        Case(f"ctx{fill}", dict(B=1, NH=c["NH"], NKV=c["NKV"], DH=c["DH"], S=cap, L=fill, N=c["D"]),
             dict(scale=c["DH"] ** -0.5)) for cap, fill in ((512, 384), (8192, 4352))],
    tune_keys=("B", "NH", "NKV", "DH", "S", "N", "HAS_MASK"),
    candidates=candidates,
    input_makers={"lengths": attention_decode_gqa.KERNEL.input_makers["lengths"],
                  "key_mask": attention_decode_gqa.KERNEL.input_makers["key_mask"], "wo": _o_weight},
    min_bytes=lambda s, b: (attention_decode_gqa.KERNEL.min_bytes(s, b)
                            + (s["N"] * s["NH"] * s["DH"] + 2 * s["B"] * s["N"]) * b),
    fused=True,
    module=__name__,
))
