"""Fit a GPU's constants from the runs on it, then print how the derived predictions compare.

    python bench/fit_gpu.py [--runs bench/results/strategies-h200.jsonl] [--write]

The constants are the hardware's, never a family's (shared/design.md): the CUDA context (the
driver's peak minus PyTorch's reserved), the allocator's fragmentation (reserved minus allocated at the
peak, per byte of the peak call's working memory, for each allocator), and the
matmul and attention rates (least squares on the plain plans' step times against the FLOPs the dry
run counted). Everything else in each prediction comes from the pipeline's dry run and measured
sizes. ``--write`` stores the profile in tools/gpus.json. The table: every run, predicted and
measured peak VRAM and seconds per step, and the errors the targets are about.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.estimate import Workload, denoiser_of, estimate, trace_for  # noqa: E402
from tools.gpus import PROFILES, gpu_profile  # noqa: E402
from tools.measure import measure_components  # noqa: E402
from tools.plan import parse_plan  # noqa: E402

GiB = 2**30


def rows(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("ok") and row.get("peak_vram_bytes") and row.get("build"):
                out.append(row)
    return out


def workload_of(row: dict) -> Workload:
    w = row["workload"]
    return Workload(height=w["height"], width=w["width"], frames=w.get("frames"), steps=w["steps"])


def plan_of(row: dict):
    allocator = "expandable_segments" if "expandable" in (row.get("allocator") or "") else "default"
    return parse_plan({**row["plan"], "allocator": allocator})


def fit(runs: list[dict]) -> dict:
    """The GPU's constants from its runs."""
    import numpy as np

    context = max(r["peak_vram_bytes"] - r["peak_torch_reserved_bytes"] for r in runs)
    fragmentation: dict[str, float] = {}
    for r in runs:
        m = measure_components(f"builtin:{r['build']}", dtype=r["dtype"])
        e = estimate(plan_of(r), m, workload_of(r))
        peak = next(s for s in e.stages if s.stage == e.peak_stage and s.resident_bytes + s.working_bytes ==
                    max(x.resident_bytes + x.working_bytes for x in e.stages))  # fmt: skip
        kept = (r["peak_torch_reserved_bytes"] - r["peak_torch_allocated_bytes"]) / max(peak.working_bytes, 1)
        # a ratio to a few MiB of working memory says nothing; groups keep buffers of their own
        if peak.working_bytes >= GiB and not r["plan"].get("offload", "").startswith("group"):
            fragmentation[e.allocator] = max(fragmentation.get(e.allocator, 0.0), kept)
    # rates: plain plans (everything on the GPU), the mean of the steady steps against the dry run's FLOPs
    a, b = [], []
    for r in runs:
        if r["plan"] or len(r["step_seconds"]) < 2:
            continue
        m = measure_components(f"builtin:{r['build']}", dtype=r["dtype"])
        trace = trace_for(m, workload_of(r))
        calls = [c for c in trace.calls if c.step is not None]
        per_step = len(calls) / trace.steps_run
        mm = sum(c.flops for c in calls) / trace.steps_run
        attn = sum(c.attention_flops for c in calls) / trace.steps_run
        a.append([mm, attn, per_step])
        b.append(sum(r["step_seconds"][1:]) / len(r["step_seconds"][1:]))
    coef, *_ = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)
    mm_s, attn_s, overhead = (max(float(c), 1e-18) for c in coef)
    return {
        "context_bytes": float(context), "fragmentation": fragmentation,
        "matmul_flops_per_s": 1 / mm_s, "attention_flops_per_s": 1 / attn_s, "call_overhead_seconds": min(overhead, 0.05),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="*", default=[ROOT / "bench" / "results" / "strategies-h200.jsonl"])
    parser.add_argument("--write", action="store_true", help="store the fitted profile in tools/gpus.json")
    parser.add_argument("--held-out", type=Path, nargs="*", default=[], help="runs to predict, not to fit on")
    args = parser.parse_args()
    runs = rows(args.runs)
    gpu = runs[0]["gpu"] if runs and "gpu" in runs[0] else "NVIDIA H200"
    fitted = fit(runs)
    print("fitted:", {k: (f"{v / GiB:.3f} GiB" if k.endswith("bytes") else v if isinstance(v, dict) else f"{v:.4g}")
                     for k, v in fitted.items()})  # fmt: skip
    profile = gpu_profile(gpu).model_copy(update=fitted)
    if args.write:
        data = json.loads(PROFILES.read_text())
        data["profiles"][profile.name] = profile.model_dump()
        data["about"] = f"python bench/fit_gpu.py --write over {', '.join(str(p.relative_to(ROOT)) for p in args.runs)}"
        PROFILES.write_text(json.dumps(data, indent=1) + "\n")
    held_out = rows(args.held_out)
    if held_out:
        print(f"held out (not fitted on): {sorted({r['build'] for r in held_out})}")
    runs = runs + held_out
    errors, step_errors = [], []
    print(f"{'pipeline':18s} {'plan':28s} {'alloc':5s} {'workload':12s} {'pred GiB':>8s} {'meas GiB':>8s} {'err':>6s}"
          f" {'stage':12s} {'pred s/step':>11s} {'meas':>6s}")  # fmt: skip
    for r in runs:
        m = measure_components(f"builtin:{r['build']}", dtype=r["dtype"])
        w = workload_of(r)
        e = estimate(plan_of(r), m, w, gpu=profile)
        err = (e.vram_bytes - r["peak_vram_bytes"]) / r["peak_vram_bytes"]
        errors.append(err)
        steady = r["step_seconds"][1:] or r["step_seconds"]
        measured_step = sum(steady) / len(steady)
        denoiser = denoiser_of(m)
        trace = trace_for(m, w)
        predicted_step = sum(
            c.flops / profile.matmul_flops_per_s + c.attention_flops / profile.attention_flops_per_s + profile.call_overhead_seconds
            for c in trace.calls if c.step is not None and c.component == denoiser
        ) / trace.steps_run  # fmt: skip
        if not r["plan"].get("offload") and not r["plan"].get("quantize") and not r["plan"].get("layerwise_casting"):
            step_errors.append((predicted_step - measured_step) / measured_step)
        label = "x".join(str(v) for k, v in r["workload"].items() if k != "steps" and v)
        print(f"{r['build']:18s} {r['plan_name']:28s} {'exp' if 'expandable' in (r.get('allocator') or '') else 'def':5s} "
              f"{label:12s} {e.vram_bytes / GiB:8.2f} {r['peak_vram_bytes'] / GiB:8.2f} {err:+6.1%} {e.peak_stage:12s} "
              f"{predicted_step:11.3f} {measured_step:6.3f}")  # fmt: skip
    if args.write:  # which families and plans ran here (basis "measured"), and the margin kept free
        from tools.estimate import CALIBRATION, signature

        calibration = json.loads(CALIBRATION.read_text())
        measured: dict[str, set[str]] = {}
        for r in runs:
            measured.setdefault(r["model"], set()).add(signature(plan_of(r)))
        calibration["measured"] = {k: sorted(v) for k, v in sorted(measured.items())}
        # kept free: measured = predicted x (1 + margin) at the worst under-prediction seen
        calibration["margin_fraction"] = round(max(0.05, 1 / (1 + min(errors)) - 1) + 0.0005, 4)
        CALIBRATION.write_text(json.dumps(calibration, indent=1) + "\n")
    within = sum(abs(x) <= 0.10 for x in errors)
    print(f"\npeak VRAM: {within}/{len(errors)} within 10%; worst under {min(errors):+.1%}, worst over {max(errors):+.1%}")
    if step_errors:
        print(f"s/step (plain plans): mean |err| {sum(map(abs, step_errors)) / len(step_errors):.1%}, "
              f"worst {max(step_errors, key=abs):+.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
