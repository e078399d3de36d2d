"""How long `pipefit measure` takes on the built-in configs-only full-size pipelines.

Target (issue 2): a full-size Flux.1-dev folder of configs alone measured in under 2 s on the 2-core
development machine. Four figures per model, each the median of --repeat runs:

- cold: a fresh `pipefit measure MODEL --no-cache --json` process, what a user waits for the first time;
- imports: a fresh process importing only what measuring needs (torch, diffusers and transformers
  model classes), the part of `cold` pipefit does not control;
- warm: measure_components(MODEL, cache=False) in a process that has already imported them;
- cached: a fresh `pipefit measure MODEL --json` process answered from pipefit's cache.

    python bench/measure_speed.py --out bench/results/measure-speed.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SECONDS = 2.0
MODELS = ("builtin:flux1-dev", "builtin:sdxl-base", "builtin:wan2.1-t2v-1.3b")


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _import_statement(model: str) -> str:
    from pipefit.tools.model_source import resolve_pipeline

    lines = ["import torch"]
    for comp in resolve_pipeline(model).components:
        if comp.library in ("diffusers", "transformers"):
            lines.append(f"from {comp.library} import {comp.class_name}")
    return "; ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="append one JSON line per model here")
    args = parser.parse_args()

    import importlib.metadata

    from pipefit.tools.measure import measure_components

    env = dict(os.environ, HF_HUB_OFFLINE="1", PIPEFIT_CACHE_DIR=tempfile.mkdtemp(prefix="pipefit-bench-"))
    pipefit = [sys.executable, "-m", "pipefit", "measure"]
    versions = {p: importlib.metadata.version(p) for p in ("torch", "diffusers", "transformers")}
    print(f"{'model':28} {'cold s':>7} {'imports s':>9} {'warm s':>7} {'cached s':>8}  target < {TARGET_SECONDS} s")
    for model in args.models:
        measure_components(model, cache=False)  # imports everything once, so `warm` times measuring alone
        runs = {"cold": [], "imports": [], "warm": [], "cached": []}
        for _ in range(args.repeat):
            runs["cold"].append(_timed([*pipefit, model, "--no-cache", "--json"], env))
            runs["imports"].append(_timed([sys.executable, "-c", _import_statement(model)], env))
            start = time.perf_counter()
            measure_components(model, cache=False)
            runs["warm"].append(time.perf_counter() - start)
        _timed([*pipefit, model, "--json"], env)  # fills the cache
        runs["cached"] = [_timed([*pipefit, model, "--json"], env) for _ in range(args.repeat)]
        median = {k: round(statistics.median(v), 3) for k, v in runs.items()}
        verdict = "met" if median["cold"] < TARGET_SECONDS else f"missed cold ({median['warm']} s without imports)"
        print(
            f"{model:28} {median['cold']:7.2f} {median['imports']:9.2f} {median['warm']:7.2f} {median['cached']:8.2f}"
            f"  {verdict}"
        )
        if args.out:
            row = {
                "kind": "measure_speed", "model": model, "median_seconds": median, "repeat": args.repeat,
                "target_seconds": TARGET_SECONDS, "cpus": os.cpu_count(), "machine": platform.processor() or
                platform.machine(), "python": platform.python_version(), "versions": versions,
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
            }  # fmt: skip
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
