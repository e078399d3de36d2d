"""Replay dry runs' allocations on the GPU's real allocator and compare with pipefit's model of it.

    python bench/allocator_replay.py export DIR            # here: the traces' allocations, as JSON files
    python bench/allocator_replay.py replay DIR [--out F]  # on the GPU: each file under both allocators

``export`` writes, for a few built-ins, the dry run's allocation events (``Trace.allocations``, the
convolutions' workspaces, each call's span). ``replay`` runs every file in a fresh child process per
allocator (``PYTORCH_CUDA_ALLOC_CONF`` is read once, when CUDA starts): it allocates and frees ``uint8``
tensors of those sizes in that order, with each workspace allocated and freed at its convolution, and
reads ``torch.cuda.memory_reserved()`` at the end of every call. The same events go through
``tools.strategies.allocator.pool_reserved``; a JSON line per file and allocator says both, so the
allocator model is checked apart from the dry run that feeds it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILTINS = {  # build: (dtype, height, width, frames)
    "sdxl-base": ("float16", 1024, 1024, None),
    "flux1-dev": ("bfloat16", 1024, 1024, None),
    "wan2.1-t2v-1.3b": ("bfloat16", 480, 832, 33),
    "chroma": ("bfloat16", 1024, 1024, None),
}
GiB = 2**30


def export(folder: Path) -> None:
    from pipefit.tools.estimate import Workload, trace_for
    from pipefit.tools.measure import measure_components

    folder.mkdir(parents=True, exist_ok=True)
    for build, (dtype, height, width, frames) in BUILTINS.items():
        trace = trace_for(measure_components(f"builtin:{build}", dtype=dtype), Workload(height=height, width=width, frames=frames, steps=4))
        data = trace.model_dump(include={"allocations", "workspaces", "calls", "pipeline_class"})
        data["calls"] = [{"component": c["component"], "events": c["events"]} for c in data["calls"]]
        (folder / f"{build}.json").write_text(json.dumps({"build": build, **data}))
        print(build, len(trace.allocations), "events")


def _replay_here(path: Path) -> dict:
    """In a child process whose allocator is already set: the file's events on the real allocator."""
    import torch

    data = json.loads(path.read_text())
    per_byte = _workspace_per_byte()
    events, workspaces = data["allocations"], iter(data["workspaces"])
    at, kind, size = next(workspaces, (len(events) + 1, "", 0))
    blocks: list = []
    position, out = 0, []
    torch.cuda.init()
    for call in data["calls"]:
        if call["events"] is None:
            out.append(torch.cuda.memory_reserved())
            continue
        for here in range(position, call["events"][1]):
            while at == here:
                n = int(per_byte.get(kind, per_byte.get(kind.split("_")[0], 0.0)) * size)
                if n:  # allocated and freed at once, as cuDNN's workspace is
                    torch.empty(n, dtype=torch.uint8, device="cuda")
                at, kind, size = next(workspaces, (len(events) + 1, "", 0))
            event = events[here]
            if event > 0:
                blocks.append(torch.empty(event, dtype=torch.uint8, device="cuda"))
            else:
                blocks[-event - 1] = None
        position = call["events"][1]
        out.append(torch.cuda.memory_reserved())
    return {"reserved": out, "peak_reserved": torch.cuda.max_memory_reserved(), "peak_allocated": torch.cuda.max_memory_allocated()}


def _workspace_per_byte() -> dict:
    from pipefit.tools.gpus import gpu_profile

    return gpu_profile("NVIDIA H200").conv_workspace_per_byte


def replay(folder: Path, out: Path | None) -> None:
    from types import SimpleNamespace

    from pipefit.tools.strategies.allocator import pool_reserved

    lines = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        trace = SimpleNamespace(allocations=data["allocations"], workspaces=[tuple(w) for w in data["workspaces"]],
                                calls=[SimpleNamespace(**c) for c in data["calls"]])  # fmt: skip
        for allocator, setting in (("expandable_segments", "expandable_segments:True"), ("default", "expandable_segments:False")):
            env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": setting}
            child = subprocess.run([sys.executable, __file__, "child", str(path)], env=env, capture_output=True, text=True, check=False)
            if child.returncode:
                print(child.stderr[-2000:])
                continue
            real = json.loads(child.stdout.strip().splitlines()[-1])
            model = pool_reserved(trace, SimpleNamespace(allocator=allocator), _workspace_per_byte(), frozenset())
            import torch

            line = {"kind": "allocator_replay", "build": data["build"], "allocator": allocator,
                    "real_peak_reserved": real["peak_reserved"], "model_peak_reserved": max(model),
                    "real_peak_allocated": real["peak_allocated"],
                    "worst_call_error": max(abs(m - r) for m, r in zip(model, real["reserved"])) / max(max(real["reserved"]), 1),
                    "gpu": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__},
                    "command": f"python bench/allocator_replay.py replay {folder}"}  # fmt: skip
            print(f"{data['build']:16s} {allocator:20s} real {real['peak_reserved'] / GiB:7.3f} GiB  model "
                  f"{max(model) / GiB:7.3f} GiB  ({(max(model) - real['peak_reserved']) / real['peak_reserved']:+.2%}); "
                  f"worst call {line['worst_call_error']:.2%}")  # fmt: skip
            lines.append(line)
    if out:
        with out.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("export", "replay", "child"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.action == "export":
        export(args.path)
    elif args.action == "replay":
        replay(args.path, args.out)
    else:
        print(json.dumps(_replay_here(args.path)))


if __name__ == "__main__":
    main()
