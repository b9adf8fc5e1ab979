"""Where one decode step's time goes: a device timeline of real decode steps, per kernel
class, against the bytes each class must move.

Kernels of one CUDA stream finish in order, so each kernel is charged the time from the
previous kernel's end (or its own start, if later) to its own end; the device's idle
time between kernels (launch gaps, the host's work between steps) is a class of its
own. The charges add up to the steps profiled, and are not inflated by programmatic
dependent launch, where a kernel starts early and waits inside for its predecessor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tileflow.suite import KERNELS

# longest names first, so ``rms_norm_gate_up_silu_matvec`` is not taken for ``rms_norm``
_SUITE_NAMES = sorted(KERNELS, key=len, reverse=True)
_VENDOR_CLASSES = (
    (("gemv", "gemm", "cutlass", "xmma", "cublas", "splitkreduce"), "cuBLAS matmul"),
    (("flash", "fmha", "attention", "sdpa", "efficient"), "SDPA"),
    (("triton_",), "inductor kernels"),
    (("memcpy", "memset", "copy"), "copies"),
)


IDLE = "device idle (launch gaps, host)"


def kernel_class(name: str) -> str:
    """The suite kernel a device kernel belongs to (its generated names start with the
    suite name), else a vendor class."""
    for suite in _SUITE_NAMES:
        if name.startswith(suite + "_"):
            return suite
    low = name.lower()
    for keys, cls in _VENDOR_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other aten kernels"


def suite_bytes(config, context: int, elem: int) -> dict[str, int]:
    """Least bytes each suite kernel of the fused decode step moves per token (weights,
    the cache rows it reads or writes), for a Qwen2 / Llama ``config`` (DeepSeek-V2 / V3:
    :func:`deepseek_suite_bytes`)."""
    if getattr(config, "kv_lora_rank", None):
        return deepseek_suite_bytes(config, context, elem)
    d, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    nh, nkv, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    dh = getattr(config, "head_dim", None) or d // nh
    qkv_rows = (nh + 2 * nkv) * dh
    return {
        "embedding_lookup": d * elem,
        "qkv_rope_cache": layers * (qkv_rows * d + qkv_rows + d + 2 * nkv * dh) * elem,
        "gqa_attention": layers * 2 * nkv * context * dh * elem,
        "matvec_residual": layers * (nh * dh + inter) * d * elem,  # o_proj and down_proj
        "rms_norm_gate_up_silu": layers * (2 * inter * d + d) * elem,
        "rms_norm_matvec": (vocab * d + d) * elem,
    }


def deepseek_suite_bytes(config, context: int, elem: int) -> dict[str, int]:
    """:func:`suite_bytes` of the DeepSeek program (``deepseek_step``): per layer the query
    projection(s), the latent write, MLA over the latent cache with kv_b_proj, o_proj;
    the dense layers' MLP; the MoE layers' router (fp32, as transformers 5.25 keeps it), shared and
    chosen experts."""
    c = config
    d, layers, dense = c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace
    moe = layers - dense
    nh, dn, dr, dv, r = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                         c.kv_lora_rank)
    q_rows, ql = nh * (dn + dr), getattr(c, "q_lora_rank", None)
    shared = (c.n_shared_experts or 0) * c.moe_intermediate_size
    table = {
        "embedding_lookup": d * elem,
        "rms_norm": moe * 2 * d * elem,  # x and gamma: the MoE layers' post-attention norm
        "mla_latent_cache": layers * ((r + dr) * (d + 1) + r) * elem,
        "mla_attention": layers * (nh * (dn + dv) * r + context * (r + dr)) * elem,
        "matvec_residual": (layers * nh * dv * d + dense * c.intermediate_size * d) * elem,
        "rms_norm_gate_up_silu": dense * (2 * c.intermediate_size * d + d) * elem,
        "moe_router": moe * c.n_routed_experts * d * 4,
        # the chosen experts and the shared ones, in one kernel
        "moe_experts": moe * (c.num_experts_per_tok * c.moe_intermediate_size + shared) * 3 * d * elem,
        # the lm_head, and each layer's query: q_proj, or q_a_proj and q_b_proj (the input norm inside)
        "rms_norm_matvec": (c.vocab_size * d + d + layers * ((ql or q_rows) * d + d)
                            + (layers * (q_rows * ql + ql) if ql else 0)) * elem,
    }
    return {k: v for k, v in table.items() if v}


@dataclass
class ClassTime:
    name: str
    us: float  # per token, charged as the module docstring says
    busy_us: float  # per token, kernel start to end (PDL's early starts included)
    launches: float  # per token
    bytes: int = 0  # per token, 0 when not known

    @property
    def gbs(self) -> float:
        return self.bytes / (self.us * 1e3) if self.bytes and self.us > 0 else float("nan")


def device_timeline(run_steps) -> list[tuple[str, float, float]]:
    """(kernel name, start us, end us) of every device kernel and copy ``run_steps()``
    issues, in end order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_steps()
        torch.cuda.synchronize()
    rows = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == DeviceType.CUDA]
    return sorted(rows, key=lambda r: r[2])


