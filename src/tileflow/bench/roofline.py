"""The roofline of batch-1 decode: measured copy bandwidth over the bytes one token
must read (every weight once, one embedding row, the KV cache actually read)."""

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


def bytes_per_token(model, context: int) -> dict:
    """Least bytes one decode step reads at ``context`` cached tokens."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = getattr(cfg, "tie_word_embeddings", False)
    if not tied:  # the embedding table is read one row a token; lm_head reads its own matrix
        weights -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * emb.element_size()
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}
