"""Where the CUDA allocator's reserved memory outgrows allocated memory, layer by layer.

    python bench/alloc_timeline.py --weights /tmp/w/sdxl --placement sequential --height 1024 --width 1024

Loads the saved random-weight pipeline (bench/random_pipeline.py --save), places it (``none``,
``model`` or ``sequential``), calls it twice and, in the second call, records after every leaf
module's forward the allocated and reserved bytes. It prints one JSON line: per component the peak
reserved, allocated at that moment and the peak allocated, the largest growths of reserved (which
layer, how much was free then), and at the peak reserved of the call the free blocks the allocator
held (how many, the largest ones). This is how the fragmentation terms of tools/gpus.py are checked
against the allocator's behaviour instead of fitted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def free_blocks() -> list[int]:
    """Sizes of the free (inactive) blocks inside the allocator's segments right now."""
    import torch

    return sorted((b["size"] for s in torch.cuda.memory_snapshot() for b in s["blocks"] if b["state"] == "inactive"),
                  reverse=True)  # fmt: skip


def pipeline_arguments(doc: str, placement: str = "none", steps: int = 4) -> argparse.ArgumentParser:
    """The arguments both allocator scripts take: a saved pipeline, its placement and one call's workload."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--placement", choices=("none", "model", "sequential"), default=placement)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int, default=steps)
    return parser


def placed_pipeline(args: argparse.Namespace):
    """The saved pipeline, loaded and placed as ``args`` say."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.weights, torch_dtype=getattr(torch, args.dtype))
    if args.placement == "none":
        pipe.to("cuda")
    elif args.placement == "model":
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_sequential_cpu_offload()
    return pipe


def main() -> None:
    args = pipeline_arguments(__doc__).parse_args()

    import torch

    pipe = placed_pipeline(args)

    events: list[tuple[str, str, int, int]] = []
    recording = [False]
    peak = {"reserved": 0, "free": []}

    def hook(component: str, name: str):
        def after(module, inputs, output):
            if not recording[0]:
                return
            allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            events.append((component, name, allocated, reserved))
            if reserved > peak["reserved"]:
                peak.update(reserved=reserved, allocated=allocated, at=f"{component}.{name}", free=free_blocks()[:12])

        return after

    for component, model in pipe.components.items():
        if isinstance(model, torch.nn.Module):
            for name, module in model.named_modules():
                if not list(module.children()):
                    module.register_forward_hook(hook(component, name))

    call = {"prompt": "a photo", "num_inference_steps": args.steps, "height": args.height, "width": args.width}
    if args.frames:
        call["num_frames"] = args.frames
    pipe(**call)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    recording[0] = True
    pipe(**call)
    torch.cuda.synchronize()
    recording[0] = False

    stages: dict[str, dict] = {}
    previous = 0
    for component, name, allocated, reserved in events:
        stage = stages.setdefault(component, {"peak_reserved": 0, "peak_allocated": 0, "growths": []})
        if reserved > stage["peak_reserved"]:
            stage.update(peak_reserved=reserved, allocated_then=allocated)
        stage["peak_allocated"] = max(stage["peak_allocated"], allocated)
        if reserved > previous:
            stage["growths"].append((reserved - previous, name, allocated, previous - allocated))
        previous = reserved
    for stage in stages.values():
        stage["growths"] = sorted(stage["growths"], reverse=True)[:6]
    GiB = 2**30
    print(
        json.dumps(
            {
                "kind": "alloc_timeline",
                "placement": args.placement,
                "weights": args.weights,
                "workload": {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps},
                "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"),
                "max_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
                "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3),
                "peak": {**peak, "free": [round(b / 2**20, 1) for b in peak["free"]]},
                "stages": stages,
                "gpu": torch.cuda.get_device_name(),
                "versions": {"torch": torch.__version__},
                "command": " ".join(["python", *sys.argv]),
            }
        )
    )


if __name__ == "__main__":
    main()
