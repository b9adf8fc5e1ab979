"""The vendor path each suite kernel is timed against, on the same tensors:
cuBLAS through ``F.linear`` / ``addmm``, SDPA, and plain torch ops where no library
kernel exists (what eager transformers runs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _cos_sin(pos, dh, theta, dtype):
    inv = 1.0 / (theta ** (torch.arange(0, dh, 2, device=pos.device, dtype=torch.float32) / dh))
    ang = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _fused_quantized(name: str, t: dict, scalars: dict):
    """The fused int4 / fp8 forms the library way: each quantized projection as matvec_int4's
    or matvec_fp8's vendor path (dequantize + cuBLAS; the finegrained-fp8 math), the norm,
    SiLU and residual in torch eager."""
    from tileflow.suite.quantize import dequantize_int4, fp8_linear_torch

    int4 = name.endswith("int4")

    def linear(x, suffix=""):
        if int4:
            w = dequantize_int4(t[f"qw{suffix}"], t[f"scales{suffix}"], t[f"zeros{suffix}"]).to(x.dtype)
            return F.linear(x, w)
        return fp8_linear_torch(x, t[f"w{suffix}"], t[f"ws{suffix}"], None)

    if name.startswith("matvec_residual"):
        return (lambda: linear(t["x"]) + t["r"]), ("dequantize + F.linear + add" if int4 else
                                                    "finegrained-fp8 math + add (torch eager)")

    def gate_up():
        n = F.rms_norm(t["x"], (t["x"].shape[-1],), t["ln_w"], scalars["eps"])
        return F.silu(linear(n, "_g")) * linear(n, "_u")
    return gate_up, ("F.rms_norm + 2x (dequantize + F.linear) + silu*mul" if int4 else
                     "F.rms_norm + 2x finegrained-fp8 math + silu*mul (torch eager)")


def vendor_call(name: str, t: dict, scalars: dict):
    """A zero-argument callable doing ``name``'s work the library way, and its label."""
    if name == "rms_norm":
        return (lambda: F.rms_norm(t["x"], (t["x"].shape[-1],), t["w"], scalars["eps"])), "F.rms_norm"
    if name == "embedding_lookup":
        return (lambda: F.embedding(t["ids"], t["table"])), "F.embedding"
    if name == "matvec":
        return (lambda: F.linear(t["x"], t["w"], t.get("b"))), "F.linear (cuBLAS)"
    if name == "matvec_pair":
        return (lambda: (F.linear(t["x"], t["wk"], t.get("bk")), F.linear(t["x"], t["wv"], t.get("bv")))), \
            "2x F.linear (cuBLAS)"
    if name == "matvec_residual":
        wt = t["w"].t()
        return (lambda: torch.addmm(t["r"], t["x"], wt)), "addmm (cuBLAS, residual in epilogue)"
    if name == "gate_up_silu":
        w = torch.cat([t["wg"], t["wu"]], dim=0)  # one GEMV over both: cuBLAS's best case
        n = t["wg"].shape[0]

        def gate_up():
            y = F.linear(t["x"], w)
            return F.silu(y[:, :n]) * y[:, n:]
        return gate_up, "F.linear on [wg;wu] + silu*mul"
    if name in ("rope_q", "rope_k"):
        x, pos = t["x"], t["pos"]
        cos, sin = _cos_sin(pos, x.shape[-1], scalars["theta"], x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        if name == "rope_q":
            return (lambda: x * cos + _rotate_half(x) * sin), "torch eager (transformers' formula)"

        def rope_k():
            kr = x * cos + _rotate_half(x) * sin
            t["k_cache"].index_copy_(2, pos, kr.unsqueeze(2))  # batch 1, as StaticCache does
            t["v_cache"].index_copy_(2, pos, t["v"].unsqueeze(2))
        return rope_k, "torch eager + index_copy_ (StaticCache.update)"
    if name == "gqa_attention":
        q = t["q"].unsqueeze(2)
        n = int(t["lengths"].max())
        k, v = t["k_cache"][:, :, :n], t["v_cache"][:, :, :n]
        return (lambda: F.scaled_dot_product_attention(q, k, v, scale=scalars["scale"], enable_gqa=True)), \
            "SDPA (enable_gqa)"
    if name == "silu_mul":
        return (lambda: F.silu(t["a"]) * t["b"]), "torch eager"
    if name == "residual_add":
        return (lambda: t["a"] + t["b"]), "torch eager"
    if name == "argmax_greedy":
        return (lambda: torch.argmax(t["logits"], dim=-1)), "torch.argmax"
    if name in ("rms_norm_matvec", "rms_norm_gate_up_silu"):
        x, ln = t["x"], t["ln_w"]
        d = dict(t)  # the inner call reads d["x"] when it runs: the freshly normalised row
        inner, label = vendor_call("matvec" if name == "rms_norm_matvec" else "gate_up_silu", d, scalars)

        def norm_then():
            d["x"] = F.rms_norm(x, (x.shape[-1],), ln, scalars["eps"])
            return inner()
        return norm_then, "F.rms_norm + " + label
    if name == "qkv_rope_cache":
        x, ln, pos = t["x"], t["ln_w"], t["pos"]
        w = torch.cat([t["wq"], t["wk"], t["wv"]], dim=0)  # one GEMV: cuBLAS's best case
        b = torch.cat([t["bq"], t["bk"], t["bv"]]) if "bq" in t else None
        m, nkv, _, dh = t["k_cache"].shape
        nq, nkd = t["wq"].shape[0], t["wk"].shape[0]
        cos, sin = _cos_sin(pos, dh, scalars["theta"], x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]

        def qkv():
            y = F.linear(F.rms_norm(x, (x.shape[-1],), ln, scalars["eps"]), w, b)
            q, k, v = y[:, :nq].view(m, -1, dh), y[:, nq:nq + nkd].view(m, nkv, dh), y[:, nq + nkd:].view(m, nkv, dh)
            q = q * cos + _rotate_half(q) * sin
            t["k_cache"].index_copy_(2, pos, (k * cos + _rotate_half(k) * sin).unsqueeze(2))
            t["v_cache"].index_copy_(2, pos, v.unsqueeze(2))
            return q
        return qkv, "F.rms_norm + F.linear on [wq;wk;wv] + eager RoPE + index_copy_"
    if name == "moe_router":
        return _moe_router(t, scalars), "F.linear + softmax / sigmoid + torch.topk (the model's gate)"
    if name == "moe_experts":
        return _moe_experts(t), "torch eager over the chosen experts (index + F.linear)"
    if name == "mla_attention":
        return _mla_attention(t, scalars), "torch eager absorbed MLA (einsum + softmax)"
    if name == "mla_latent_cache":
        return _mla_latent_cache(t, scalars), "F.linear + F.rms_norm + eager RoPE + index_copy_"
    if name == "matvec_int4":
        from tileflow.suite.quantize import dequantize_int4

        def int4():  # what gpt-fast's CPU fallback does: the weight dequantized, then cuBLAS
            return F.linear(t["x"], dequantize_int4(t["qw"], t["scales"], t["zeros"]).to(t["x"].dtype), t.get("b"))
        return int4, "dequantize + F.linear (cuBLAS)"
    if name in ("matvec_residual_int4", "matvec_residual_fp8", "rms_norm_gate_up_silu_int4",
                "rms_norm_gate_up_silu_fp8"):
        return _fused_quantized(name, t, scalars)
    if name == "matvec_fp8":
        from tileflow.suite.quantize import fp8_linear_torch

        # transformers' own path loads the Hub's finegrained-fp8 kernel; its math in torch eager
        return (lambda: fp8_linear_torch(t["x"], t["w"], t["ws"], t.get("b"))), \
            "torch eager finegrained-fp8 math (act quant + per-group fp8 matmul)"
    raise KeyError(name)


def _moe_router(t, scalars):
    x, w, bias = t["x"], t["w"], t.get("bias")
    k, n_group, topk_group = int(scalars["top_k"]), int(scalars["n_group"]), int(scalars["topk_group"])

    def route():
        logits = F.linear(x.float(), w)
        s = logits.softmax(-1) if bias is None else logits.sigmoid()
        choice = s if bias is None else s + bias
        m, e = choice.shape
        groups = choice.view(m, n_group, -1)
        gscore = groups.max(-1).values if bias is None else groups.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(topk_group, dim=-1).indices, 1.0)
        keep = keep[:, :, None].expand(-1, -1, e // n_group).reshape(m, e).bool()
        idx = choice.masked_fill(~keep, float("-inf") if bias is not None else 0.0).topk(k, dim=-1).indices
        wts = s.gather(1, idx)
        if scalars["norm_topk"]:
            wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
        return idx, wts * scalars["scale"]
    return route


def _moe_experts(t):
    x, idx, wts, gate_up, down = t["x"], t["topk_idx"], t["topk_weight"], t["gate_up"], t["down"]
    residual = t.get("residual")

    def experts():
        out = torch.zeros_like(x, dtype=torch.float32) if residual is None else residual.float()
        for m in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[m, j])
                g, u = F.linear(x[m], gate_up[e, 0]), F.linear(x[m], gate_up[e, 1])
                out[m] += wts[m, j] * F.linear(F.silu(g) * u, down[e]).float()
        return out.to(x.dtype)
    return experts


