"""Fit a GPU's constants from the runs on it, then print how the derived predictions compare.

    python bench/fit_gpu.py [--runs bench/results/strategies-h200.jsonl] [--write]

The constants are the hardware's, never a family's (shared/design.md): the CUDA context (the
driver's peak minus PyTorch's reserved), cuDNN's workspace beside a convolution (the allocated peak
above what the dry run saw live at the peak call's convolutions, per byte of their input + output,
2-D and 3-D), the allocator's fragmentation (reserved minus allocated per byte of the working memory
really allocated, for each allocator; layerwise casting's kept upcast copies per byte cast), and the
matmul, convolution and attention rates (non-negative least squares on the plain plans' seconds per
call against the FLOPs the dry run counted, relative errors). Everything else in each prediction comes from the pipeline's dry run and measured
sizes. ``--write`` stores the profile in tools/gpus.json. The table: every run, predicted and
measured peak VRAM and seconds per step, and the errors the targets are about.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipefit.tools.estimate import Workload, call_seconds, conv_kind, denoiser_of, estimate, trace_for  # noqa: E402
from pipefit.tools.gpus import PROFILES, gpu_profile  # noqa: E402
from pipefit.tools.measure import measure_components  # noqa: E402
from pipefit.tools.plan import parse_plan  # noqa: E402
from pipefit.tools.strategies import group_offload, layerwise_casting  # noqa: E402

GiB = 2**30


@cache
def _measured_build(build: str, dtype: str):
    return measure_components(f"builtin:{build}", dtype=dtype)


def _measured(row: dict):
    """The row's built-in, measured once per run of this script (the fits ask for it many times)."""
    return _measured_build(row["build"], row["dtype"])


