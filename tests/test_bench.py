"""The calibration harness runs end to end on a CPU, so it is ready when a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_calibrate_strategies_writes_one_row_per_plan_and_workload(tiny_dirs, tmp_path):
    out = tmp_path / "rows.jsonl"
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "calibrate_strategies.py"), "--weights", str(tiny_dirs["flux"]),
            "--dtype", "float32", "--workload", "64x64", "--workload", "32x48", "--steps", "2", "--calls", "2",
            "--only", "none", "group_leaf", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["workload"]["height"], r["plan_name"]) for r in rows] == [(64, "none"), (64, "group_leaf"), (32, "none"), (32, "group_leaf")]
    for row in rows:
        assert row["outcome"] == "ok", row["error"]
        assert row["model"] == "FluxPipeline" and row["family"] == "flux"
        assert len(row["step_seconds"]) == 2 and row["peak_rss_bytes"] > 0
        assert row["command"].startswith("python bench/calibrate_strategies.py")
    # the group-leaf run really ran the plan: its patched copy is next to its log
    patched = Path(rows[1]["log_path"]).with_name("flux_user_script.py").read_text()
    assert 'offload_type="leaf_level"' in patched


def test_every_calibration_plan_passes_the_rules():
    from tools.plan import Target, check_plan, parse_plan

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
