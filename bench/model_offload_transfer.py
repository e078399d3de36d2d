"""Model offload's transfer time against what it moves, per H200 run: a lead on the one-rate term.

    python bench/model_offload_transfer.py

recommend prices model offload's moves as every weight byte on and off the GPU once per call at one
share of the pageable copy rate. For each model-offload row of results/strategies-h200.jsonl this
prints the time beyond the compute (measured seconds less the plan predicted with transfers free)
beside the bytes moved in tensors of 32 MiB or more (glibc maps each afresh: new pages to fault in on
every copy back), in smaller ones (its heap reuses their chunks) and the tensors moved (bitsandbytes'
4-bit layers counted three times: weight, absmax, quantization map), with a fit of those three terms
by least squares on relative errors and what it and today's model predict per call; then the same
fit again with each family left out, predicting that family's rows (the out-of-sample check).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fit_gpu import _measured, plan_of, workload_of  # noqa: E402

GiB, MMAP_THRESHOLD_MAX = 2**30, 32 * 2**20


def moved(plan, weights, tensors: dict[str, list[int]]) -> tuple[float, float, int]:
    """(bytes in tensors of 32 MiB or more, bytes in smaller ones, tensors) of one trip, at the plan's sizes."""
    big = small = 0.0
    count = 0
    for name, sizes in tensors.items():
        if name not in weights.bytes:
            continue
        scale = weights.bytes[name] / max(sum(sizes), 1)
        count += len(sizes) * (3 if plan.quantize and name in plan.quantize.components else 1)
        for size in sizes:
            if size * scale >= MMAP_THRESHOLD_MAX:
                big += size * scale
            else:
                small += size * scale
    return big, small, count


def main() -> None:
    import numpy as np
    from pipefit.tools.estimate import estimate, load_coefficients, trace_for
    from pipefit.tools.strategies import Weights
    from scipy import optimize

    k = load_coefficients()
    mechanisms = {*k.transfer_efficiency, "stream_leaf", "stream_block"}
    free = k.model_copy(update={"transfer_efficiency": dict.fromkeys(mechanisms, 1e9)})
    rows = []
    for line in (ROOT / "bench/results/strategies-h200.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r["ok"] or r["plan"].get("offload") != "model":
            continue
        plan, m, w = plan_of(r), _measured(r), workload_of(r)
        compute = estimate(plan, m, w, coefficients=free).seconds
        terms = moved(plan, Weights.of(plan, m), trace_for(m, w).weight_tensors)
        rows.append((r, terms, r["seconds"] - compute, estimate(plan, m, w, coefficients=k).seconds))
    a = np.array([[2 * x for x in terms] for _, terms, _, _ in rows])  # on and off: two trips per call
    beyond = np.array([b for _, _, b, _ in rows])

    def fit(keep):
        coef, _ = optimize.nnls(a[keep] / beyond[keep, None], np.ones(int(keep.sum())))
        return coef

    coef = fit(np.ones(len(rows), dtype=bool))
    print(f"fit: {coef[0] * GiB:.3f} s per GiB in tensors >= 32 MiB, {coef[1] * GiB:.3f} s per GiB in smaller ones, "
          f"{coef[2] * 1e3:.3f} ms per tensor ({len(rows)} runs)")  # fmt: skip
    now_within = fit_within = 0
    for (r, (big, small, count), extra, now), terms in zip(rows, a):
        fitted = r["seconds"] - extra + terms @ coef
        now_err, fit_err = now / r["seconds"] - 1, fitted / r["seconds"] - 1
        now_within, fit_within = now_within + (abs(now_err) <= 0.2), fit_within + (abs(fit_err) <= 0.2)
        print(f"{r['build']:16s} {r['plan_name']:18s} >=32MiB {big / GiB:6.2f} GiB  <32MiB {small / GiB:5.2f} GiB  "
              f"tensors {count:5d}  beyond compute {extra:6.2f} s  measured {r['seconds']:6.2f}  "
              f"today {now:6.2f} ({now_err:+.0%})  three terms {fitted:6.2f} ({fit_err:+.0%})")  # fmt: skip
    print(f"s/call within 20%: today {now_within}/{len(rows)}, three terms (fitted on these rows) {fit_within}/{len(rows)}")
    builds = np.array([r["build"] for r, *_ in rows])
    print("\nleft out of the fit, one family at a time (its rows predicted by the fit on the others):")
    out_within = 0
    for build in dict.fromkeys(builds):
        held = builds == build
        c = fit(~held)
        errors = [(r["seconds"] - extra + terms @ c) / r["seconds"] - 1
                  for (r, _, extra, _), terms, h in zip(rows, a, held) if h]  # fmt: skip
        today = [now / r["seconds"] - 1 for (r, _, _, now), h in zip(rows, held) if h]
        out_within += sum(abs(e) <= 0.2 for e in errors)
        print(f"{build:16s} fit on the others: {c[0] * GiB:.3f} s/GiB >= 32 MiB, {c[1] * GiB:.3f} s/GiB smaller, "
              f"{c[2] * 1e3:.3f} ms/tensor; its {len(errors)} runs: three terms "
              f"{' '.join(f'{e:+.0%}' for e in errors)}, today {' '.join(f'{e:+.0%}' for e in today)}")  # fmt: skip
    print(f"s/call within 20%, each family predicted by a fit without it: {out_within}/{len(rows)}")


if __name__ == "__main__":
    main()
