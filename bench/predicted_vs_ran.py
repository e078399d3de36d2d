"""Predictions committed before a GPU run, against the rows that run wrote.

    python bench/predicted_vs_ran.py --predict --build wan2.2-ti2v-5b --family wan --workload 480x832x33 \
        --plans none model nf4_model group_leaf_stream > results/wan22-5b-predicted.jsonl   # before the run
    python bench/predicted_vs_ran.py results/wan22-5b-predicted.jsonl                      # after it

Each line of the predictions file names a build, a workload and a plan of bench/calibration_plans.json
with the figures recommend's model gives for it from the calibration committed at the time (and, for
model offload, the three-term transfer lead of model_offload_transfer.py at the coefficients it had
printed then); the rows are looked up in results/strategies-h200.jsonl by build, plan and workload.
Prints the error of each figure.
"""

from __future__ import annotations

import argparse
import json
import sys
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


# model_offload_transfer.py's fit as printed before the Wan 2.2 rows existed (results/model-offload-transfer-h200.txt):
# seconds per byte in tensors of 32 MiB or more, per byte in smaller ones, per tensor
THREE_TERMS = (0.475 / GiB, 0.180 / GiB, 0.083e-3)


def predict(build: str, family: str, dtype: str, workload: str, steps: int, plans: list[str]) -> None:
    """One JSON line per plan: what the model predicts for it now (peak VRAM, seconds, host RAM)."""
    from model_offload_transfer import moved
    from pipefit.tools.estimate import Workload, estimate, load_coefficients, trace_for
    from pipefit.tools.measure import measure_components
    from pipefit.tools.plan import Plan
    from pipefit.tools.strategies import Weights

    height, width, *frames = (int(v) for v in workload.split("x"))
    w = Workload(height=height, width=width, frames=frames[0] if frames else None, steps=steps)
    m = measure_components(f"builtin:{build}", dtype=dtype)
    k, tensors = load_coefficients(), trace_for(m, w).weight_tensors
    free = k.model_copy(update={"transfer_efficiency": dict.fromkeys({*k.transfer_efficiency, "stream_leaf", "stream_block"}, 1e9)})
    known = json.loads((ROOT / "bench/calibration_plans.json").read_text())[family]
    for name in plans:
        plan = Plan.model_validate(known[name])
        e = estimate(plan, m, w)
        three = None
        if plan.offload == "model":  # on and off once per call
            terms = moved(plan, Weights.of(plan, m), tensors)
            three = round(estimate(plan, m, w, coefficients=free).seconds + 2 * sum(a * b for a, b in zip(THREE_TERMS, terms)), 2)
        print(json.dumps({"build": build, "workload": workload, "steps": steps, "plan_name": name, "allocator": plan.allocator,
                          "vram_gib": round(e.vram_bytes / GiB, 2), "peak_stage": e.peak_stage, "seconds": e.seconds,
                          "seconds_three_terms": three, "ram_load_gib": round(e.ram_load_bytes / GiB, 2),
                          "ram_load_held_gib": round(e.ram_load_held_bytes / GiB, 2), "ram_run_gib": round(e.ram_run_bytes / GiB, 2),
                          "predicted_at": "commit before the run"}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, nargs="?", help="a predictions file to compare with the runs")
    parser.add_argument("--runs", type=Path, default=ROOT / "bench/results/strategies-h200.jsonl")
    parser.add_argument("--predict", action="store_true", help="print predictions instead (before the run)")
    parser.add_argument("--build")
    parser.add_argument("--family", help="the plans' family in bench/calibration_plans.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", help="HxW or HxWxFRAMES")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--plans", nargs="*", default=[])
    args = parser.parse_args()
    if args.predict:
        if not (args.build and args.family and args.workload and args.plans):
            parser.error("--predict needs --build, --family, --workload and --plans")
        sys.path.insert(0, str(ROOT / "bench"))
        predict(args.build, args.family, args.dtype, args.workload, args.steps, args.plans)
        return
    if args.predictions is None:
        parser.error("give a predictions file, or --predict")
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
