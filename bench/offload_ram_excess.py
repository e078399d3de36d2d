"""Model offload's running RSS beyond the weights it holds, per H200 run, beside each component's bytes
in tensors under glibc's largest mmap threshold (32 MiB): a lead on the RSS term still fitted per byte.

    python bench/offload_ram_excess.py

For each model-offload row of results/strategies-h200.jsonl: the bytes offloaded (the RSS term at one
byte per byte), the measured running RSS less everything else the model predicts, their ratio, and the
dry run's weight tensors of each component split at 32 MiB (glibc serves smaller allocations from its
heap, which keeps freed chunks, and larger ones from their own mappings, which it returns).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fit_gpu import _measured, plan_of, workload_of  # noqa: E402
from model_offload_transfer import GiB, MMAP_THRESHOLD_MAX  # noqa: E402


def main() -> None:
    from pipefit.tools.estimate import host_ram, load_coefficients, trace_for
    from pipefit.tools.strategies import Weights

    k = load_coefficients()
    per_byte = {value: k.model_copy(update={"ram_copy_per_byte": {**k.ram_copy_per_byte, "model": value,
                                                                     "model_quantized": value}}) for value in (0.0, 1.0)}  # fmt: skip
    small_by_build = {}
    for line in (ROOT / "bench/results/strategies-h200.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r["ok"] or r["plan"].get("offload") != "model" or not r.get("peak_rss_run_bytes"):
            continue
        plan, m, output = plan_of(r), _measured(r), workload_of(r).output_bytes()
        weights = Weights.of(plan, m)
        without, with_one = (host_ram(plan, weights, per_byte[v], output).run for v in (0.0, 1.0))
        offloaded, excess = with_one - without, r["peak_rss_run_bytes"] - with_one
        if r["build"] not in small_by_build:
            tensors = trace_for(m, workload_of(r)).weight_tensors
            small_by_build[r["build"]] = {n: sum(s for s in sizes if s < MMAP_THRESHOLD_MAX) / GiB for n, sizes in tensors.items()}
        small = ", ".join(f"{n} {v:.2f}" for n, v in small_by_build[r["build"]].items())
        print(f"{r['build']:16s} {r['plan_name']:18s} offloaded {offloaded / GiB:6.2f} GiB, RSS beyond it {excess / GiB:5.2f} "
              f"(x{(offloaded + excess) / offloaded:.3f}); under 32 MiB (unquantized): {small}")  # fmt: skip


if __name__ == "__main__":
    main()
