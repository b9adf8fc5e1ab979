"""Ready counters between two launches of the decode step (gate-up -> down).

A launch with ``READY_SIGNAL`` adds, per program, the rows of its output it stored to
one int32 counter per ``ready_chunk`` rows (``ready`` [NC], ``TileBuilder.signal``) and
has its first program clear ``ready_next`` (the counters the next layer's pair will use,
so the caller never clears them between layers). The launch after it, with
``READY_WAIT``, waits only for the chunks of its input each K round reads
(``TileBuilder.wait_ready``) instead of for the whole previous launch: its programs
start multiplying while the producer's last programs still run.

Measured first in isolation (benchmarks/matvec_probe.py ``ready``, H200, NOTES.md
2026-12-05): gate-up 2x512 -> down 2x2048 with chunk 2048, 26.3-26.7 against 26.9-27.5 us
a layer with ``gdc_wait``. Triton only (the producer and consumer programs must run
concurrently or in launch order); the references treat the counters as data.
"""

from __future__ import annotations

READY_ARGS = ("ready", "ready_next", "ready_chunk")


def is_ready_arg(name: str) -> bool:
    """Whether ``name`` is a ready-counter argument, which no kernel reference takes."""
    return name in READY_ARGS


def ready_params(s: dict) -> dict:
    """The ready-counter parameters of a launch with sizes ``s`` (off unless it has them);
    ``READY_BLOCK``: the producer's block over the ``NC`` counters it clears."""
    p = {"READY_SIGNAL": s.get("READY_SIGNAL", 0), "READY_WAIT": s.get("READY_WAIT", 0)}
    if p["READY_SIGNAL"]:
        p["READY_BLOCK"] = 1 << max(0, (int(s["NC"]) - 1).bit_length())
    return p


def chunk_rows(xp, nc: int, n: int, chunk: int):
    """Rows of an ``n``-row output in each of its ``nc`` chunks of ``chunk`` rows."""
    c = xp.arange(nc) * chunk
    return xp.minimum(xp.maximum(n - c, 0), chunk)


def ready_reference(xp, outputs: dict, ready=None, ready_next=None, ready_chunk=None) -> dict:
    """The counters after a launch: a producer's ``ready`` gains each chunk's rows (times
    the M rows of the batch), its ``ready_next`` is zero; a consumer changes neither."""
    if ready_next is None:
        return outputs
    out = next(iter(outputs.values()))
    m, n = out.shape
    rows = chunk_rows(xp, ready.shape[0], n, int(ready_chunk)) * m
    return {**outputs, "ready": ready + xp.astype(rows, ready.dtype), "ready_next": xp.zeros_like(ready_next)}


def complete_counts(gen, shape, s: dict):
    """Input maker for a consumer's ``ready``: every chunk complete, exactly (a wait that
    asks for more than the producer adds would never end)."""
    import array_api_compat.torch as xp
    import torch

    return (chunk_rows(xp, shape[0], s["K"], s["RC"]) * s.get("M", 1)).to(torch.int32)


def some_counts(gen, shape, s: dict):
    """Input maker for a producer's counters: small random counts (it adds to ``ready``
    and clears ``ready_next``)."""
    import torch

    return torch.randint(1, 100, shape, generator=gen, dtype=torch.int32)
