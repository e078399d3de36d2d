"""The speed plans on the GPU (issue 20): each run's seconds per call and peak VRAM against the prediction,
and recommend's speed pick today against the one before step caching and fp8 compute.

    python bench/speed_plans.py [--runs bench/results/strategies-h200.jsonl]

Rows are bench/calibrate_strategies.py's. A run's plan name says what it is: ``speed_oldN`` is what
`pipefit recommend --prefer speed --vram NGiB` picked before this work, ``speed_newN`` what it picks now
(both run under ``--vram-cap NGiB``); the others isolate one technique (``fp8dq``, ``taylorseer_lite``,
``cudnn``, ``compile``, ...) on the plain plan. Speed-ups are against the old pick at the same cap, and
against the plain plan (``none`` or ``nf4_plain``) of the same pipeline, workload and steps. ``warm-up``
is the measured first call (at most 4 steps: where compiling happens), ``compile`` the predicted compile time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fit_gpu import _measured, plan_of, rows, workload_of  # noqa: E402

from pipefit.tools.estimate import estimate  # noqa: E402
from pipefit.tools.gpus import gpu_profile  # noqa: E402

GiB = 2**30
SPEED = ("speed_", "fp8dq", "taylorseer", "cudnn", "compile", "nf4_plain", "nf4_cudnn", "nf4_taylorseer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="*", default=[ROOT / "bench" / "results" / "strategies-h200.jsonl"])
    args = parser.parse_args()
    runs = [r for r in rows(args.runs) if r["workload"]["steps"] >= 20]
    profile = gpu_profile(runs[0]["gpu"]) if runs else None
    print(f"{'pipeline':16s} {'plan':22s} {'cap':>5s} {'s/call':>7s} {'pred':>6s} {'err':>6s} {'warm-up':>7s} {'compile':>7s}"
          f" {'VRAM':>6s} {'pred':>6s} {'vs plain':>8s} {'vs old':>7s}")  # fmt: skip
    errors, targets = [], []
    for r in runs:
        if not r["plan_name"].startswith(SPEED) and r["plan_name"] != "none":
            continue
        m, w = _measured(r), workload_of(r)
        e = estimate(plan_of(r), m, w, gpu=profile)
        cap = r.get("vram_cap_bytes")
        same = [o for o in runs if o["build"] == r["build"] and o["workload"] == r["workload"]]
        plain = next((o for o in same if o["plan_name"] in ("none", "nf4_plain")), None)
        old = next((o for o in same if o["plan_name"].startswith("speed_old") and o.get("vram_cap_bytes") == cap
                    and r["plan_name"].startswith("speed_new")), None)  # fmt: skip
        err = (e.seconds - r["seconds"]) / r["seconds"]
        errors.append(err)
        vs_plain = f"{plain['seconds'] / r['seconds']:.2f}x" if plain and plain is not r else "-"
        vs_old = f"{old['seconds'] / r['seconds']:.2f}x" if old else "-"
        if old:
            fits = r["outcome"] == "ok" and (cap is None or r["peak_vram_bytes"] <= cap)
            targets.append((r["build"], cap, old["seconds"] / r["seconds"], fits))
        print(f"{r['build']:16s} {r['plan_name']:22s} {f'{cap // GiB}G' if cap else '-':>5s} {r['seconds']:7.2f}"
              f" {e.seconds:6.2f} {err:+6.1%} {r['warmup_seconds']:7.1f} {e.first_call_seconds - e.seconds:7.1f}"
              f" {r['peak_vram_bytes'] / GiB:6.2f} {e.vram_bytes / GiB:6.2f} {vs_plain:>8s} {vs_old:>7s}")  # fmt: skip
    if errors:
        print(f"\ns/call: {sum(abs(x) <= 0.20 for x in errors)}/{len(errors)} within 20%")
    for build, cap, speedup, fits in targets:
        print(f"{build} at {cap // GiB if cap else '-'} GiB: the new speed pick is {speedup:.2f}x the old one's speed "
              f"(target 1.5x), {'fits' if fits else 'DOES NOT fit'} under the cap")  # fmt: skip


if __name__ == "__main__":
    main()
