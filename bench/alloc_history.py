"""The CUDA allocator's own record of one pipeline call's VAE decode: every allocation and free, in order.

    python bench/alloc_history.py --weights /tmp/w/sdxl --placement model --dtype float16 --out F.json

Loads the saved random-weight pipeline, places it, calls it once to warm up, then calls it again with
``torch.cuda.memory._record_memory_history`` on; a tensor of a marker size is allocated right before
and right after the VAE decode so the decode's window can be cut out of the allocator's trace. Writes
the window's events (action, size, address, stream) and the segment events, as JSON, to compare with
the dry run's own allocations (``Trace.allocations``) and see what a real decode allocates that the
dry run does not (cuDNN's workspaces, by size).
"""

from __future__ import annotations

import json

from alloc_timeline import pipeline_arguments, placed_pipeline

MARKER = 7777 * 512  # bytes: a size nothing else allocates


def main() -> None:
    parser = pipeline_arguments(__doc__, placement="model", steps=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    pipe = placed_pipeline(args)
    decode = pipe.vae.decode

    def marked(*a, **kw):
        torch.empty(MARKER, dtype=torch.uint8, device="cuda")
        out = decode(*a, **kw)
        torch.empty(MARKER, dtype=torch.uint8, device="cuda")
        return out

    pipe.vae.decode = marked
    call = {"prompt": "a fox in the snow", "height": args.height, "width": args.width, "num_inference_steps": args.steps}
    if args.frames:
        call["num_frames"] = args.frames
    pipe(**call)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context=None, stacks="python")
    pipe(**call)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = [e for device in snapshot["device_traces"] for e in device]
    marks = [i for i, e in enumerate(trace) if e["action"] == "alloc" and e["size"] == MARKER]
    start, end = (marks[0], marks[2]) if len(marks) >= 3 else (0, len(trace))
    window = [{"action": e["action"], "size": e["size"], "addr": e["addr"], "stream": e.get("stream", 0)} for e in trace[start:end]]
    out = {"weights": args.weights, "placement": args.placement, "dtype": args.dtype, "height": args.height,
           "allocator": __import__("os").environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default",
           "max_reserved": torch.cuda.max_memory_reserved(), "max_allocated": torch.cuda.max_memory_allocated(),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "window": window,
           "command": "python bench/alloc_history.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v is not None)}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(args.placement, out["allocator"], "events in the decode window:", len(window),
          "max reserved GiB", round(out["max_reserved"] / 2**30, 3), "max allocated", round(out["max_allocated"] / 2**30, 3))


if __name__ == "__main__":
    main()
