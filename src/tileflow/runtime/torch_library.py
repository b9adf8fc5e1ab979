"""Suite kernels as torch custom operators (``torch.ops.tileflow.*``), for graphs:
the dynamo backend's rewrites insert them, inductor schedules them as opaque calls,
CUDA graphs capture them. Eager code calls ``tileflow.runtime.ops`` directly (a
custom op's dispatch costs ~10 us a call).

Each op runs through ``ops`` (its kernel called by name); its fake (meta) function reads
the output shapes off the kernel's calling convention (``tileflow.runtime.binding``)."""

from __future__ import annotations

from typing import Optional

import torch

from tileflow.runtime import binding, ops


def _fake(kernel: str, values: dict, flags: Optional[dict] = None, given: Optional[dict] = None):
    """Empty outputs of suite kernel ``kernel`` for the (fake) tensors ``values``, shaped
    as its convention says; one tensor, or a tuple for several."""
    conv = binding.convention(kernel, flags)
    sizes = conv.sizes(values, given)
    like = conv.storage(values)
    outs = tuple(like.new_empty(conv.shape(t.name, sizes), dtype=like.dtype if t.dtype == "T" else _DTYPES[t.dtype])
                 for t in conv.tensors if t.role == "output")
    return outs[0] if len(outs) == 1 else outs


_DTYPES = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}


