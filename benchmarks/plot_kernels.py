#!/usr/bin/env python3
"""Chart of a kernel leaderboard JSON: achieved GB/s of tileflow vs the vendor path
per kernel, with the copy bandwidth measured in the same run as a line.
``plot_kernels.py RESULT.json`` writes RESULT.png beside it."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str) -> Path:
    rec = json.loads(Path(path).read_text())
    rows = [r for r in rec["rows"] if "us" in r]
    labels = [f"{r['kernel']}\n{r['case']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(14, 5.5))
    ax.bar([i - 0.2 for i in x], [r["gbs"] for r in rows], 0.4, label="tileflow (generated Triton)")
    ax.bar([i + 0.2 for i in x], [r["vendor_gbs"] for r in rows], 0.4, label="vendor path (cuBLAS / SDPA / torch)")
    ax.axhline(rec["copy_bandwidth_gbs"], color="k", ls="--", lw=1,
               label=f"copy bandwidth {rec['copy_bandwidth_gbs']:.0f} GB/s")
    for i, r in enumerate(rows):
        ax.text(i - 0.2, r["gbs"] + 30, f"{r['us']:.1f}us", ha="center", fontsize=7, rotation=90)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("GB/s (least bytes / time)")
    ax.set_title(f"tileflow decode suite, bf16, DeepSeek-R1-Distill-Qwen-1.5B shapes, {rec['device']}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
