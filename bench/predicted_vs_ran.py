"""Predictions committed before a GPU run, against the rows that run wrote.

    python bench/predicted_vs_ran.py results/wan22-5b-predicted.jsonl

Each line of the predictions file names a build, a workload and a plan of bench/calibration_plans.json
with the figures recommend's model gave for it (the commit before the run); the rows are looked up in
results/strategies-h200.jsonl by build, plan and workload. Prints the error of each figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
FIGURES = [  # (prediction key, row key, scale): peak VRAM, seconds per call, host RAM
    ("vram_gib", "process_peak_vram_bytes", GiB), ("seconds", "seconds", 1.0),
    ("ram_load_gib", "peak_rss_load_bytes", GiB), ("ram_load_held_gib", "peak_held_load_bytes", GiB),
    ("ram_run_gib", "peak_rss_run_bytes", GiB),
]  # fmt: skip


def _workload(row: dict) -> str:
    w = row["workload"]
    return "x".join(str(w[k]) for k in ("height", "width", "frames") if w.get(k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--runs", type=Path, default=ROOT / "bench/results/strategies-h200.jsonl")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.runs.read_text().splitlines()]
    for line in args.predictions.read_text().splitlines():
        p = json.loads(line)
        ran = [r for r in rows if r["ok"] and r["build"] == p["build"] and r["plan_name"] == p["plan_name"]
               and _workload(r) == p["workload"]]  # fmt: skip
        if not ran:
            print(f"{p['build']} {p['plan_name']}: not run")
            continue
        r = ran[-1]
        cells = []
        for key, row_key, scale in FIGURES:
            if r.get(row_key):
                measured = r[row_key] / scale
                cells.append(f"{key.removesuffix('_gib')} {p[key]:.2f}/{measured:.2f} ({p[key] / measured - 1:+.1%})")
        print(f"{p['build']} {p['plan_name']:18s} predicted/measured: " + ", ".join(cells))


if __name__ == "__main__":
    main()
