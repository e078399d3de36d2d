"""Check measure_components' sizes against what loading really puts on the GPU.

For each component: build it at full size with random weights from its config, save it, then load
it in a fresh child process per backend (plain, bnb nf4, bnb int8, torchao int8 weight-only, fp8
layerwise casting) through the real ``from_pretrained`` path and read two figures: ``measured_bytes``, what the CUDA caching allocator holds for the model
(``torch.cuda.memory_allocated``: what the GPU really gives up), and ``loaded_tensor_bytes``, the bytes
its tensors hold (tools.sizes.loaded_bytes, quantization state included). The difference is the
allocator's rounding of each tensor's block. Writes one JSON line per (component, backend) with the
prediction, both figures and their errors, load time and peak RSS while loading, plus GPU name,
versions and the command.

    python bench/calibrate_sizes.py --model builtin:flux1-dev --components transformer text_encoder_2 \
        --out bench/results/sizes.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKENDS = ("none", "bnb_nf4", "bnb_int8", "torchao_int8wo", "layerwise_fp8")


def _component_class(library: str, class_name: str):
    import importlib

    return getattr(importlib.import_module(library), class_name)


def write_random(library: str, class_name: str, config_dir: str, dest: str, device: str) -> None:
    """Build the component with random bf16 weights on ``device`` and save_pretrained it."""
    from random_pipeline import random_component

    random_component(library, class_name, config_dir, "bfloat16", device).save_pretrained(dest)


def load_and_measure(library: str, class_name: str, dest: str, backend: str, device: str) -> dict:
    """Load through from_pretrained with ``backend`` and report device bytes, load time, peak RSS."""
    import psutil
    import torch

    cls = _component_class(library, class_name)
    lib = __import__(library)
    peak_rss = [0]
    done = threading.Event()

    def sample():
        proc = psutil.Process()
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    kwargs: dict = {"dtype": torch.bfloat16}
    if backend in ("bnb_nf4", "bnb_int8"):
        kwargs["quantization_config"] = lib.BitsAndBytesConfig(
            load_in_4bit=backend == "bnb_nf4", load_in_8bit=backend == "bnb_int8",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        kwargs["device_map"] = device
    elif backend == "torchao_int8wo":
        from torchao.quantization import Int8WeightOnlyConfig

        kwargs["quantization_config"] = lib.TorchAoConfig(Int8WeightOnlyConfig())
        kwargs["device_map"] = device
    start = time.perf_counter()
    model = cls.from_pretrained(dest, **kwargs)
    if backend in ("none", "layerwise_fp8"):
        model.to(device)
    if backend == "layerwise_fp8":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    gc.collect()
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    from pipefit.tools.sizes import loaded_bytes

    return {
        "measured_bytes": torch.cuda.memory_allocated() if on_cuda else None,
        "loaded_tensor_bytes": loaded_bytes(model),
        "max_allocated_bytes": torch.cuda.max_memory_allocated() if on_cuda else None,
        "load_seconds": round(seconds, 2),
        "peak_rss_bytes": peak_rss[0],
    }


def _environment() -> dict:
    import importlib.metadata

    import torch

    versions = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "torchao"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "versions": versions}


def _child(*args: str) -> dict | None:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:flux1-dev")
    parser.add_argument("--components", nargs="+", default=[])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", default="/tmp/pipefit-calibrate")
    parser.add_argument("--out", default="bench/results/sizes.jsonl")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        mode, *rest = args.child
        if mode == "write":
            write_random(*rest, args.device)
            print("{}")
        else:
            print(json.dumps(load_and_measure(*rest, args.device)))
        return

    from pipefit.tools.measure import measure_components
    from pipefit.tools.model_source import resolve_pipeline

    command = " ".join([Path(sys.executable).name, *sys.argv])
    source = resolve_pipeline(args.model)
    predicted = measure_components(args.model, cache=False).components
    env = _environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for comp in source.components:
        if comp.name not in args.components:
            continue
        dest = Path(args.workdir) / comp.name
        t0 = time.perf_counter()
        written = _child("--device", args.device, "--child", "write", comp.library, comp.class_name, str(comp.folder), str(dest))
        print(f"[{comp.name}] wrote random weights in {time.perf_counter() - t0:.0f} s {written or ''}", flush=True)
        pred = predicted[comp.name]
        for backend in args.backends:
            if backend == "layerwise_fp8" and comp.library != "diffusers":
                continue
            expected = {"none": pred.bytes, "layerwise_fp8": pred.layerwise_fp8_bytes}.get(backend)
            expected = expected if expected is not None else pred.quantized_bytes[backend]
            result = _child("--device", args.device, "--child", "load", comp.library, comp.class_name, str(dest), backend)
            row = {
                "kind": "component_size", "model": args.model, "component": comp.name, "class": comp.class_name,
                "backend": backend, "predicted_bytes": expected, **(result or {}), **env, "command": command,
            }  # fmt: skip
            for figure, error in (("measured_bytes", "error_pct"), ("loaded_tensor_bytes", "tensor_error_pct")):
                if row.get(figure):
                    row[error] = round(100 * (expected - row[figure]) / row[figure], 3)
            keys = ("component", "backend", "predicted_bytes", "measured_bytes", "error_pct", "loaded_tensor_bytes",
                    "tensor_error_pct", "load_seconds", "peak_rss_bytes", "error")  # fmt: skip
            print(json.dumps({k: row.get(k) for k in keys}), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        subprocess.run(["rm", "-rf", str(dest)])
        os.sync()


if __name__ == "__main__":
    main()