@torch.library.custom_op("tileflow::matvec", mutates_args=())
def matvec(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` by the suite's matvec (matvec)."""
    return ops.matvec(x.contiguous(), w, b)


@matvec.register_fake
def _(x, w, b=None):
    return _fake("matvec", {"x": x, "w": w, "b": b}, {"HAS_BIAS": int(b is not None)})


@torch.library.custom_op("tileflow::matvec_residual", mutates_args=())
def matvec_residual(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ w.T + r`` by the suite's matvec_residual kernel."""
    return ops.matvec_residual(x.contiguous(), w, r.contiguous())


@matvec_residual.register_fake
def _(x, w, r):
    return _fake("matvec_residual", {"x": x, "w": w, "r": r})


@torch.library.custom_op("tileflow::gate_up_silu", mutates_args=())
def gate_up_silu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """``silu(x @ wg.T) * (x @ wu.T)`` by the suite's gate_up_silu kernel."""
    return ops.gate_up_silu(x.contiguous(), wg, wu)


@gate_up_silu.register_fake
def _(x, wg, wu):
    return _fake("gate_up_silu", {"x": x, "wg": wg, "wu": wu})


@torch.library.custom_op("tileflow::rms_norm_matvec", mutates_args=())
def rms_norm_matvec(x: torch.Tensor, ln_w: torch.Tensor, eps: float, w: torch.Tensor) -> torch.Tensor:
    """``rms_norm(x) @ w.T`` by the suite's rms_norm_matvec (final norm + lm_head)."""
    return ops.rms_norm_matvec(x.contiguous(), ln_w, eps, w)


@rms_norm_matvec.register_fake
def _(x, ln_w, eps, w):
    return _fake("rms_norm_matvec", {"x": x, "ln_w": ln_w, "w": w, "eps": eps}, {"HAS_BIAS": 0})


@torch.library.custom_op("tileflow::rms_norm_gate_up_silu", mutates_args=())
def rms_norm_gate_up_silu(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wg: torch.Tensor,
                          wu: torch.Tensor) -> torch.Tensor:
    """``silu(n @ wg.T) * (n @ wu.T)``, ``n = rms_norm(x)``, by the fused suite entry."""
    return ops.rms_norm_gate_up_silu(x.contiguous(), ln_w, eps, wg, wu)


@rms_norm_gate_up_silu.register_fake
def _(x, ln_w, eps, wg, wu):
    return _fake("rms_norm_gate_up_silu", {"x": x, "ln_w": ln_w, "wg": wg, "wu": wu, "eps": eps})


@torch.library.custom_op("tileflow::qkv_rope_cache", mutates_args=("k_cache", "v_cache"))
def qkv_rope_cache(x: torch.Tensor, ln_w: torch.Tensor, eps: float, wq: torch.Tensor, wk: torch.Tensor,
                   wv: torch.Tensor, bq: Optional[torch.Tensor], bk: Optional[torch.Tensor],
                   bv: Optional[torch.Tensor], pos: torch.Tensor, cache_pos: torch.Tensor, inv_freq: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Norm, q/k/v (+bias), RoPE from ``inv_freq`` at ``pos``; K/V written into the caches
    at ``cache_pos``; returns q [M, NH, DH] (fused suite entry qkv_rope_cache)."""
    return ops.qkv_rope_cache(x.contiguous(), ln_w, eps, wq, wk, wv, bq, bk, bv, pos, k_cache, v_cache,
                              cache_pos=cache_pos, inv_freq=inv_freq.contiguous())


@qkv_rope_cache.register_fake
def _(x, ln_w, eps, wq, wk, wv, bq, bk, bv, pos, cache_pos, inv_freq, k_cache, v_cache):
    if x.shape[0] is not k_cache.shape[0] and x.shape[0] != k_cache.shape[0]:
        # R rows a sequence (ops sets ROWS from the shapes; R may be symbolic): q [M, NH, DH]
        dh = k_cache.shape[-1]
        return x.new_empty((x.shape[0], wq.shape[0] // dh, dh))
    values = {"x": x, "ln_w": ln_w, "eps": eps, "wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
              "pos": pos, "cache_pos": cache_pos, "inv_freq": inv_freq, "k_cache": k_cache, "v_cache": v_cache}
    return _fake("qkv_rope_cache", values, {"HAS_BIAS": int(bq is not None), "ROPE_KIND": 3, "CACHE_POS": 1},
                 {"NH": wq.shape[0] // k_cache.shape[-1]})


@torch.library.custom_op("tileflow::gqa_attention", mutates_args=())
def gqa_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GQA decode attention of q [B, NH, DH] over the first ``lengths[b]`` cache rows
    (and, with ``key_mask`` [B, S] int32, only the rows it leaves nonzero); q [B, R, NH, DH]:
    R new tokens of each sequence, row i over the first ``lengths[b] - R + 1 + i``."""
    mask = None if key_mask is None else key_mask.contiguous()
    if q.dim() == 4 and q.shape[1] == 1:  # a graph traced for R tokens run with one: the one-row kernel
        return ops.gqa_attention(q.reshape(q.shape[0], q.shape[2], q.shape[3]).contiguous(), k_cache, v_cache,
                                 lengths, scale, mask).view(q.shape)
    return ops.gqa_attention(q.contiguous(), k_cache, v_cache, lengths, scale, mask)


@gqa_attention.register_fake
def _(q, k_cache, v_cache, lengths, scale, key_mask=None):
    if q.dim() == 4:  # R rows a sequence, R possibly symbolic: out is q's shape
        return q.new_empty(q.shape)
    return _fake("gqa_attention", {"q": q, "k_cache": k_cache, "v_cache": v_cache, "lengths": lengths,
                                          "scale": scale, "key_mask": key_mask},
                 {"HAS_MASK": 1} if key_mask is not None else None)


@torch.library.custom_op("tileflow::cache_rows_advance", mutates_args=("counters",))
def cache_rows_advance(counters: list[torch.Tensor], n: int, capacity: int = -1) -> torch.Tensor:
    """The static cache's per-layer token counters (0-d int64) before the step, as one
    [layers] tensor, and each counter advanced by ``n``: two launches (a stack and one
    ``_foreach_add_``) where the traced step has a small kernel per layer (its
    ``arange(1) + counter`` and ``counter.add_(1)``), each breaking the chain of
    dependent launches between the layer's kernels.

    With ``capacity`` (the cache's rows) a step that would not fit raises before anything
    is written: on CPU as CacheFullError, on a GPU as a device-side assert (no host read
    per token), as the model's own index_copy_ does on each."""
    rows = torch.stack([c.reshape(()) for c in counters])
    if capacity >= 0:
        if rows.device.type == "cpu":
            filled = int(rows.max())
            if filled + n > capacity:
                from tileflow.errors import CacheFullError, cache_full_message

                raise CacheFullError(cache_full_message(filled, capacity))
        else:
            torch._assert_async(rows.max() + n <= capacity, "tileflow: the static cache is full")
    torch._foreach_add_(counters, n)
    return rows


@cache_rows_advance.register_fake
def _(counters, n, capacity=-1):
    return counters[0].new_empty((len(counters),))


@torch.library.custom_op("tileflow::row_mask_keys", mutates_args=())
def row_mask_keys(mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The key mask [B, S] int32 of a bool mask [1 or B, 1, R, S] built outside a compiled
    step for R new tokens: its last row. Raises unless every row i is that key row within
    the first ``lengths[b] - R + 1 + i`` keys, which ``gqa_attention`` reads for row i (on
    a GPU as a device-side assert: no host read per step), so a mask of another form never
    gives a silently different attention."""
    b, r, s = lengths.shape[0], mask.shape[2], mask.shape[3]
    key_row = mask[:, 0, -1].expand(b, s)
    limit = lengths[:, None] - r + 1 + torch.arange(r, device=mask.device)[None, :]
    admitted = key_row[:, None, :] & (torch.arange(s, device=mask.device)[None, None, :] < limit[:, :, None])
    same = (admitted == mask[:, 0]).all()
    message = "tileflow: the attention mask of the new tokens is not causal over one key row"
    if mask.device.type == "cpu":
        if not bool(same):
            raise RuntimeError(message + ": compile this step without tileflow")
    else:
        torch._assert_async(same, message)
    return key_row.to(torch.int32).contiguous()


@row_mask_keys.register_fake
def _(mask, lengths):
    return mask.new_empty((lengths.shape[0], mask.shape[3]), dtype=torch.int32)


# DeepSeek-V2 / V3: MLA over the latent cache, the router, the routed experts
@torch.library.custom_op("tileflow::mla_attention", mutates_args=())
def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  lengths: torch.Tensor, w_kvb: torch.Tensor, dn: int, scale: float,
                  key_mask: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
                  inv_freq: Optional[torch.Tensor] = None, rope_scale: float = 1.0,
                  rope_layout: int = 0) -> torch.Tensor:
    """ops.mla_attention of q_nope [B, NH, DN] / q_pe [B, NH, DR] over the latent
    cache tensors [B, 1, S, R] / [B, 1, S, DR]; ``w_kvb`` is kv_b_proj.weight. With ``pos``
    [B] (int64) and ``inv_freq`` [DR/2] (fp32) ``q_pe`` is not rotated yet: the kernel rotates
    it (ops.MlaRope: cos / sin times ``rope_scale``, pairs in mla_latent_cache's ``rope_layout``)."""
    if (pos is None) != (inv_freq is None):
        raise ValueError("tileflow::mla_attention: the query rope takes both pos and inv_freq")
    nh = q_nope.shape[1]
    wv = w_kvb.view(nh, -1, w_kvb.shape[1])
    mask = None if key_mask is None else key_mask.contiguous()
    rope = None if pos is None else ops.MlaRope(pos.contiguous(), inv_freq.contiguous(), rope_scale, rope_layout)
    return ops.mla_attention(q_nope.contiguous(), q_pe.contiguous(), keys[:, 0], values[:, 0], lengths,
                             wv[:, :dn], wv[:, dn:], scale, mask, rope=rope)



@mla_attention.register_fake
def _(q_nope, q_pe, keys, values, lengths, w_kvb, dn, scale, key_mask=None, pos=None, inv_freq=None, rope_scale=1.0,
      rope_layout=0):
    nh = q_nope.shape[1]
    return q_nope.new_empty((q_nope.shape[0], nh, w_kvb.shape[0] // nh - dn))


@torch.library.custom_op("tileflow::mla_latent_cache", mutates_args=("keys", "values"))
def mla_latent_cache(x: torch.Tensor, w_kva: torch.Tensor, ln_w: torch.Tensor, eps: float, pos: torch.Tensor,
                     cache_pos: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, rope_layout: int,
                     keys: torch.Tensor, values: torch.Tensor) -> None:
    """ops.mla_latent_cache of the normed rows x [B, D] into the latent cache tensors
    [B, 1, S, R] / [B, 1, S, DR]: rotated at ``pos`` [B], written at ``cache_pos`` [B]."""
    ops.mla_latent_cache(x.contiguous(), w_kva, ln_w, eps, pos.contiguous(), inv_freq.contiguous(), rope_scale,
                         rope_layout, keys[:, 0], values[:, 0], cache_pos=cache_pos.contiguous())


@mla_latent_cache.register_fake
def _(x, w_kva, ln_w, eps, pos, cache_pos, inv_freq, rope_scale, rope_layout, keys, values):
    return None



@torch.library.custom_op("tileflow::moe_router", mutates_args=())
def moe_router(x: torch.Tensor, w: torch.Tensor, top_k: int, scale: float, n_group: int, topk_group: int,
               norm_topk: bool, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.moe_router: (topk_idx [M, K] int64, topk_weight [M, K] fp32)."""
    idx, wt = ops.moe_router(x.contiguous(), w, top_k, scale, n_group, topk_group, norm_topk, bias)
    return idx, wt



@moe_router.register_fake
def _(x, w, top_k, scale, n_group, topk_group, norm_topk, bias=None):
    m = x.shape[0]
    return x.new_empty((m, top_k), dtype=torch.int64), x.new_empty((m, top_k), dtype=torch.float32)



@torch.library.custom_op("tileflow::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """ops.moe_experts over gate_up_proj [E, 2I, D] (viewed [E, 2, I, D]) and down_proj [E, D, I]."""
    e, two_i, d = gate_up.shape
    return ops.moe_experts(x.contiguous(), topk_idx.contiguous(), topk_weight.contiguous(),
                           gate_up.view(e, 2, two_i // 2, d), down)



@moe_experts.register_fake
def _(x, topk_idx, topk_weight, gate_up, down):
    return x.new_empty(x.shape)
