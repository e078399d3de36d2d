"""How fast the MCP server answers, as an agent sees it: over stdio, from a fresh child process.

    python bench/mcp_latency.py --repeat 3 --out bench/results/mcp-latency-cpu.jsonl
    python bench/mcp_latency.py --repeat 3 --pause 5 --out bench/results/mcp-latency-cpu.jsonl

Per run: seconds from spawning ``python -m pipefit.mcp_server`` to the tool list (start-up), then three
recommend calls for builtin:flux1-dev at 1024 px on a 16 GiB / 64 GiB budget (the first measures the
pipeline and imports what it needs, the others answer from the server's warm state), and the
triage_oom call on a traceback. Prints the medians. With ``--pause S``, the first recommend comes S
seconds after the tool list, as an agent's turn between calls would (the server imports torch and
diffusers in the background meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import provenance  # noqa: E402

TRACEBACK = (ROOT / "tests/fixtures/tracebacks/flux_denoise_torch2_5.txt").read_text()
ADVICE = {"model": "builtin:flux1-dev", "vram": "16GiB", "ram": "64GiB"}


async def one_run(cache: str, pause: float) -> dict:
    env = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "pipefit.mcp_server"], cwd=str(ROOT),
        env={**env, "HF_HUB_OFFLINE": "1", "PIPEFIT_CACHE_DIR": cache},
    )  # fmt: skip
    started = time.perf_counter()
    async with Client(params) as client:
        await client.list_tools()
        row = {"startup_s": time.perf_counter() - started, "pause_s": pause, "recommend_s": []}
        await anyio.sleep(pause)
        for _ in range(3):
            t = time.perf_counter()
            result = await client.call_tool("recommend", ADVICE)
            row["recommend_s"].append(time.perf_counter() - t)
            assert not result.is_error, result.content
        t = time.perf_counter()
        await client.call_tool("triage_oom", {"text": TRACEBACK})
        row["triage_s"] = time.perf_counter() - t
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between the tool list and the first recommend")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:  # a cold measurement cache each run
            rows.append(anyio.run(one_run, cache, args.pause))
    median = {
        "startup_s": statistics.median(r["startup_s"] for r in rows),
        "first_recommend_s": statistics.median(r["recommend_s"][0] for r in rows),
        "warm_recommend_s": statistics.median(s for r in rows for s in r["recommend_s"][1:]),
        "triage_s": statistics.median(r["triage_s"] for r in rows),
    }
    print(", ".join(f"{k} {v:.3f}" for k, v in median.items()) + f" (medians of {args.repeat} runs)")
    if args.out:
        command = " ".join(["python", "bench/mcp_latency.py", *sys.argv[1:]])
        with args.out.open("a") as f:
            f.write(
                json.dumps({"kind": "mcp_latency", "runs": rows, "median": median, **provenance(), "command": command})
                + "\n"
            )


if __name__ == "__main__":
    main()