def breakdown(timeline: list[tuple[str, float, float]], steps: int, byte_table: dict[str, int]) -> list[ClassTime]:
    """Per-class time per token from a timeline of ``steps`` decode steps. Idle device
    time between one kernel's end and the next one's start (launch gaps, the host's
    own work between steps) is a class of its own."""
    acc: dict[str, list[float]] = {}

    def charge(cls, us, busy, n):
        a = acc.setdefault(cls, [0.0, 0.0, 0])
        a[0] += us
        a[1] += busy
        a[2] += n

    prev_end = None
    for name, start, end in timeline:
        if prev_end is not None and start > prev_end:
            charge(IDLE, start - prev_end, 0.0, 0)
        begin = start if prev_end is None else max(start, prev_end)
        charge(kernel_class(name), end - begin, end - start, 1)
        prev_end = end
    out = [ClassTime(cls, a[0] / steps, a[1] / steps, a[2] / steps, byte_table.get(cls, 0)) for cls, a in acc.items()]
    return sorted(out, key=lambda c: -c.us)


def idle_gaps(timeline: list[tuple[str, float, float]], steps: int, top: int = 8) -> list[dict]:
    """Where the idle device time sits: per (class that ended, class that started next),
    the idle us and gaps per token, largest first (``top`` of them). Tells a launch gap
    inside the graph (two suite kernels) from the host's work around a replay (copies,
    the caller's argmax). ``largest`` names the kernel pair of the largest idle share in
    each row: "other aten kernels" and "copies" hold several kernels a step, and which
    two a long gap sits between is what decides what to move."""
    acc: dict[tuple[str, str], list[float]] = {}
    names: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for (prev, _, prev_end), (name, start, _) in zip(timeline, timeline[1:]):
        if start > prev_end:
            key = (kernel_class(prev), kernel_class(name))
            a = acc.setdefault(key, [0.0, 0])
            a[0] += start - prev_end
            a[1] += 1
            pair = names.setdefault(key, {})
            pair[(prev, name)] = pair.get((prev, name), 0.0) + start - prev_end
    rows = sorted(acc.items(), key=lambda kv: -kv[1][0])[:top]
    out = []
    for (a, b), (us, n) in rows:
        (first, then), pair_us = max(names[(a, b)].items(), key=lambda kv: kv[1])
        out.append({"after": a, "before": b, "us": round(us / steps, 2), "gaps": n / steps,
                    "largest": {"after": first[:120], "before": then[:120], "us": round(pair_us / steps, 2)}})
    return out


def as_records(rows: list[ClassTime]) -> list[dict]:
    """JSON-ready rows: class, us, busy_us, launches, bytes, GB/s (per token)."""
    return [{"class": r.name, "us": round(r.us, 2), "busy_us": round(r.busy_us, 2), "launches": r.launches,
             "bytes": r.bytes, "gbs": None if r.gbs != r.gbs else round(r.gbs, 1)} for r in rows]
