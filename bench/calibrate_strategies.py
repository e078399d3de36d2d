"""Run each strategy on a full-size pipeline the way a user would, and record what really happened.

    python bench/calibrate_strategies.py --weights /tmp/w/sdxl --build sdxl-base \
        --workload 1024x1024 --workload 768x768 --steps 10 --out $OUT/strategies.jsonl [--only none model]

For every plan of the pipeline's family in bench/calibration_plans.json and every workload
(HEIGHTxWIDTH, or HEIGHTxWIDTHxFRAMES for video), a plain user-style script (``from_pretrained`` of
the weights, ``.to(device)``, two calls) is patched with the plan by patch_script and run by
run_trial: driver-level peak VRAM, PyTorch's peaks, RSS while loading and while running, the last
call's step times and the time around its steps. One JSON line per run, with the GPU, the versions
and the command: the data recommend's memory and speed models are fitted on (issue 3).

``--build MODEL`` first writes random full-size weights (bench/random_pipeline.py, a built-in
config) into ``--weights`` if that folder has no model_index.json, so the real loading and
quantization paths run. Any saved diffusers pipeline works as ``--weights`` (the CPU test uses a
tiny one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import provenance  # noqa: E402

from tools.trial import run_trial  # noqa: E402

PLANS = Path(__file__).with_name("calibration_plans.json")
FAMILIES = {"Flux": "flux", "StableDiffusionXL": "sdxl", "Wan": "wan"}  # class-name prefix -> family

SCRIPT = """\
import argparse

import torch
from diffusers import {cls}

parser = argparse.ArgumentParser()
parser.add_argument("--height", type=int, required=True)
parser.add_argument("--width", type=int, required=True)
parser.add_argument("--frames", type=int)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--calls", type=int, default=2)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = {cls}.from_pretrained({weights!r}, torch_dtype=torch.{dtype})
pipe.to(device)

video = {{"num_frames": args.frames}} if args.frames else {{}}
for _ in range(args.calls):
    pipe(
        prompt="a photo of a cat in the snow",
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
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
    """The pipeline class saved in ``weights``, building random full-size weights there first if asked."""
    if not (weights / "model_index.json").is_file():
        if build is None:
            raise SystemExit(f"{weights} holds no pipeline; pass --build MODEL to write random weights there")
        import random_pipeline  # bench/, this script's folder

        print(f"building {build} with random weights into {weights}", flush=True)
        random_pipeline.build(build, dtype, "cuda").save_pretrained(weights)
    return json.loads((weights / "model_index.json").read_text())["_class_name"]


def parse_workload(text: str) -> dict:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (2, 3):
        raise SystemExit(f"a workload is HEIGHTxWIDTH or HEIGHTxWIDTHxFRAMES, not {text!r}")
    return dict(zip(("height", "width", "frames"), parts))


def row_for(result, name: str, plan: dict, workload: dict, steps: int) -> dict:
    last = next((call for call in reversed(result.calls) if call.ok), None)
    fields = (
        "outcome", "error", "seconds", "peak_vram_bytes", "peak_torch_allocated_bytes", "peak_torch_reserved_bytes",
        "peak_rss_bytes", "peak_rss_load_bytes", "peak_rss_run_bytes", "seconds_before_first_call", "vram_source",
        "stage",
    )  # fmt: skip
    return {
        "kind": "strategy_trial", "plan_name": name, "plan": plan, "workload": {**workload, "steps": steps},
        **{f: getattr(result, f) for f in fields},
        "step_seconds": last.step_seconds if last else [],
        "before_first_step_seconds": last.before_first_step_seconds if last else None,
        "after_last_step_seconds": last.after_last_step_seconds if last else None,
        "log_path": result.log_path,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="a saved diffusers pipeline (or where to build)")
    parser.add_argument("--build", help="a built-in config to write random weights from, if --weights is empty")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--workload", action="append", required=True, help="HEIGHTxWIDTH[xFRAMES], repeatable")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calls", type=int, default=2, help="the last call is reported; the first warms up")
    parser.add_argument("--only", nargs="*", help="plan names to run (default: all of the family)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    class_name = ensure_weights(args.weights, args.build, args.dtype)
    family = family_of(class_name)
    plans = json.loads(PLANS.read_text())[family]
    names = args.only or list(plans)
    unknown = sorted(set(names) - set(plans))
    if unknown:
        raise SystemExit(f"unknown plans for {family}: {unknown}; known: {sorted(plans)}")
    context = {
        "model": class_name, "family": family, "weights": str(args.weights), "dtype": args.dtype, **provenance(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / f"{family}_user_script.py"
        script.write_text(SCRIPT.format(cls=class_name, weights=str(args.weights.resolve()), dtype=args.dtype))
        for text in args.workload:
            workload = parse_workload(text)
            options = {**workload, "steps": args.steps, "calls": args.calls}
            script_args = [f"--{key}={value}" for key, value in options.items()]
            for name in names:
                result = run_trial(script, plans[name], args=script_args, cwd=scratch, timeout=args.timeout)
                row = {**row_for(result, name, plans[name], workload, args.steps), **context}
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                vram = result.peak_vram_bytes
                print(
                    f"{text} {name}: {result.outcome} in {result.seconds:.1f} s, peak VRAM "
                    f"{'-' if vram is None else f'{vram / 2**30:.2f} GiB'}, RSS {result.peak_rss_bytes / 2**30:.2f} GiB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
