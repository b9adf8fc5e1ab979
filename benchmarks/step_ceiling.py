"""The best a decode step of separate launches could do: the 1.5B step's launch sequence
(per layer qkv, attention's two stages, o, gate-up, down; then lm_head) with every kernel
replaced by a pure weight-streaming read of the same bytes (no arithmetic, no dependent
loads, contiguous 16-byte loads), each layer's buffers its own (3.1 GB in all, so nothing
is served from L2), captured in one CUDA graph with programmatic dependent launch.

Three forms of the same sequence:

- ``no-pdl``: plain stream order; a launch starts when its predecessor has finished.
- ``wait-first``: dependent launch, every kernel waits (``gdc_wait``) before its first
  load, as the suite's kernels do: the ceiling of the present structure.
- ``first-block``: dependent launch, each program loads its first block, then waits (the
  suite's ``PIPELINE`` tiles loaded before the wait).
- ``wait-last``: dependent launch, every kernel streams its bytes first and waits only
  before its one store: as if each kernel's weights never waited for its predecessor
  (what a persistent kernel with ready flags aims at), still one launch per kernel.

Against ``one-read``: the whole 3.1 GB as one launch (the step's bytes at a single
kernel's streaming rate). If ``wait-first`` is close to the real step, per-kernel tuning
is done and only overlap across kernels (``wait-last``) or fewer launches can pay.

    python benchmarks/step_ceiling.py [model]     # GPU only; prints a table, JSON to $OUT
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl
from graph_timing import replay_us

WAIT_NONE, WAIT_FIRST, WAIT_LAST, WAIT_SECOND = 0, 1, 2, 3
FORMS = {"no-pdl": WAIT_NONE, "wait-first": WAIT_FIRST, "first-block": WAIT_SECOND, "wait-last": WAIT_LAST}


@triton.jit
def stream_read(w_ptr, out_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, WAIT: tl.constexpr):
    pid = tl.program_id(0)
    if WAIT == 1:
        tl.extra.cuda.gdc_wait()
    if WAIT != 0:
        tl.extra.cuda.gdc_launch_dependents()
    base = w_ptr + pid.to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, CHUNK, BLOCK):
        if WAIT == 3:
            if k == BLOCK:
                tl.extra.cuda.gdc_wait()
        acc += tl.load(base + k + tl.arange(0, BLOCK)).to(tl.float32)
    if WAIT == 3:
        if CHUNK == BLOCK:
            tl.extra.cuda.gdc_wait()
    if WAIT == 2:
        tl.extra.cuda.gdc_wait()
    tl.store(out_ptr + pid, tl.sum(acc))


def layer_kernels(cfg) -> list[tuple[str, int]]:
    """(name, bf16 elements read) of one layer's launches, in step order, as the suite's
    decode step runs them (attention's K/V at a 384-token context, split over two stages)."""
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = d // nh
    kv = 384 * nkv * dh * 2
    return [("qkv", d * (nh + 2 * nkv) * dh), ("attention", kv), ("combine", nh * dh * 16),
            ("o", d * d), ("gate_up", 2 * inter * d), ("down", d * inter)]


def _plans(n: int) -> list[tuple[int, int, int]]:
    """(programs, BLOCK, warps) splitting ``n`` elements exactly into equal contiguous chunks:
    for each block size, the program counts dividing the work nearest to 1, 2, 4, ... 64
    programs a multiprocessor (132 on an H100 / H200)."""
    out = []
    for block, warps in ((1024, 4), (2048, 8), (4096, 8)):
        if n % block:
            continue
        m = n // block
        divisors = [p for p in range(1, min(m, 1 << 15) + 1) if m % p == 0]
        for target in (132 * 2**i for i in range(6)):
            p = min(divisors, key=lambda p: abs(p - target))
            if (p, block, warps) not in out and p * 2 >= min(target, m):
                out.append((p, block, warps))
    return out


def launch(buf: torch.Tensor, out: torch.Tensor, plan, wait: int) -> None:
    programs, block, warps = plan
    extra = {"launch_pdl": True} if wait else {}
    stream_read[(programs,)](buf, out, buf.numel() // programs, block, wait, num_warps=warps, **extra)


def graph_us(run, reps: int = 10) -> float:
    """Median µs of one replay of a CUDA graph of ``run()``."""
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return replay_us(g, reps)


def best_plan(bufs: list[torch.Tensor], out: torch.Tensor) -> tuple[tuple, float]:
    """The fastest plan for a read of this size, timed as 28 back-to-back dependent launches
    (one per layer's buffer), and its µs a launch."""
    best = None
    for plan in _plans(bufs[0].numel()):
        us = graph_us(lambda: [launch(b, out, plan, WAIT_FIRST) for b in bufs]) / len(bufs)
        if best is None or us < best[1]:
            best = (plan, us)
    return best


def main() -> None:
    from tileflow.bench.models import builtin_config
    from tileflow.bench.roofline import copy_bandwidth_gbs

    name = sys.argv[1] if sys.argv[1:] else "deepseek-r1-distill-qwen-1.5b"
    cfg = builtin_config(name).to_dict()
    layers, vocab, d = cfg["num_hidden_layers"], cfg["vocab_size"], cfg["hidden_size"]
    dev = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(dev)
    kernels = layer_kernels(cfg)
    bufs = {k: [torch.randn(n, device=dev, dtype=torch.bfloat16) for _ in range(layers)] for k, n in kernels}
    head = torch.randn(vocab * d, device=dev, dtype=torch.bfloat16)
    out = torch.empty(1 << 16, device=dev, dtype=torch.float32)
    total = sum(n for _, n in kernels) * layers * 2 + head.numel() * 2

    rows, plans = [], {}
    for k, n in kernels:
        plan, us = best_plan(bufs[k], out)
        plans[k] = plan
        rows.append({"kernel": k, "MB": n * 2 / 1e6, "plan": plan, "us": us, "GBs": n * 2 / us / 1e3,
                     "us_at_copy": n * 2 / copy_gbs / 1e3})
    plans["lm_head"], head_us = best_plan([head], out)
    rows.append({"kernel": "lm_head", "MB": head.numel() * 2 / 1e6, "plan": plans["lm_head"], "us": head_us,
                 "GBs": head.numel() * 2 / head_us / 1e3, "us_at_copy": head.numel() * 2 / copy_gbs / 1e3})

    def step(wait):
        for i in range(layers):
            for k, _ in kernels:
                launch(bufs[k][i], out, plans[k], wait)
        launch(head, out, plans["lm_head"], wait)

    forms = {f: graph_us(lambda: step(w)) for f, w in FORMS.items()}
    # the whole step's bytes in one launch: every buffer read by one grid, buffer after buffer
    flat = torch.cat([b for k, _ in kernels for b in bufs[k]] + [head])
    one_plan = min(_plans(flat.numel()), key=lambda p: graph_us(lambda: launch(flat, out, p, WAIT_NONE)))
    forms["one-read"] = graph_us(lambda: launch(flat, out, one_plan, WAIT_NONE))
    del flat

    roofline = copy_gbs * 1e9 / total
    print(f"{name}: {total / 1e9:.3f} GB a step, copy {copy_gbs:.0f} GB/s, roofline {roofline:.0f} tok/s, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'kernel':<10}{'MB':>9}{'plan (programs, block, warps)':>32}{'us':>9}{'GB/s':>8}{'us at copy':>12}")
    for r in rows:
        print(f"{r['kernel']:<10}{r['MB']:>9.2f}{str(r['plan']):>32}{r['us']:>9.2f}{r['GBs']:>8.0f}{r['us_at_copy']:>12.2f}")
    print(f"{'form':<12}{'us a step':>10}{'tok/s':>9}{'% roofline':>12}")
    for f, us in forms.items():
        print(f"{f:<12}{us:>10.1f}{1e6 / us:>9.1f}{100 * 1e6 / us / roofline:>12.1f}")
    record = {"what": "step_ceiling", "model": name, "device": torch.cuda.get_device_name(),
              "commit": os.environ.get("TILEFLOW_COMMIT", "unknown"), "copy_bandwidth_gbs": copy_gbs,
              "bytes_per_step": total, "roofline_tok_s": roofline, "kernels": rows,
              "forms_us": forms, "one_read_plan": one_plan}
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, f"step-ceiling-{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    plot(record, os.path.join(out_dir, f"step-ceiling-{name}.png"))


def plot(record: dict, png: str, measured: dict | None = None) -> None:
    """Bars of tok/s for each form of the sequence (and ``measured``: label -> tok/s of
    real decode steps on the same device), against the copy-bandwidth roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {f"pure reads: {f}": 1e6 / us for f, us in record["forms_us"].items()}
    bars.update(measured or {})
    fig, ax = plt.subplots(figsize=(9, 4))
    drawn = ax.bar(list(bars), list(bars.values()), color=["#999" if k.startswith("pure") else "#1f77b4" for k in bars])
    for b, v in zip(drawn, bars.values()):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}\n{100 * v / record['roofline_tok_s']:.0f}%",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(record["roofline_tok_s"], color="k", ls="--", lw=1, label=f"roofline {record['roofline_tok_s']:.0f} tok/s")
    ax.axhline(0.8 * record["roofline_tok_s"], color="r", ls=":", lw=1, label="80% of the roofline")
    ax.set_ylabel("tok/s (batch 1)")
    ax.set_title(f"{record['model']}: the step's launch sequence as pure reads vs real steps, {record['device']}",
                 fontsize=9)
    ax.set_ylim(0, 1.25 * max(bars.values()))
    ax.legend(fontsize=8, loc="upper left")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
