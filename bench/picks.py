"""Issue 16's pick target on the GPU runs: for each family run, at 8, 12 and 16 GiB of VRAM with 32 and
64 GiB of RAM, recommend's top pick (balanced, one call) against what ran on the GPU.

    python bench/picks.py [--runs bench/results/strategies-h200.jsonl] [--steps 4] [--top 3]

Per cell: the pick and whether it ran under those caps (``--vram-cap``/``--ram-cap`` rows), or ran
uncapped within them, or did not run; then the fastest run that fitted the cell (its measured peak VRAM
and RSS within the caps, any plan) and the pick's measured time against it (target: within 15%).
``--top`` also lists the next fitting options and whether each ran. Predictions are for the runs' GPU
(``gpu=`` its profile) at the runs' workload, steps and dtype, so a row's plan can be compared as is.
Plans that did not run are printed last as JSON, for bench/calibration_plans.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fit_gpu import plan_of, rows  # noqa: E402

from pipefit.tools.plan import parse_plan  # noqa: E402
from pipefit.tools.recommend import recommend  # noqa: E402

GiB = 2**30
# the GPU runs' families: built-in, workload as the rows record it, dtype
FAMILIES = {
    "flux1-dev": ({"height": 1024, "width": 1024}, "bfloat16"),
    "sdxl-base": ({"height": 1024, "width": 1024}, "float16"),
    "wan2.1-t2v-1.3b": ({"height": 480, "width": 832, "frames": 33}, "bfloat16"),
}
CELLS = [(vram, ram) for vram in (8, 12, 16) for ram in (32, 64)]


def _key(plan) -> str:
    return parse_plan(plan).model_dump_json()


def _fits(row: dict, vram: int, ram: int) -> bool:
    """Whether a run stayed within the cell: its peak VRAM and host memory (the trial's own peaks; the
    held part of the RSS, what --ram-cap limits, where the row has it)."""
    host = row.get("process_peak_held_bytes") or max(
        row.get("peak_rss_load_bytes") or 0, row.get("peak_rss_run_bytes") or 0, row.get("process_peak_rss_bytes") or 0
    )
    return row.get("ok", False) and row["peak_vram_bytes"] <= vram * GiB and host <= ram * GiB


def _capped_within(row: dict, vram: int, ram: int) -> bool:
    """Whether the trial ran under a VRAM cap (and a RAM cap, if any) no larger than the cell's."""
    return (
        bool(row.get("vram_cap_bytes"))
        and row["vram_cap_bytes"] <= vram * GiB
        and (row.get("ram_cap_bytes") or 0) <= ram * GiB
    )


def _ran(row: dict, build: str, workload: dict) -> bool:
    """Whether a row is of this built-in at this workload (any steps: the caller chose them)."""
    return row["build"] == build and {k: v for k, v in row["workload"].items() if k != "steps"} == workload


def how_it_ran(runs: list[dict], vram: int, ram: int) -> tuple[str, dict | None]:
    """('under caps' | 'uncapped, within' | 'failed' | 'too big' | 'not run', the row that says so). A run
    that stopped (an OOM under the caps, or the RAM cap) is 'failed' unless another run of it fitted. Of a
    plan's runs, its fastest counts, as for the fastest plan it is compared with (the host's speed differs
    between device calls: SDXL leaf streams 1.10-1.54 s)."""
    for status, test in (("under caps", lambda r: _capped_within(r, vram, ram)), ("uncapped, within", lambda r: True)):
        row = min((r for r in runs if test(r) and _fits(r, vram, ram)), key=lambda r: r["seconds"], default=None)
        if row:
            return status, row
    failed = next((r for r in runs if not r.get("ok")), None)
    if failed:
        return "failed", failed
    return ("too big", runs[0]) if runs else ("not run", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="*", default=[ROOT / "bench" / "results" / "strategies-h200.jsonl"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=3, help="fitting options listed per cell")
    args = parser.parse_args()
    every = [r for r in rows(args.runs) if r["workload"]["steps"] == args.steps]
    # the runs that stopped too (an OOM under the caps): they say a pick did not fit
    stopped = [json.loads(line) for path in args.runs for line in path.read_text().splitlines()]
    stopped = [r for r in stopped if not r.get("ok") and r.get("build") and r["workload"]["steps"] == args.steps]
    gpu = every[0]["gpu"] if every else None
    missing: dict[str, dict] = {}
    met = total = 0
    for build, (workload, dtype) in FAMILIES.items():
        runs = [r for r in every if _ran(r, build, workload)]
        by_plan: dict[str, list[dict]] = {}
        for r in runs + [r for r in stopped if _ran(r, build, workload)]:
            by_plan.setdefault(plan_of(r).model_dump_json(), []).append(r)
        print(f"\n{build} {workload} {dtype}, {args.steps} steps: {len(runs)} runs")
        for vram, ram in CELLS:
            rec = recommend(f"builtin:{build}", **workload, steps=args.steps, dtype=dtype, vram=f"{vram}GiB",
                            ram=f"{ram}GiB", gpu=gpu)  # fmt: skip
            fitting_runs = [r for r in runs if _fits(r, vram, ram)]
            fastest = min(fitting_runs, key=lambda r: r["seconds"], default=None)
            options = [o for o in rec.options if o.fits][: args.top] or rec.options[:1]
            print(f"  {vram:2d} GiB / {ram} GiB: fastest that ran within: "
                  + (f"{fastest['plan_name']} {fastest['seconds']:.2f} s" if fastest else "none"))  # fmt: skip
            for rank, o in enumerate(options):
                how, row = how_it_ran(by_plan.get(_key(o.plan), []), vram, ram)
                ratio = (
                    row["seconds"] / fastest["seconds"]
                    if fastest and how in ("under caps", "uncapped, within")
                    else None
                )
                verdict = ""
                if rank == 0:
                    total += 1
                    ok = o.fits and how in ("under caps", "uncapped, within") and ratio is not None and ratio <= 1.15
                    met += ok
                    verdict = "MET" if ok else "not met"
                if how == "not run":
                    missing.setdefault(_key(o.plan), o.plan)
                measured = (f"{row['seconds']:6.2f} s {row['peak_vram_bytes'] / GiB:5.2f} GiB" if row and row.get("ok")
                            else f"{row['outcome']:16s}" if row else " " * 16)  # fmt: skip
                print(f"    {'pick' if rank == 0 else f'#{rank + 1}  '} {o.id[:78]:78s} pred {o.predicted.seconds:6.2f} s"
                      f" {o.predicted.vram_bytes / GiB:5.2f} GiB"
                      f" {o.predicted.ram_bytes / GiB:5.1f} GiB RAM | {how:16s} {measured}"
                      f" {f'{ratio:.2f}x' if ratio else '':>6s} {verdict}")  # fmt: skip
            if not rec.options[0].fits and fitting_runs:
                print(f"    recommend says nothing fits, but {len(fitting_runs)} runs did")
    print(f"\npicks that ran within the cell's caps and are within 15% of the fastest run there: {met}/{total}")
    if missing:
        print("\nnot run yet:")
        for plan in missing.values():
            print(json.dumps(plan))


if __name__ == "__main__":
    main()
