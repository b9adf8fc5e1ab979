"""Rebuild benchmarks/results/index.csv: one row per (record, path) of the JSON records there.

    python benchmarks/index_results.py

tok_s is decode tok/s (JAX records: the decode loop inside one jit, the figure the docs
quote); fraction_of_roofline is of the roofline measured in the same run. Records that
time something other than whole paths get one row per form (step ceiling: each launch
form's µs a step as tok/s; tileflow tune: baseline and tuned step) or a single row with
empty figures (kernel leaderboard, Pallas check)."""

import csv
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["date", "commit", "device", "model", "path", "tok_s", "fraction_of_roofline", "file"]


def rows(path: Path, rec: dict):
    dev = rec.get("device", "")
    if isinstance(dev, dict):  # the ONNX CPU records
        dev = f"cpu ({dev.get('cores', '?')} cores)"
    base = {"date": str(rec.get("date") or path.name[:10])[:10],
            "commit": str(rec.get("commit") or rec.get("git_commit") or "")[:7],
            "device": dev, "model": rec.get("model", ""), "file": path.name}
    roof = rec.get("roofline_tok_s")
    if isinstance(rec.get("paths"), dict):
        for name, p in rec["paths"].items():
            tok = p.get("device_loop_tok_s", p.get("decode_tok_s"))
            frac = p.get("device_loop_fraction_of_roofline", p.get("fraction_of_roofline"))
            fmt = p.get("weights", "model")  # a quantized path (bench --weights) must not read as the model dtype's
            yield {**base, "path": name if fmt == "model" else f"{name} ({fmt})", "tok_s": tok,
                   "fraction_of_roofline": frac}
    elif isinstance(rec.get("tok_s"), dict):
        for name, tok in rec["tok_s"].items():
            yield {**base, "path": name, "tok_s": tok, "fraction_of_roofline": None}
    elif isinstance(rec.get("forms_us"), dict):
        for name, us in rec["forms_us"].items():
            yield {**base, "path": f"ceiling:{name}", "tok_s": 1e6 / us,
                   "fraction_of_roofline": 1e6 / us / roof if roof else None}
    elif "baseline_us" in rec:
        for name in ("baseline", "final"):
            yield {**base, "path": f"tune:{name}", "tok_s": 1e6 / rec[f"{name}_us"], "fraction_of_roofline": None}
    else:
        yield {**base, "path": str(rec.get("what", "")).split(",")[0], "tok_s": None, "fraction_of_roofline": None}


def main() -> int:
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        for row in rows(path, json.loads(path.read_text())):
            for key in ("tok_s", "fraction_of_roofline"):
                row[key] = "" if row[key] is None else f"{row[key]:.{1 if key == 'tok_s' else 4}f}"
            out.append(row)
    with open(RESULTS / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(out)
    print(f"{len(out)} rows -> {RESULTS / 'index.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
