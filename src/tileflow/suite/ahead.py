"""L2 look-ahead inputs, shared by the suite kernels that take them.

A kernel with ``AHEAD`` > 0 has extra 1-D inputs ``ahead0..`` (sizes ``A0..``) that it
never reads: its programs split each between them and bring it into L2
(``TileBuilder.prefetch_share``), ``AHEAD_BLOCK`` lines per round, marked evict-last
with ``AHEAD_KEEP``. They are weights of kernels later in the step: a latency-bound
kernel (q/k/v, attention, o) leaves most of the memory bandwidth idle while it runs,
and what it prefetches the bandwidth-bound kernel after it (gate-up) reads from L2.
``AHEAD`` and the ``A*`` sizes are sizes, not tuned parameters: what is prefetched does
not change a kernel's tiles.

Measured on an H200 (NOTES.md, 2026-12-03 and 2026-12-04): no step got faster. A program
does not retire before its prefetch requests are taken, so the issuing kernel slows by
about the prefetched bytes at copy speed, and the reader gains less than that. The decode
step uses look-ahead only when asked (``TILEFLOW_AHEAD``, ``TILEFLOW_MLP_AHEAD``).
"""

from __future__ import annotations

AHEAD_PARAMS = {"AHEAD": 0, "AHEAD_BLOCK": 256, "AHEAD_KEEP": 0}


def is_ahead_input(name: str) -> bool:
    """Whether ``name`` is a look-ahead input (``ahead0..``): prefetched, never read, so no
    reference takes it."""
    return name.startswith("ahead") and name[5:].isdigit()


def ahead_params(s: dict) -> dict:
    """The look-ahead parameters of a launch with sizes ``s`` (none unless it has ``AHEAD``)."""
    return {**AHEAD_PARAMS, "AHEAD": s.get("AHEAD", 0), "AHEAD_KEEP": s.get("AHEAD_KEEP", 0)}


def ahead_inputs(k, p) -> list:
    """Declares the inputs ``ahead0..`` (after the kernel's own, so a launch passes them
    last among its tensors)."""
    return [k.input(f"ahead{i}", (f"A{i}",)) for i in range(p.get("AHEAD", 0))]


def prefetch_ahead(k, views, p) -> None:
    """Inside a stage: each program's share of every look-ahead input into L2."""
    for view in views:
        k.prefetch_share(view, "AHEAD_BLOCK", keep=p.get("AHEAD_KEEP", 0))


def ahead_sizes(ahead, keep: bool = False) -> tuple[list, dict]:
    """The flat views a launch passes for the tensors ``ahead`` (contiguous ones only: a
    prefetch names whole lines of one span) and the sizes that say so (with ``keep``, the
    lines are marked evict-last). They change nothing computed."""
    flat = [t.reshape(-1) for t in ahead if t.is_contiguous()]
    if not flat:
        return flat, {}
    return flat, {"AHEAD": len(flat), "AHEAD_KEEP": int(keep), **{f"A{i}": t.numel() for i, t in enumerate(flat)}}
