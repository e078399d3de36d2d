"""Run each strategy on a full-size pipeline the way a user would, and record what really happened.

    python bench/calibrate_strategies.py --weights /tmp/w/sdxl --build sdxl-base \
        --workload 768x768 --workload 1024x1024 --steps 4 --out $OUT/strategies.jsonl [--only none model]

For every plan of the pipeline's family in bench/calibration_plans.json, a plain user-style script
(``from_pretrained`` of the weights, ``.to(device)``, then calls) is patched with the plan by
patch_script and run by run_trial. One process serves every workload (HEIGHTxWIDTH, or
HEIGHTxWIDTHxFRAMES for video), smallest first: a warm-up call at the first, then one call per
workload, with the allocator's cache emptied between calls so each call's driver-level peak is its
own (run_trial reports peaks per call). One JSON line per plan and workload: that call's peak VRAM
(driver and PyTorch), RSS while loading and during the call, step times and the time around the
steps, with the GPU, the versions and the command: the data recommend's memory and speed models are
fitted on (bench/fit_models.py).

``--build MODEL`` first writes random full-size weights (bench/random_pipeline.py, a built-in
config) into ``--weights`` if that folder has no model_index.json, so the real loading and
quantization paths run. Any saved diffusers pipeline works as ``--weights`` (the CPU test uses a
tiny one). ``--deadline`` keeps a batch inside a time limit: a plan is not started when less than
its expected time is left.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import provenance  # noqa: E402

from pipefit.tools.trial import run_trial  # noqa: E402

PLANS = Path(__file__).with_name("calibration_plans.json")
# class-name prefix -> plan set: sdxl (a UNet, two CLIPs), flux (transformer + CLIP + T5 as text_encoder_2),
# wan (transformer + one large text_encoder: Wan, Chroma, LTX, CogVideoX share its component names)
FAMILIES = {"Flux": "flux", "StableDiffusionXL": "sdxl", "Wan": "wan", "Chroma": "wan", "LTX": "wan", "CogVideoX": "wan"}

SCRIPT = """\
import argparse
import json

import torch
from diffusers import {cls}

parser = argparse.ArgumentParser()
parser.add_argument("--workloads", type=json.loads, required=True, help="[{{height, width, frames}}, ...]")
parser.add_argument("--steps", type=int, required=True)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = {cls}.from_pretrained({weights!r}, torch_dtype=torch.{dtype})
pipe.to(device)

# a warm-up call (at most 4 steps: enough to load kernels and compile), then one call per workload
for index, workload in enumerate(args.workloads[:1] + args.workloads):
    if device == "cuda":
        torch.cuda.empty_cache()  # each call's driver-level peak is its own, not the cache of the last
    video = {{"num_frames": workload["frames"]}} if workload.get("frames") else {{}}
    pipe(
        prompt="a photo of a cat in the snow",
        height=workload["height"],
        width=workload["width"],
        num_inference_steps=args.steps if index else min(args.steps, 4),
        output_type="np",
        **video,
    )
