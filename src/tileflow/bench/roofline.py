"""The roofline of batch-1 decode: measured copy bandwidth over the bytes one token
must read (every weight once, one embedding row, the KV cache actually read), and the
same with the projections in tileflow's int4 / fp8 layouts (``tileflow bench --weights``)."""

from __future__ import annotations

import statistics

import torch


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Bytes read + written per second of a large device-to-device copy, in GB/s."""
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def cache_bytes_per_position(config, element_size: int) -> int:
    """Bytes of cache one position holds over all layers: K and V of every KV head, or for
    multi-head latent attention (DeepSeek-V2 / V3) one shared latent row
    (``kv_lora_rank + qk_rope_head_dim``)."""
    if getattr(config, "kv_lora_rank", None):
        width = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        width = 2 * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    return config.num_hidden_layers * width * element_size


def _expert_share(name: str, config) -> float:
    """The share of a parameter one token reads: ``num_experts_per_tok / n_routed_experts``
    for routed experts' weights (fused [E, ...] tensors or one module per expert), else 1."""
    experts = getattr(config, "n_routed_experts", None)
    if not experts or ".experts." not in name:
        return 1.0
    return config.num_experts_per_tok / experts


def bytes_per_token(model, context: int) -> dict:
    """Least bytes one decode step reads at ``context`` cached tokens: every weight once
    (of a mixture of experts only the chosen experts'), one embedding row, the cache."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    weights = int(sum(p.numel() * p.element_size() * _expert_share(n, cfg) for n, p in model.named_parameters()))
    tied = getattr(cfg, "tie_word_embeddings", False)
    if not tied:  # the embedding table is read one row a token; lm_head reads its own matrix
        weights -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    kv = cache_bytes_per_position(cfg, emb.element_size()) * context
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def _projection_bytes(n: int, k: int, weights: str, element_size: int) -> int:
    """Bytes of one [N, K] projection as ``tileflow.patch(options={"weights": ...})`` holds it
    (``suite/quantize.py``): int4 the packed codes (two a byte) plus a scale and a zero point per
    128 columns in the model's dtype, or the model's own weight where K is not a multiple of 256
    (the int4 packing; patch keeps it so); fp8 one byte a weight plus an fp32 scale per
    128 x 128 block."""
    from tileflow.suite.quantize import GROUP

    if weights == "int4":
        if k % (2 * GROUP):
            return n * k * element_size
        return n * k // 2 + 2 * n * (k // GROUP) * element_size
    if weights == "fp8":
        return n * k + (-(-n // GROUP)) * (-(-k // GROUP)) * 4
    raise ValueError(f"weights={weights!r}: int4 or fp8")


def quantized_bytes_per_token(model, context: int, weights: str) -> dict:
    """:func:`bytes_per_token` with every decoder layer's q/k/v/o and gate/up/down weight read
    in the ``weights`` format ("int4" / "fp8") the quantized decode program reads; what it keeps
    in the model's dtype (embedding row, norms, biases, lm_head, the KV cache) counted as there.
    Adds ``projections`` (their bytes in the format) and ``projections_model_dtype``."""
    from tileflow.integrations.transformers.quantized import PROJECTIONS

    out = dict(bytes_per_token(model, context))
    elem = model.get_input_embeddings().weight.element_size()
    before = after = 0
    for layer in model.model.layers:
        for part, name in PROJECTIONS:
            w = getattr(getattr(layer, part), name).weight
            n, k = w.shape
            before += w.numel() * w.element_size()
            after += _projection_bytes(n, k, weights, elem)
    out["weights"] += after - before
    out["total"] = out["weights"] + out["kv_cache"]
    out.update(projections=after, projections_model_dtype=before)
    return out


def fp8_checkpoint_bytes_per_token(model, context: int) -> tuple[dict, dict]:
    """For a model in the fp8 checkpoint form (projections transformers' ``FP8Linear``, the
    rest in the model's dtype: ``--weights fp8-checkpoint`` or an fp8 checkpoint folder): the
    bytes one step really reads, as :func:`quantized_bytes_per_token` gives them (``projections``:
    the e4m3 codes and fp32 block scales as stored; ``projections_model_dtype``: the same
    projections in the model's dtype), and :func:`bytes_per_token` of the same model had its
    projections been in the model's dtype (the model-dtype roofline beside it)."""
    from tileflow.integrations.transformers.quantized import PROJECTIONS

    read = dict(bytes_per_token(model, context))  # FP8Linear's weight and weight_scale_inv as they lie
    elem = model.get_input_embeddings().weight.element_size()
    stored = dense = 0
    for layer in model.model.layers:
        for part, name in PROJECTIONS:
            m = getattr(getattr(layer, part), name)
            scales = getattr(m, "weight_scale_inv", None)
            stored += m.weight.numel() * m.weight.element_size() + (0 if scales is None else
                                                                    scales.numel() * scales.element_size())
            dense += m.weight.numel() * elem
    read.update(projections=stored, projections_model_dtype=dense)
    plain = {"weights": read["weights"] - stored + dense, "kv_cache": read["kv_cache"]}
    plain["total"] = plain["weights"] + plain["kv_cache"]
    return read, plain
