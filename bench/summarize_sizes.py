"""Compare today's predictions with the sizes calibrate_sizes.py measured on the GPU machine.

Reads the JSON lines, keeps the latest row per (model, component, backend), predicts each again with
the current code (no GPU needed: a rule change shows up here at once) and prints a Markdown table:
error against the tensors really loaded, and against what the CUDA allocator holds for them.

    python bench/summarize_sizes.py bench/results/sizes-h100.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pct(predicted: int, measured: int | None) -> str:
    return f"{100 * (predicted - measured) / measured:+.3f}%" if measured else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()

    from pipefit.tools.measure import measure_components
    from pipefit.tools.units import format_bytes

    latest: dict[tuple[str, str, str], dict] = {}
    for path in args.results:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == "component_size" and row.get("measured_bytes"):
                latest[(row["model"], row["component"], row["backend"])] = row

    predictions = {model: measure_components(model, cache=False) for model in sorted({k[0] for k in latest})}
    print("| model | component | backend | predicted | loaded tensors | error | allocated | error |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    for (model, component, backend), row in sorted(latest.items()):
        comp = predictions[model].components[component]
        predicted = {"none": comp.bytes, "layerwise_fp8": comp.layerwise_fp8_bytes}.get(backend)
        predicted = predicted if predicted is not None else comp.quantized_bytes[backend]
        loaded, allocated = row.get("loaded_tensor_bytes"), row["measured_bytes"]
        worst = max(worst, abs(predicted - allocated) / allocated)
        print(
            f"| {model.removeprefix('builtin:')} | {component} | {backend} | {format_bytes(predicted)} "
            f"| {format_bytes(loaded) if loaded else '-'} | {_pct(predicted, loaded)} "
            f"| {format_bytes(allocated)} | {_pct(predicted, allocated)} |"
        )
    print(f"\nworst error against allocated bytes: {100 * worst:.2f}% (target: within 3%)")


if __name__ == "__main__":
    main()