"""


def family_of(class_name: str) -> str:
    for prefix, family in FAMILIES.items():
        if class_name.startswith(prefix):
            return family
    raise SystemExit(f"no calibration plans for {class_name}; families: {sorted(FAMILIES.values())}")


def ensure_weights(weights: Path, build: str | None, dtype: str) -> str:
    """The pipeline class saved in ``weights``, building random full-size weights there first if asked
    (in a child process, so that this one holds no GPU memory while the trials run)."""
    if not (weights / "model_index.json").is_file():
        if build is None:
            raise SystemExit(f"{weights} holds no pipeline; pass --build MODEL to write random weights there")
        print(f"building {build} with random weights into {weights}", flush=True)
        builder = Path(__file__).with_name("random_pipeline.py")
        subprocess.run([sys.executable, str(builder), build, "--dtype", dtype, "--save", str(weights)], check=True)
    return json.loads((weights / "model_index.json").read_text())["_class_name"]


def parse_workload(text: str) -> dict:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (2, 3):
        raise SystemExit(f"a workload is HEIGHTxWIDTH or HEIGHTxWIDTHxFRAMES, not {text!r}")
    return dict(zip(("height", "width", "frames"), parts))


def rows_for(result, name: str, plan: dict, workloads: list[dict], steps: int) -> list[dict]:
    """One row per workload, from that workload's call (the first call is the warm-up)."""
    shared = {
        "kind": "strategy_trial", "plan_name": name, "plan": plan, "outcome": result.outcome, "error": result.error,
        "stage": result.stage, "process_seconds": result.seconds, "process_peak_vram_bytes": result.peak_vram_bytes,
        "process_peak_rss_bytes": result.peak_rss_bytes, "peak_rss_load_bytes": result.peak_rss_load_bytes, "peak_vram_load_bytes": result.peak_vram_load_bytes,
        "process_peak_held_bytes": result.peak_held_bytes, "peak_held_load_bytes": result.peak_held_load_bytes,
        "peak_held_run_bytes": result.peak_held_run_bytes,
        "seconds_before_first_call": result.seconds_before_first_call, "vram_source": result.vram_source,
        "vram_cap_bytes": result.vram_cap_bytes, "ram_cap_bytes": result.ram_cap_bytes,
        "log_path": result.log_path, "output_tail": None if result.outcome == "ok" else result.output_tail[-3000:],
        "allocator_ran": result.allocator,  # what the patched script ran with (its setdefault, or ours)
    }  # fmt: skip
    warmup = result.calls[0] if result.calls else None
    rows = []
    for index, workload in enumerate(workloads, start=1):
        call = result.calls[index] if index < len(result.calls) else None
        measured = call is not None and call.ok
        row = {**shared, "workload": {**workload, "steps": steps}, "ok": measured}
        row.update({
            "seconds": call.seconds if measured else None,
            "peak_vram_bytes": call.peak_vram_bytes if measured else None,
            "peak_torch_allocated_bytes": call.peak_torch_allocated_bytes if measured else None,
            "peak_torch_reserved_bytes": call.peak_torch_reserved_bytes if measured else None,
            "peak_rss_run_bytes": call.peak_rss_bytes if measured else None,
            "step_seconds": call.step_seconds if measured else [],
            "before_first_step_seconds": call.before_first_step_seconds if measured else None,
            "after_last_step_seconds": call.after_last_step_seconds if measured else None,
        })  # fmt: skip
        if index == 1 and warmup is not None:  # a user's first call is cold: keep what it cost
            row["warmup_peak_vram_bytes"] = warmup.peak_vram_bytes
            row["warmup_seconds"] = warmup.seconds
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="a saved diffusers pipeline (or where to build)")
    parser.add_argument("--build", help="a built-in config to write random weights from, if --weights is empty")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--workload", action="append", required=True, help="HEIGHTxWIDTH[xFRAMES], repeatable")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="plan names to run, in this order (default: all of the family)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one plan may take")
    parser.add_argument("--deadline", type=float, help="seconds the whole batch may take")
    parser.add_argument("--vram-cap", help="simulate a smaller card (run_trial's vram_cap), e.g. 16GiB")
    parser.add_argument("--ram-cap", help="stop a plan whose held RAM passes this (run_trial's ram_cap), e.g. 64GiB")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.monotonic()  # the deadline counts the build too

    class_name = ensure_weights(args.weights, args.build, args.dtype)
    family = family_of(class_name)
    plans = json.loads(PLANS.read_text())[family]
    names = args.only or list(plans)
    unknown = sorted(set(names) - set(plans))
    if unknown:
        raise SystemExit(f"unknown plans for {family}: {unknown}; known: {sorted(plans)}")
    context = {
        "model": class_name, "family": family, "weights": str(args.weights), "dtype": args.dtype,
        "build": args.build, "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default", **provenance(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    workloads = sorted(
        (parse_workload(text) for text in args.workload), key=lambda w: w["height"] * w["width"] * w.get("frames", 1)
    )
    script_args = ["--workloads", json.dumps(workloads), f"--steps={args.steps}"]
    longest = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / f"{family}_user_script.py"
        script.write_text(SCRIPT.format(cls=class_name, weights=str(args.weights.resolve()), dtype=args.dtype))
        for name in names:
            timeout = args.timeout
            if args.deadline is not None:
                left = args.deadline - (time.monotonic() - started)
                if left < min(longest, 60.0):
                    print(f"{name}: skipped, {left:.0f} s left of the deadline", flush=True)
                    continue
                timeout = min(timeout, left)
            result = run_trial(
                script, plans[name], args=script_args, cwd=scratch, timeout=timeout,
                vram_cap=args.vram_cap, ram_cap=args.ram_cap,
            )  # fmt: skip
            longest = max(longest, result.seconds)
            rows = rows_for(result, name, plans[name], workloads, args.steps)
            with args.out.open("a") as f:
                f.writelines(json.dumps({**row, **context}) + "\n" for row in rows)
            figures = ", ".join(
                f"{label(r['workload'])} {r['peak_vram_bytes'] / 2**30:.2f} GiB {sum(r['step_seconds']) / len(r['step_seconds']):.3f} s/step"
                for r in rows if r["ok"] and r["peak_vram_bytes"] and r["step_seconds"]
            )  # fmt: skip
            print(f"{name}: {result.outcome} in {result.seconds:.1f} s; {figures or result.error}", flush=True)


def label(workload: dict) -> str:
    return "x".join(str(workload[k]) for k in ("height", "width", "frames") if workload.get(k))


if __name__ == "__main__":
    main()
