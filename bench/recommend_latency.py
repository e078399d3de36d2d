"""How long recommend takes, from the cache and cold, on this machine (issue 16's targets: under 0.2 s
from the cache, under 3 s cold for a new family).

    python bench/recommend_latency.py --out bench/results/recommend-latency-cpu.jsonl

Cached: in one process, each model's dry run and measurement already on disk, one recommend per
budget (8/16, 12/32, 16/64 GiB), each timed ``--repeat`` times after a first call that loads the
cache; the median per model and budget. Cold: a new process with an empty cache directory, for each
of ``--cold`` models: the MCP server's import stages (it runs them while it waits for its first
request), then recommend, each timed (rows without ``import_seconds`` timed the two together). One
JSON line per model and kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import provenance  # noqa: E402

BUDGETS = [("8GiB", "16GiB"), ("12GiB", "32GiB"), ("16GiB", "64GiB")]
MODELS = ["flux1-dev", "sdxl-base", "wan2.1-t2v-1.3b", "sd3.5-medium", "z-image-turbo", "qwen-image", "ltx-video"]
# a new process: the MCP server's import stages first (it runs them while it waits for a request), then recommend
_COLD = "import time; t = time.perf_counter(); from pipefit.mcp_server import imports; " \
        "imports.enable(); imports.start(); imports.wait('models'); i = time.perf_counter(); " \
        "from pipefit.tools.recommend import recommend; recommend({model!r}, vram='12GiB', ram='32GiB'); " \
        "print(i - t, time.perf_counter() - i)"


def cached(models: list[str], repeat: int) -> list[dict]:
    """Median seconds of a cached recommend per model and budget, in this process."""
    from pipefit.tools.recommend import recommend

    rows = []
    for model in models:
        recommend(f"builtin:{model}", vram="12GiB", ram="32GiB")  # measures and traces once, or reads the cache
        seconds = {}
        for vram, ram in BUDGETS:
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                recommend(f"builtin:{model}", vram=vram, ram=ram)
                times.append(time.perf_counter() - started)
            seconds[f"{vram}/{ram}"] = round(statistics.median(times), 3)
        rows.append({"model": model, "kind": "cached", "median_seconds": seconds})
        print(f"cached {model:18s} " + "  ".join(f"{b} {s:.3f} s" for b, s in seconds.items()), flush=True)
    return rows


def cold(models: list[str]) -> list[dict]:
    """Seconds from a new process's start to its first answer, with an empty cache."""
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIPEFIT_CACHE_DIR": cache}
            started = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", _COLD.format(model=f"builtin:{model}")], env=env, cwd=ROOT,
                                 capture_output=True, text=True, check=True)  # fmt: skip
            total = time.perf_counter() - started
        imports, inside = map(float, run.stdout.strip().splitlines()[-1].split())
        rows.append({"model": model, "kind": "cold", "process_seconds": round(total, 2), "import_seconds": round(imports, 2),
                     "recommend_seconds": round(inside, 2)})  # fmt: skip
        print(f"cold   {model:18s} process {total:.1f} s: imports {imports:.1f} s, then recommend {inside:.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--cold", nargs="*", default=["z-image-turbo", "flux1-dev"], help="models to time cold")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = cached(args.models, args.repeat) + cold(args.cold)
    if args.out:
        where = {**provenance(), "cpus": os.cpu_count()}
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps({**where, **row}) + "\n")


if __name__ == "__main__":
    main()