def _mla_attention(t, scalars):
    qn, qp, kv, pe, lengths = t["q_nope"], t["q_pe"], t["kv_cache"], t["pe_cache"], t["lengths"]
    w_uk, w_uv, mask = t["w_uk"], t["w_uv"], t.get("key_mask")

    def attend():
        q_lat = torch.einsum("bhn,hnr->bhr", qn, w_uk)
        scores = (torch.einsum("bhr,bsr->bhs", q_lat, kv) + torch.einsum("bhd,bsd->bhs", qp, pe)) * scalars["scale"]
        valid = torch.arange(kv.shape[1], device=kv.device)[None, :] < lengths[:, None]
        if mask is not None:
            valid = valid & (mask > 0)
        pr = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
        return torch.einsum("bhr,hvr->bhv", torch.einsum("bhs,bsr->bhr", pr, kv), w_uv)
    return attend


def _mla_latent_cache(t, scalars):
    x, w, ln, pos, inv = t["x"], t["w_kva"], t["ln_w"], t["pos"], t["inv_freq"]
    kv_cache, pe_cache = t["kv_cache"], t["pe_cache"]
    r, dr, layout = kv_cache.shape[-1], pe_cache.shape[-1], int(scalars["rope_layout"])

    def write():
        y = F.linear(x, w)
        kv = F.rms_norm(y[:, :r], (r,), ln, scalars["eps"])
        ang = pos.float()[:, None] * inv.float()[None, :]
        c, s = ang.cos() * scalars["rope_scale"], ang.sin() * scalars["rope_scale"]
        pe = y[:, r:].float()
        x1, x2 = (pe[:, :dr // 2], pe[:, dr // 2:]) if layout == 0 else (pe[:, 0::2], pe[:, 1::2])
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        rot = torch.stack([o1, o2], -1).flatten(1) if layout == 2 else torch.cat([o1, o2], -1)
        rows = torch.arange(x.shape[0], device=x.device)
        kv_cache[rows, pos] = kv.to(kv_cache.dtype)
        pe_cache[rows, pos] = rot.to(pe_cache.dtype)
        return kv_cache
    return write
