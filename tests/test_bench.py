"""The calibration harness runs end to end on a CPU, so it is ready when a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_calibrate_strategies_writes_one_row_per_plan_and_workload(tiny_dirs, tmp_path):
    out = tmp_path / "rows.jsonl"
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "calibrate_strategies.py"), "--weights", str(tiny_dirs["flux"]),
            "--dtype", "float32", "--workload", "64x64", "--workload", "32x48", "--steps", "2",
            "--only", "group_leaf", "none", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # plans in the order asked; within a plan's process, workloads smallest first
    assert [(r["plan_name"], r["workload"]["height"]) for r in rows] == [
        ("group_leaf", 32), ("group_leaf", 64), ("none", 32), ("none", 64)
    ]  # fmt: skip
    for row in rows:
        assert row["outcome"] == "ok" and row["ok"], row["error"]
        assert row["model"] == "FluxPipeline" and row["family"] == "flux"
        assert len(row["step_seconds"]) == 2 and 0 < row["peak_rss_run_bytes"] <= row["process_peak_rss_bytes"]
        assert row["seconds"] > sum(row["step_seconds"])
        assert row["command"].startswith("python bench/calibrate_strategies.py")
    # one process per plan: a warm-up call and one per workload, told apart
    assert rows[0]["log_path"] == rows[1]["log_path"] != rows[2]["log_path"]
    assert "warmup_seconds" in rows[0] and "warmup_seconds" not in rows[1]
    # the group-leaf run really ran the plan: its patched copy is next to its log
    patched = Path(rows[0]["log_path"]).with_name("flux_user_script.py").read_text()
    assert 'offload_type="leaf_level"' in patched


def test_every_calibration_plan_passes_the_rules():
    from pipefit.tools.plan import Target, check_plan, parse_plan

    plans = json.loads((ROOT / "bench" / "calibration_plans.json").read_text())
    denoiser = {"flux": "transformer", "sdxl": "unet", "wan": "transformer"}
    for family, named in plans.items():
        if family.startswith("_"):
            continue
        encoders = {"text_encoder": "transformers", "text_encoder_2": "transformers"}
        target = Target(
            device_type="cuda", compute_capability=(9, 0), denoiser=denoiser[family],
            component_libraries={denoiser[family]: "diffusers", "vae": "diffusers", **encoders},
        )  # fmt: skip
        for name, plan in named.items():
            errors = [f for f in check_plan(parse_plan(plan), target) if f.severity == "error"]
            assert not errors, (family, name, errors)


def test_fit_gpu_fits_the_gpu_constants_and_prints_every_run(tmp_path, builtin_cache):
    """bench/fit_gpu.py on two families' rows (image ones: their dry runs are quick): the constants it
    fits and one line per run."""
    rows = [line for line in (ROOT / "bench" / "results" / "strategies-h200.jsonl").read_text().splitlines()
            if json.loads(line).get("build") in ("flux1-dev", "chroma")]  # fmt: skip
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(rows) + "\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fit_gpu.py"), "--runs", str(runs)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PIPEFIT_CACHE_DIR": str(builtin_cache)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "context_bytes" in run.stdout and "fragmentation" in run.stdout
    ok = [json.loads(r) for r in rows if json.loads(r)["ok"]]
    assert sum(line.startswith(("flux1-dev ", "chroma ")) for line in run.stdout.splitlines()) == len(ok)
    assert "peak VRAM:" in run.stdout and "within 10%" in run.stdout
    assert "host RAM (loading and running peaks):" in run.stdout and "transfer efficiency:" in run.stdout
