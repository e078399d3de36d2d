"""A full-size pipeline with random weights, run the way a user's script runs one.

    python bench/random_pipeline.py sdxl-base --height 1024 --width 1024 --steps 20 --calls 2
    python bench/random_pipeline.py flux1-dev --dtype bfloat16 --save /tmp/w/flux

MODEL is one of pipefit's built-in configs (tools/examples: flux1-dev, sdxl-base, wan2.1-t2v-1.3b).
Every component is built from its config with random weights directly on the GPU in ``--dtype``
(no download: memory and speed behave as with the real checkpoint), tokenizers come from a toy
vocabulary (tests/fixtures/tiny_pipelines.py), and the pipeline is called ``--calls`` times.
Each call's own wall time is printed (synchronized), so a plain run and one under ``pipefit trial``
can be compared by bench/trial_overhead.py. It is the subject of the GPU trial tests too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


def random_component(library: str, class_name: str, config_dir: Path | str, dtype: str, device: str):
    """One model (a diffusers model or a transformers encoder) from its config folder, with random
    weights initialised straight on ``device`` in ``dtype``."""
    import importlib

    import torch

    cls = getattr(importlib.import_module(library), class_name)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device), torch.no_grad():
            if library == "diffusers":
                return cls.from_config(cls.load_config(config_dir))
            return cls(cls.config_class.from_pretrained(config_dir))
    finally:
        torch.set_default_dtype(torch.float32)


def build(model: str, dtype: str, device: str):
    """The whole pipeline of a built-in config: random models, its scheduler, toy tokenizers."""
    import diffusers
    import tiny_pipelines

    folder = ROOT / "tools" / "examples" / model
    index = json.loads((folder / "model_index.json").read_text())
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list):
            continue
        library, class_name = spec
        if class_name is None:  # an optional component the pipeline is saved without
            components[name] = None
        elif name.startswith("tokenizer"):
            if "CLIP" in class_name:
                components[name] = tiny_pipelines._clip_tokenizer()
            elif "T5" in class_name:
                components[name] = tiny_pipelines._t5_tokenizer()
            else:
                raise SystemExit(f"{model}: no toy tokenizer for {class_name} (CLIP and T5 ones only)")
        elif name == "scheduler":
            cls = getattr(diffusers, class_name)
            components[name] = cls.from_config(cls.load_config(folder / name))
        else:
            components[name] = random_component(library, class_name, folder / name, dtype, device)
    return getattr(diffusers, index["_class_name"])(**components)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(p.name for p in (ROOT / "tools" / "examples").iterdir()))
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=33, help="video pipelines only")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--save", type=Path, help="write the pipeline there (save_pretrained) instead of calling it")
    args = parser.parse_args()

    import torch

    pipe = build(args.model, args.dtype, "cuda")
    if args.save is not None:
        pipe.save_pretrained(args.save)
        print(f"saved {args.model} ({args.dtype}, random weights) to {args.save}")
        return
    kwargs = dict(prompt="a photo of a cat in the snow", height=args.height, width=args.width,
                  num_inference_steps=args.steps, output_type="np")  # fmt: skip
    if any(name in args.model for name in ("wan", "ltx", "cogvideox")):
        kwargs["num_frames"] = args.frames
    for call in range(args.calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(**kwargs)
        torch.cuda.synchronize()
        print(f"call {call}: {time.perf_counter() - started:.4f} s", flush=True)
    print(f"peak allocated {torch.cuda.max_memory_allocated()} reserved {torch.cuda.max_memory_reserved()}")


if __name__ == "__main__":
    main()
