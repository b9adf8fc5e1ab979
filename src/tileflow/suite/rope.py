"""The tile definition shared by ``rope_q`` and ``rope_k``: rotary position embedding
in Hugging Face's rotate-half layout (Qwen2 and Llama alike)::

    out[:half]  = x[:half] * cos - x[half:] * sin
    out[half:]  = x[half:] * cos + x[:half] * sin,   angle_i = pos * inv_freq_i

``inv_freq_i = theta ** (-2i / DH)`` is computed in the kernel from the runtime
scalar ``theta`` (fp32, as transformers computes it), then rescaled per the config's
``rope_scaling``: ``ROPE_KIND`` 0 = none, 1 = linear (``/ factor``), 2 = llama3
(per-frequency smoothing between ``low_freq_factor`` and ``high_freq_factor`` over
``original_max_position_embeddings``), 3 = table: the ``inv_freq`` values are an input
(transformers' own ``rotary_emb.inv_freq`` buffer, as the compiled graph reads it, so any
scaling that only reshapes the frequencies is exact by construction). Positions come from an int tensor, so a
captured CUDA graph replays correctly at every step.

fp32 angles lose about ``pos * 6e-8`` rad, as in transformers' own fp32 RoPE: the
fp32 tests therefore keep positions small; bf16/fp16 tests go far.
"""

import math

from tileflow.suite.registry import next_pow2

ROPE_KINDS = {"default": 0, "linear": 1, "llama3": 2, "table": 3}
ROPE_SCALARS = {0: ("theta",), 1: ("theta", "factor"),
                2: ("theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position"),
                3: ()}
TABLE = 3


def inv_freq_tile(k, kind: int, i_index, dh):
    """fp32 inverse frequencies for the indices ``i_index`` of the first half
    (kinds 0-2; the table kind loads them from its ``inv_freq`` view instead)."""
    if kind == TABLE:
        raise ValueError("ROPE_KIND 3 (table) reads inv_freq from a view, not from scalars")
    theta = k.arg("theta")
    inv = k.exp2(k.cast(i_index, "f32") * (-2.0) / k.cast(dh, "f32") * k.log2(theta))
    if kind == 1:
        inv = inv / k.arg("factor")
    elif kind == 2:
        factor, low, high = k.arg("factor"), k.arg("low_freq_factor"), k.arg("high_freq_factor")
        old = k.arg("original_max_position")
        wavelen = (2.0 * math.pi) / inv
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1.0 - smooth) * inv / factor + smooth * inv
        inv = k.where(wavelen < old / high, inv, k.where(wavelen > old / low, inv / factor, smoothed))
    return inv


def define_rope(k, p, heads: str, cache: bool):
    kind = p["ROPE_KIND"]
    x = k.input("x", ("M", heads, "DH"))
    pos = k.input("pos", ("M",), dtype="i64")
    if cache:
        v = k.input("v", ("M", heads, "DH"))
        k_cache = k.inout("k_cache", ("M", heads, "S", "DH"))
        v_cache = k.inout("v_cache", ("M", heads, "S", "DH"))
    else:
        out = k.output("out", ("M", heads, "DH"))
    for name in ROPE_SCALARS[kind]:
        k.scalar(name)
    with k.stage("main", grid=("M", f"cdiv({heads}, BLOCK_H)")):
        row = k.program_id(0)
        hs = k.range(k.program_id(1) * k.param("BLOCK_H"), "BLOCK_H", aligned=True)
        dh = k.dim("DH")
        half = dh // 2
        lo = k.range(0, "BLOCK_HALF", aligned=True)
        hi = k.range(half, "BLOCK_HALF")
        p_int = k.load(pos, (row,))
        ang = k.cast(p_int, "f32") * inv_freq_tile(k, kind, lo.index, dh)
        c, s = k.cos(ang)[None, :], k.sin(ang)[None, :]
        x1 = k.load(x, (row, hs, lo), limits={2: half})
        x2 = k.load(x, (row, hs, hi))
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        if cache:
            k.store(k_cache, (row, hs, p_int, lo), o1, limits={3: half})
            k.store(k_cache, (row, hs, p_int, hi), o2)
            k.store(v_cache, (row, hs, p_int, lo), k.load(v, (row, hs, lo), limits={2: half}), limits={3: half})
            k.store(v_cache, (row, hs, p_int, hi), k.load(v, (row, hs, hi)))
        else:
            k.store(out, (row, hs, lo), o1, limits={2: half})
            k.store(out, (row, hs, hi), o2)


def rope_reference(xp, x, pos, theta=None, factor=None, low_freq_factor=None, high_freq_factor=None,
                   original_max_position=None, inv_freq=None):
    dh = x.shape[-1]
    half = dh // 2
    i = xp.astype(xp.arange(half), x.dtype)
    if inv_freq is not None:  # table: the frequencies as given
        inv = xp.astype(inv_freq, x.dtype)
    else:
        inv = theta ** (-2.0 * i / dh)
        if low_freq_factor is not None:  # llama3
            wavelen = 2 * math.pi / inv
            smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            smoothed = (1 - smooth) * inv / factor + smooth * inv
            inv = xp.where(wavelen < original_max_position / high_freq_factor, inv,
                           xp.where(wavelen > original_max_position / low_freq_factor, inv / factor, smoothed))
        elif factor is not None:  # linear
            inv = inv / factor
    ang = xp.astype(pos, x.dtype)[:, None] * inv[None, :]  # [M, half]
    c, s = xp.cos(ang)[:, None, :], xp.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concat([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_params(s, heads: str):
    """Default parameters at sizes ``s``; ``heads`` names the head count, as in
    :func:`define_rope` (NH for the query heads, NKV for the key heads)."""
    return {"BLOCK_H": min(16, next_pow2(s[heads])), "BLOCK_HALF": next_pow2(s["DH"] // 2),
            "ROPE_KIND": s.get("ROPE_KIND", 0), "num_warps": 4}


def rope_candidates(s, heads: str):
    base = rope_params(s, heads)
    return [{**base, "BLOCK_H": bh, "num_warps": w} for bh in (1, 2, 4, 8, 16) for w in (1, 2, 4)]


LLAMA3 = dict(theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position=8192.0)