def rows(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("ok") and row.get("peak_vram_bytes") and row.get("build"):
                out.append(row)
    return out


def workload_of(row: dict) -> Workload:
    w = row["workload"]
    return Workload(height=w["height"], width=w["width"], frames=w.get("frames"), steps=w["steps"])


# before plans named their loading path, patch loaded these backends' quantized components in host RAM
_HOST_LOADED_BEFORE = ("bnb_nf4", "torchao_int8wo", "torchao_fp8wo")
_LOAD_FIELD_SINCE = "20261202"  # rows run since then load each backend its own way unless the plan says


# since then patched scripts set expandable segments themselves (os.environ.setdefault) unless the plan says
# "default": rows with the variable unset ran with it all the same
_ALLOCATOR_FIELD_SINCE = "20261201-223633"


def allocator_of(row: dict) -> str:
    """The allocator a row really ran: what the trial reported (``allocator_ran``), else what the environment
    set, else the plan's own where the patched script set it."""
    ran = row.get("allocator_ran") or row.get("allocator") or "default"
    when = re.search(r"/trials/(\d{8}-\d{6})-", row.get("log_path") or "")
    if "allocator_ran" not in row and ran == "default" and when and when.group(1) >= _ALLOCATOR_FIELD_SINCE:
        return row["plan"].get("allocator", "expandable_segments")
    return "expandable_segments" if "expandable_segments:true" in ran.lower().replace(" ", "") else "default"


def plan_of(row: dict):
    """The plan a row ran, as it ran: its allocator, and its loading path where the row predates the field."""
    plan = {**row["plan"], "allocator": allocator_of(row)}
    ran_on = re.search(r"/trials/(\d{8})-", row.get("log_path") or "")
    legacy = ran_on is None or ran_on.group(1) < _LOAD_FIELD_SINCE
    if legacy and "load" not in plan and (plan.get("quantize") or {}).get("backend") in _HOST_LOADED_BEFORE:
        plan["load"] = "host"
    return parse_plan(plan)


def fit(runs: list[dict]) -> dict:
    """The GPU's constants from its runs."""
    import numpy as np
    from scipy import optimize

    context = max(r["peak_vram_bytes"] - r["peak_torch_reserved_bytes"] for r in runs)
    bare = gpu_profile(None).model_copy(update={"conv_workspace_per_byte": {}, "fragmentation": {}})
    workspace: dict[str, float] = {}
    fragmentation: dict[str, float] = {}
    for r in runs:
        if r["plan"].get("offload", "").startswith("group"):
            continue  # groups keep buffers of their own
        m = _measured(r)
        e = estimate(plan_of(r), m, workload_of(r), gpu=bare)
        index = e.peak_call
        calls = trace_for(m, workload_of(r)).calls
        if index is None:
            continue  # the peak is the loading stage (after the calls): no call's working memory to learn from
        call = calls[index]
        working = r["peak_torch_allocated_bytes"] - e.peak_resident_bytes  # what the GPU really needed
        # cuDNN's workspace: where the dry run's peak falls short of the real one, the least workspace per
        # byte of one of the peak call's large convolutions that explains the difference
        for kind in call.convs:  # a kind seen at a peak needs no more workspace than the runs show
            workspace.setdefault(kind, 0.0)
        if working > e.peak_working_bytes:
            needs = [((working - live) / size, kind) for kind, points in call.convs.items()
                     for live, size in points if size >= GiB // 8]  # fmt: skip
            if needs:
                need, kind = min(needs)
                workspace[kind] = max(workspace.get(kind, 0.0), need)
        # the allocator's fragmentation, per byte of the working memory really allocated (a few MiB say
        # nothing); casting's freed upcast copies are a term of their own, fitted below
        if working >= GiB and not plan_of(r).layerwise_casting:
            kept = (r["peak_torch_reserved_bytes"] - r["peak_torch_allocated_bytes"]) / working
            for key in (e.allocator, f"{e.allocator}:{conv_kind(calls, index)}"):
                fragmentation[key] = max(fragmentation.get(key, 0.0), kept)
    # layerwise casting: what the runs kept reserved beyond the fragmentation, per byte of the cast components
    cast_kept = 0.0
    for r in runs:
        plan = plan_of(r)
        if plan.layerwise_casting and not plan.grouped:
            m = _measured(r)
            e = estimate(plan, m, workload_of(r), gpu=bare)
            calls = trace_for(m, workload_of(r)).calls
            working = r["peak_torch_allocated_bytes"] - e.peak_resident_bytes
            frag = (fragmentation.get(f"{e.allocator}:{conv_kind(calls, e.peak_call)}", fragmentation.get(e.allocator, 0.0))
                    if e.peak_call is not None else 0.0)  # fmt: skip
            excess = r["peak_torch_reserved_bytes"] - r["peak_torch_allocated_bytes"] - frag * max(working, 0)
            cast = layerwise_casting.kept_bytes(plan, m, 1.0)
            cast_kept = max(cast_kept, excess / cast) if cast else cast_kept
    # rates, from the plain plans (everything on the GPU, nothing moved), in two steps: the denoiser's
    # steady step times against its matmul and attention FLOPs (transformers: no convolutions), then
    # what the rest of the call took against the convolutions left (the VAE decode, UNets)
    steps_a, steps_b, plain = [], [], []
    for r in runs:
        if r["plan"] or len(r["step_seconds"]) < 2:
            continue
        m = _measured(r)
        calls = trace_for(m, workload_of(r)).calls
        plain.append((r, calls))
        looped = [c for c in calls if c.step is not None]
        if sum(c.conv_flops for c in looped) < 0.05 * sum(c.flops for c in looped):
            n = len(r["step_seconds"])
            steps_a.append([sum(c.flops for c in looped) / n, sum(c.attention_flops for c in looped) / n, len(looped) / n])
            steps_b.append(sum(r["step_seconds"][1:]) / (n - 1))
    a, b = np.array(steps_a), np.array(steps_b)
    coef, _ = optimize.nnls(a / b[:, None], np.ones(len(b)))  # relative errors weigh alike
    mm_s, attn_s, overhead = (max(float(c), 1e-18) for c in coef)
    rest_conv = rest_seconds = 0.0
    for r, calls in plain:
        matmul_and_attention = sum((c.flops - c.conv_flops) * mm_s + c.attention_flops * attn_s + overhead for c in calls)
        rest_conv += sum(c.conv_flops for c in calls)
        rest_seconds += max(r["seconds"] - matmul_and_attention, 0.0)
    conv_s = rest_seconds / rest_conv if rest_conv else mm_s
    return {
        "context_bytes": float(context), "conv_workspace_per_byte": workspace, "fragmentation": fragmentation,
        "cast_kept_per_byte": round(cast_kept, 4),
        "matmul_flops_per_s": 1 / mm_s, "conv_flops_per_s": 1 / conv_s, "attention_flops_per_s": 1 / attn_s,
        "call_overhead_seconds": min(overhead, 0.05),
    }  # fmt: skip


RAM_KEYS = ("model", "model_quantized", "sequential", "group", "group_low_cpu_mem", "pinned", "host_quantize", "host_leftover")


def host_terms(runs: list[dict], k) -> dict:
    """The host's RAM terms from its runs: the process's RSS before any weight (loading: the offloaded
    plans' loading peak, which reads no weight, and its anonymous and shared part where the rows record
    it; running: the plain plans', by least squares as a constant
    plus a share of the decoded output), then each per-byte term as the median over the runs that use it
    of (measured - predicted without it) / (its bytes)."""
    from statistics import median

    import numpy as np
    from pipefit.tools.estimate import host_ram
    from pipefit.tools.strategies import Weights

    def ram(r, base, per_byte):
        coefficients = k.model_copy(update={"ram_base_bytes": base, "ram_copy_per_byte": per_byte,
                                            "ram_per_output_byte": per_output})  # fmt: skip
        return host_ram(plan_of(r), Weights.of(plan_of(r), _measured(r)), coefficients, workload_of(r).output_bytes())

    quiet = [r for r in runs if r["plan"].get("offload") not in (None, "none")
             and not r["plan"].get("quantize") and not r["plan"].get("group", {}).get("use_stream")]  # fmt: skip
    quiet_held = [r["peak_held_load_bytes"] for r in quiet if r.get("peak_held_load_bytes")]
    plain = [r for r in runs if not r["plan"]]
    outputs = np.array([[1.0, workload_of(r).output_bytes()] for r in plain])
    (run_base, per_output), *_ = np.linalg.lstsq(outputs, np.array([r["peak_rss_run_bytes"] for r in plain]), rcond=None)
    per_output = round(max(float(per_output), 0.0), 3)
    base = {"load": median(r["peak_rss_load_bytes"] for r in quiet), "run": float(run_base)}
    base["load_held"] = median(quiet_held) if quiet_held else base["load"]
    per_byte = dict.fromkeys(RAM_KEYS, 0.0)
    for key in RAM_KEYS:
        ratios = []
        for r in runs:
            one = {**per_byte, key: 1.0}
            for phase, measured in (("load", r["peak_rss_load_bytes"]), ("run", r["peak_rss_run_bytes"])):
                without, with_one = getattr(ram(r, base, per_byte), phase), getattr(ram(r, base, one), phase)
                if measured and with_one - without > 2**28:  # the term moves this prediction by a quarter GiB
                    ratios.append((measured - without) / (with_one - without))
        per_byte[key] = round(median(ratios), 4) if ratios else k.ram_copy_per_byte.get(key, 1.0)
    return {"ram_base_bytes": base, "ram_copy_per_byte": per_byte, "ram_per_output_byte": per_output}


def transfer_terms(runs: list[dict], k) -> dict:
    """How fast each offloading mechanism moves weights, from the runs that offload: the measured time
    beyond the compute (the same plan predicted with transfers free) against the bytes moved at the full
    copy rate and, for group offloading, the groups copied. Per mechanism, with three runs or more of
    group offloading: the share of the rate and a fixed time per group copied, by least squares on
    relative errors; otherwise the median share alone."""
    import numpy as np
    from scipy import optimize

    mechanisms = {*k.transfer_efficiency, "stream_leaf", "stream_block"}

    def seconds(r, plan, m, efficiency, copy):
        update = {"transfer_efficiency": dict.fromkeys(mechanisms, efficiency), "copy_seconds": dict.fromkeys(mechanisms, copy)}
        return estimate(plan, m, workload_of(r), coefficients=k.model_copy(update=update)).seconds

    points: dict[str, list[tuple[float, float, float]]] = {}
    for r in runs:
        plan = plan_of(r)
        if plan.offload in ("model", "sequential"):
            key = plan.offload
        elif plan.grouped and not plan.group_settings.offload_to_disk:
            key = group_offload.copy_mechanism(plan)
        else:
            continue
        m = _measured(r)
        compute = seconds(r, plan, m, 1e9, 0.0)
        at_rate = seconds(r, plan, m, 1.0, 0.0) - compute
        copies = seconds(r, plan, m, 1e9, 1.0) - compute if plan.grouped else 0.0
        beyond = r["seconds"] - compute
        if beyond > 0.05 * r["seconds"] and at_rate > 0:
            points.setdefault(key, []).append((at_rate, copies, beyond))
    efficiency, copy_seconds = dict(k.transfer_efficiency), dict(k.copy_seconds)
    for key, rows_ in points.items():
        at_rate, copies, beyond = (np.array(v) for v in zip(*rows_))
        if len(rows_) >= 3 and copies.any():
            (inverse_share, per_copy), _ = optimize.nnls(np.stack([at_rate, copies], 1) / beyond[:, None], np.ones(len(beyond)))
            if inverse_share > 0:
                efficiency[key], copy_seconds[key] = round(float(1 / inverse_share), 4), float(f"{per_copy:.3g}")
                continue
        efficiency[key], copy_seconds[key] = round(float(np.median(at_rate / beyond)), 4), 0.0
    return {"transfer_efficiency": efficiency, "copy_seconds": copy_seconds}


def _steady_step(r: dict) -> float:
    steady = r["step_seconds"][1:] or r["step_seconds"]
    return sum(steady) / len(steady)


def _step_parts(r: dict, profile) -> tuple[float, float, float]:
    """(matmul and convolution seconds, attention seconds at the native rate, overhead) of one denoising step
    of the row's pipeline at the GPU's rates, in bf16, eager."""
    from pipefit.tools.estimate import compute_seconds

    m, w = _measured(r), workload_of(r)
    trace = trace_for(m, w)
    looped = [c for c in trace.calls if c.step is not None and c.component == denoiser_of(m)]
    n = trace.steps_run
    matmul = sum(compute_seconds(c.flops, c.conv_flops, 0.0, profile) for c in looped) / n
    attention = sum(compute_seconds(0.0, 0.0, c.attention_flops, profile) for c in looped) / n
    return matmul, attention, len(looped) / n * profile.call_overhead_seconds


def speed_terms(runs: list[dict], k, profile) -> tuple[dict, dict]:
    """The kernels' speed terms, each from the runs that isolate it (everything on the GPU, no step cache):
    fp8 compute's step factor (torchao_fp8dq on the denoiser), each attention backend's rate relative to
    PyTorch's own choice, regional compile's step factor and first-call seconds per block class compiled.
    Returns (calibration.json updates, GPU profile updates); medians where several runs say the same."""
    from statistics import median

    fp8, attention, compiled, compile_seconds, compile_ram = [], {}, [], [], []
    for r in runs:
        plan = plan_of(r)
        if plan.offload != "none" or plan.cache is not None or len(r["step_seconds"]) < 3:
            continue
        m = _measured(r)
        denoiser = denoiser_of(m)
        matmul, attn, overhead = _step_parts(r, profile)
        quantized = plan.quantize.backend if plan.quantize and denoiser in plan.quantize.components else None
        measured = _steady_step(r)
        if quantized == "torchao_fp8dq" and plan.compile == "none" and not plan.attention_backend:
            fp8.append(measured / (matmul + attn + overhead))
        factor = k.step_factor.get(quantized, 1.0) if quantized else 1.0
        if plan.attention_backend and plan.compile == "none" and quantized in (None, "bnb_nf4", "torchao_int8wo"):
            left = measured / factor - matmul - overhead
            if left > 0:
                attention.setdefault(plan.attention_backend, []).append(attn / left)
        if plan.compile == "regional" and not plan.attention_backend and quantized in (None, "bnb_nf4"):
            compiled.append(measured / ((matmul + attn + overhead) * factor))
            blocks = len(m.components[denoiser].repeated_blocks) or 1
            warm_steps = min(workload_of(r).steps, 4)
            eager_warmup = r["seconds"] - (workload_of(r).steps - warm_steps) * measured  # the same call uncompiled, near enough
            compile_seconds.append(max(r["warmup_seconds"] - eager_warmup, 0.0) / blocks)
            eager = plan.model_copy(update={"compile": "none"})
            compile_ram.append(r["peak_rss_run_bytes"] - estimate(eager, m, workload_of(r), coefficients=k).ram_run_bytes)
    calibration, gpu = {}, {}
    if fp8:
        calibration["step_factor"] = {**k.step_factor, "torchao_fp8dq": round(median(fp8), 3)}
    if compiled:
        calibration["compile_step_factor"] = round(median(compiled), 3)
        calibration["compile_seconds_per_block"] = round(median(compile_seconds), 1)
        calibration["compile_ram_bytes"] = max(0, int(median(compile_ram)))
    if attention:
        gpu["attention_speed"] = {name: round(median(v), 3) for name, v in attention.items()}
    return calibration, gpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="*", default=[ROOT / "bench" / "results" / "strategies-h200.jsonl"])
    parser.add_argument("--write", action="store_true", help="store the fitted profile in tools/gpus.json")
    parser.add_argument("--held-out", type=Path, nargs="*", default=[], help="runs to predict, not to fit on")
    args = parser.parse_args()
    runs = rows(args.runs)
    gpu = runs[0]["gpu"] if runs and "gpu" in runs[0] else "NVIDIA H200"
    fitted = fit(runs)
    print("fitted:", {k: (f"{v / GiB:.3f} GiB" if k.endswith("bytes") else v if isinstance(v, dict) else f"{v:.4g}")
                     for k, v in fitted.items()})  # fmt: skip
    profile = gpu_profile(gpu).model_copy(update=fitted)
    if args.write:
        data = json.loads(PROFILES.read_text())
        data["profiles"][profile.name] = profile.model_dump()
        data["about"] = f"python bench/fit_gpu.py --write over {', '.join(str(p.relative_to(ROOT)) for p in args.runs)}"
        PROFILES.write_text(json.dumps(data, indent=1) + "\n")
    from pipefit.tools.estimate import CALIBRATION, load_coefficients

    k = load_coefficients().model_copy(update=host_terms(runs, load_coefficients()))
    k = k.model_copy(update=transfer_terms(runs, k))
    speed, gpu_speed = speed_terms(runs, k, profile)
    k = k.model_copy(update=speed)
    profile = profile.model_copy(update=gpu_speed)
    print("speed terms:", speed, gpu_speed)
    if args.write and gpu_speed:
        data = json.loads(PROFILES.read_text())
        data["profiles"][profile.name] = profile.model_dump()
        PROFILES.write_text(json.dumps(data, indent=1) + "\n")
    print("host RAM terms:", {"base GiB": {p: round(v / GiB, 3) for p, v in k.ram_base_bytes.items()}, **k.ram_copy_per_byte, "per output byte": k.ram_per_output_byte})
    print("transfer efficiency:", k.transfer_efficiency, "seconds per group copied:", k.copy_seconds)
    held_out = rows(args.held_out)
    if held_out:
        print(f"held out (not fitted on): {sorted({r['build'] for r in held_out})}")
    runs = runs + held_out
    errors, step_errors, call_errors, ram_errors, held = [], [], [], [], []
    print(f"{'pipeline':18s} {'plan':28s} {'alloc':5s} {'workload':12s} {'pred GiB':>8s} {'meas GiB':>8s} {'err':>6s}"
          f" {'stage':12s} {'pred s/step':>11s} {'meas':>6s} {'pred s/call':>11s} {'meas':>6s}"
          f" {'RAM load':>8s} {'meas':>6s} {'RAM run':>8s} {'meas':>6s}")  # fmt: skip
    for r in runs:
        m = _measured(r)
        w = workload_of(r)
        e = estimate(plan_of(r), m, w, gpu=profile, coefficients=k)
        if e.peak_stage == "load":  # loading comes before the calls: the process's peak is its peak
            r = {**r, "peak_vram_bytes": r["process_peak_vram_bytes"]}
        ram_pairs = [(e.ram_load_bytes, r["peak_rss_load_bytes"]), (e.ram_run_bytes, r["peak_rss_run_bytes"])]
        ram_errors += [(p - q) / q for p, q in ram_pairs if q]
        if r.get("peak_held_load_bytes"):  # what the RAM budget is compared with: loading's RSS less mapped files
            held.append((r["build"], r["plan_name"], e.ram_load_held_bytes, r["peak_held_load_bytes"]))
        err = (e.vram_bytes - r["peak_vram_bytes"]) / r["peak_vram_bytes"]
        errors.append(err)
        measured_step = _steady_step(r)
        denoiser = denoiser_of(m)
        trace = trace_for(m, w)
        predicted_step = sum(
            call_seconds(c, profile) for c in trace.calls if c.step is not None and c.component == denoiser
        ) / trace.steps_run  # fmt: skip
        if not r["plan"]:  # the plain plan: the rates alone
            step_errors.append((predicted_step - measured_step) / measured_step)
        label = "x".join(str(v) for k, v in r["workload"].items() if k != "steps" and v)
        print(f"{r['build']:18s} {r['plan_name']:28s} {'exp' if allocator_of(r) == 'expandable_segments' else 'def':5s} "
              f"{label:12s} {e.vram_bytes / GiB:8.2f} {r['peak_vram_bytes'] / GiB:8.2f} {err:+6.1%} {e.peak_stage:12s} "
              f"{predicted_step:11.3f} {measured_step:6.3f} {e.seconds:11.2f} {r['seconds']:6.2f}"
              f" {e.ram_load_bytes / GiB:8.2f} {(r['peak_rss_load_bytes'] or 0) / GiB:6.2f}"
              f" {e.ram_run_bytes / GiB:8.2f} {(r['peak_rss_run_bytes'] or 0) / GiB:6.2f}")  # fmt: skip
        call_errors.append((e.seconds - r["seconds"]) / r["seconds"])
    if args.write:  # which families and plans ran here (basis "measured"), the margin kept free, the host's terms
        from pipefit.tools.estimate import signature

        calibration = json.loads(CALIBRATION.read_text())
        calibration.update(ram_base_bytes=k.ram_base_bytes, ram_copy_per_byte=k.ram_copy_per_byte,
                           ram_per_output_byte=k.ram_per_output_byte, transfer_efficiency=k.transfer_efficiency, copy_seconds=k.copy_seconds, **speed)
        measured: dict[str, set[str]] = {}
        for r in runs:
            measured.setdefault(r["model"], set()).add(signature(plan_of(r)))
        calibration["measured"] = {k: sorted(v) for k, v in sorted(measured.items())}
        # kept free: measured = predicted x (1 + margin) at the worst under-prediction seen
        def margin(errs: list[float]) -> float:
            return round(max(0.05, 1 / (1 + min(errs)) - 1) + 0.0005, 4)

        by_allocator = {}
        for r, err in zip(runs, errors):
            by_allocator.setdefault(allocator_of(r), []).append(err)
        calibration["margin_fraction"] = margin(by_allocator.get("expandable_segments", errors))
        calibration["margin_fraction_by_allocator"] = {a: margin(e) for a, e in sorted(by_allocator.items())}
        CALIBRATION.write_text(json.dumps(calibration, indent=1) + "\n")
    within = sum(abs(x) <= 0.10 for x in errors)
    print(f"\npeak VRAM: {within}/{len(errors)} within 10%; worst under {min(errors):+.1%}, worst over {max(errors):+.1%}")
    print(f"s/call: {sum(abs(x) <= 0.20 for x in call_errors)}/{len(call_errors)} within 20%, "
          f"mean |err| {sum(map(abs, call_errors)) / len(call_errors):.1%}")
    if ram_errors:
        print(f"host RAM (loading and running peaks): {sum(abs(x) <= 0.15 for x in ram_errors)}/{len(ram_errors)} within 15%; "
              f"worst under {min(ram_errors):+.1%}, worst over {max(ram_errors):+.1%}")
    if held:
        print(f"held RAM while loading (RSS less mapped weight files; the rows that record it): "
              f"{sum(abs(p - q) <= 0.15 * q for *_, p, q in held)}/{len(held)} within 15%")
        for build, name, predicted, measured in held:
            print(f"  {build:18s} {name:28s} predicted {predicted / GiB:6.2f} GiB, held {measured / GiB:6.2f} "
                  f"({(predicted - measured) / measured:+.1%})")
    if step_errors:
        print(f"s/step (plain plans): mean |err| {sum(map(abs, step_errors)) / len(step_errors):.1%}, "
              f"worst {max(step_errors, key=abs):+.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
