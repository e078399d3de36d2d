"""What run_trial's instrumentation costs: the same script run plain and under run_trial, alternately.

    python bench/trial_overhead.py --repeat 3 --out bench/results/trial-overhead.jsonl -- \
        bench/random_pipeline.py sdxl-base --height 1024 --width 1024 --steps 30 --calls 2

Two figures per mode, medians over the repeats: the child's wall time (plain: timed by this
process around ``subprocess.run``; trial: run_trial's ``seconds``), and the last pipeline call's
own synchronized wall time as the script prints it (``call N: S s``): the part the per-step
synchronize and event writes can slow. Also the cost of one step's instrumentation alone (the
callback the runner adds, timed in a loop; with CUDA started when there is a GPU, so its
synchronize is included), and the CPU time this process spends sampling. Target: under 2% of run time.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance  # noqa: E402

from pipefit.tools import trial_runner  # noqa: E402
from pipefit.tools.trial import run_trial  # noqa: E402

_CALL = re.compile(r"call (\d+): ([\d.]+) s")


def _last_call_seconds(output: str) -> float:
    calls = _CALL.findall(output)
    if not calls:
        raise SystemExit(f"the script printed no `call N: S s` line:\n{output[-2000:]}")
    return float(calls[-1][1])


def per_step_microseconds(events_path: Path, n: int = 20000) -> float:
    """The runner's step callback alone: a synchronize (with CUDA), the allocator peaks, one event line."""
    import torch

    if torch.cuda.is_available():
        torch.empty(1, device="cuda")
    kwargs: dict = {}
    trial_runner.PipelineTracer(trial_runner.Events(str(events_path)))._add_step_callback(kwargs)
    callback = kwargs["callback_on_step_end"]
    started = time.perf_counter()
    for step in range(n):
        callback(None, step, 0, {})
    return (time.perf_counter() - started) / n * 1e6


def plain(command: list[str]) -> tuple[float, float]:
    started = time.monotonic()
    run = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    wall = time.monotonic() - started
    if run.returncode:
        raise SystemExit(f"plain run failed:\n{run.stderr[-3000:]}")
    return wall, _last_call_seconds(run.stdout)


def trial(command: list[str]) -> tuple[float, float, dict]:
    cpu = time.process_time()
    result = run_trial(command[0], args=command[1:])
    cpu = time.process_time() - cpu
    if result.outcome != "ok":
        raise SystemExit(f"trial run failed ({result.outcome}): {result.error}\n{result.output_tail}")
    log = Path(result.log_path).read_text()
    figures = {k: getattr(result, k) for k in ("peak_vram_bytes", "peak_torch_reserved_bytes", "peak_rss_bytes")}
    figures["sampling_cpu_percent_of_one_core"] = round(100 * cpu / result.seconds, 2)
    return result.seconds, _last_call_seconds(log), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    runs = {"plain": [], "trial": []}
    figures = {}
    for repeat in range(args.repeat):
        for mode in ("plain", "trial") if repeat % 2 == 0 else ("trial", "plain"):  # neither always goes first
            if mode == "plain":
                runs["plain"].append(plain(command))
            else:
                wall, call, figures = trial(command)
                runs["trial"].append((wall, call))
        print(f"repeat {repeat}: plain {runs['plain'][-1]}, trial {runs['trial'][-1]}", flush=True)
    median = {mode: [statistics.median(r[i] for r in rows) for i in (0, 1)] for mode, rows in runs.items()}
    overhead = {
        "wall_percent": round(100 * (median["trial"][0] / median["plain"][0] - 1), 2),
        "call_percent": round(100 * (median["trial"][1] / median["plain"][1] - 1), 2),
    }
    with tempfile.TemporaryDirectory() as scratch:
        per_step = per_step_microseconds(Path(scratch) / "events.jsonl")
    row = {
        "kind": "trial_overhead", "script": command, "repeat": args.repeat,
        "median_wall_seconds": {m: round(v[0], 3) for m, v in median.items()},
        "median_last_call_seconds": {m: round(v[1], 4) for m, v in median.items()},
        "overhead": overhead, "per_step_instrumentation_us": round(per_step, 1), "target_percent": 2.0, "trial_figures": figures,
        "runs": runs, **provenance(),
    }  # fmt: skip
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
