"""run_trial: real child processes running real scripts, classified by how they really ended.

Every script here is a file under tests/fixtures/trial run exactly as a user's would be. The one
fake is NVML on machines without a GPU (the sampler's device figures), injected as a module.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
from processes import alive

from pipefit.tools.errors import PipefitError
from pipefit.tools.trial import run_trial

SCRIPTS = Path(__file__).parent / "fixtures" / "trial"
CORPUS = Path(__file__).parent / "fixtures" / "scripts"
GiB = 2**30


def trial(name: str, *args: str, **kwargs):
    kwargs.setdefault("log_dir", None)
    return run_trial(SCRIPTS / name, args=[str(a) for a in args], **kwargs)


# ---- a pipeline that works ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_dirs, tmp_path_factory):
    messages = []
    logs = tmp_path_factory.mktemp("trials")
    result = trial("tiny_flux.py", tiny_dirs["flux"], 3, 2, progress=messages.append, log_dir=logs)
    return result, messages


def test_a_pipeline_run_is_timed_per_call_and_per_step(tiny_run):
    result, _ = tiny_run
    assert result.outcome == "ok", result.output_tail
    assert result.exit_code == 0 and result.error is None and result.oom is None
    assert [c.pipeline for c in result.calls] == ["FluxPipeline", "FluxPipeline"]
    for call in result.calls:
        assert call.ok and call.steps_expected == 3 and len(call.step_seconds) == 3
        assert all(s > 0 for s in call.step_seconds)
        pieces = call.before_first_step_seconds + sum(call.step_seconds) + call.after_last_step_seconds
        assert pieces == pytest.approx(call.seconds, abs=2e-3)  # the pieces tile the call
    assert result.step_seconds == result.calls[-1].step_seconds
    assert 0 < result.seconds_before_first_call < result.seconds


def test_without_a_gpu_the_gpu_figures_are_null_and_ram_is_measured(tiny_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the figures are real: see the gpu tests")
    result, _ = tiny_run
    assert result.peak_vram_bytes is None and result.vram_source is None
    assert result.peak_torch_allocated_bytes is None and result.peak_torch_reserved_bytes is None
    # torch + diffusers + a pipeline are resident: far more than an idle interpreter's ~10 MiB
    assert result.peak_rss_bytes > 150 * 2**20
    # loading (imports, from_pretrained) and running (the calls) are told apart
    assert result.peak_rss_load_bytes > 150 * 2**20 and result.peak_rss_run_bytes > 150 * 2**20
    # sampled every 20 ms; the whole-run peak also has the kernel's exact high-water mark (wait4)
    assert max(result.peak_rss_load_bytes, result.peak_rss_run_bytes) <= result.peak_rss_bytes
    # and each call has its own peak, within the run's
    assert all(0 < call.peak_rss_bytes <= result.peak_rss_run_bytes for call in result.calls)
    assert all(call.peak_vram_bytes is None and call.peak_torch_allocated_bytes is None for call in result.calls)


def test_the_output_is_kept_whole_in_the_log_and_its_tail_in_the_result(tiny_run):
    result, _ = tiny_run
    assert "tiny flux done" in result.output_tail
    assert "tiny flux done" in Path(result.log_path).read_text()
    assert result.ran == result.script == str(SCRIPTS / "tiny_flux.py")


def test_progress_follows_the_run(tiny_run):
    _, messages = tiny_run
    assert messages[0].startswith("running tiny_flux.py")
    assert any(m.startswith("started (pid") for m in messages)
    steps = [m for m in messages if m.startswith("step ")]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"] * 2
    assert messages[-1].startswith("ok after")


def test_the_scripts_own_step_callback_still_runs(tiny_dirs):
    result = trial("own_callback.py", tiny_dirs["flux"])
    assert result.outcome == "ok", result.output_tail  # the script asserts its callback saw every step
    assert "own callback saw [0, 1, 2, 3]" in result.output_tail
    assert len(result.step_seconds) == 4


# ---- the ways a run ends --------------------------------------------------------------------------


# every stage's placement is also checked on recorded events (test_trial_report.py); two real runs by default
@pytest.mark.parametrize("stage", ["load", pytest.param("text_encode", marks=pytest.mark.slow), "denoise",
                                   pytest.param("vae_decode", marks=pytest.mark.slow)])  # fmt: skip
def test_cuda_oom_is_classified_with_its_numbers_and_stage(tiny_dirs, stage):
    result = trial("oom_at.py", tiny_dirs["flux"], stage)
    assert result.outcome == "cuda_oom" and result.exit_code == 1
    assert result.stage == stage == result.oom.stage
    assert result.oom.tried_to_allocate_bytes == 2 * GiB
    assert result.oom.free_bytes == pytest.approx(1.06 * GiB, rel=0.01)
    assert result.error.startswith("OutOfMemoryError: CUDA out of memory")


def test_memory_error_is_a_host_oom():
    result = trial("memory_error.py")
    assert result.outcome == "host_oom"
    assert result.error.startswith("MemoryError")


def test_a_ram_cap_stops_a_growing_script(tmp_path):
    started = time.monotonic()
    result = trial("grow_ram.py", ram_cap="512MiB")
    assert result.outcome == "host_oom" and result.ram_cap_bytes == 512 * 2**20
    assert "cap" in result.error
    assert result.peak_rss_bytes > 512 * 2**20
    assert "grew to" not in Path(result.log_path).read_text()  # stopped before it finished
    assert time.monotonic() - started < 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc splits the RSS on Linux only")
def test_a_ram_cap_leaves_out_mapped_file_pages_the_kernel_can_drop(tmp_path):
    """A script that maps and reads a 768 MiB file (as loading memory-mapped weights does) runs under a
    512 MiB cap: its RSS passes the cap, the memory it must hold does not. Anonymous memory of the same
    size is stopped (the test above)."""
    if _filesystem(tmp_path) == "tmpfs":  # a tmpfs file's pages are shared memory, which the cap counts
        pytest.skip(f"{tmp_path} is on tmpfs")
    result = trial("map_file.py", 768, tmp_path, ram_cap="512MiB")
    assert result.outcome == "ok", result.error
    assert result.peak_rss_bytes > 768 * 2**20 > 512 * 2**20 > result.peak_held_bytes
    assert result.peak_held_load_bytes == result.peak_held_bytes  # no pipeline call: all of it is loading
    assert "768 MiB mapped" in result.output_tail


def _filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from the longest mount point above it."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    above = [(point, kind) for _, point, kind, *_ in mounts if path.resolve().is_relative_to(point)]
    return max(above, key=lambda m: len(m[0]))[1]


def test_a_sigkill_nobody_asked_for_is_a_host_oom():
    result = trial("killed.py")
    assert result.outcome == "host_oom" and result.exit_code == -9
    assert "SIGKILL" in result.error
    assert "about to be killed" in result.output_tail


def test_a_timeout_stops_the_whole_tree(tmp_path):
    pids = tmp_path / "pids"
    result = trial("hang.py", pids, timeout=3)
    assert result.outcome == "timeout"
    assert 3 <= result.seconds < 15
    child, helper = map(int, pids.read_text().split())
    assert not alive(child) and not alive(helper)
    assert "hanging" in result.output_tail


def test_processes_the_script_leaves_running_are_stopped_and_reported(tmp_path):
    pid_file = tmp_path / "pid"
    result = trial("leaves_helper.py", pid_file)
    assert result.outcome == "ok"
    assert not alive(int(pid_file.read_text()))
    assert result.warnings == ["The script left 1 process(es) running when it ended; pipefit stopped them."]


def _cgroup_allowed() -> bool:
    from pipefit.tools.process_tree import ProcessTree

    tree = ProcessTree()
    tree.close()
    return tree.cgroup is not None


@pytest.mark.parametrize("environment", ["dropped", pytest.param("kept", marks=pytest.mark.slow)])  # dropped: the harder
@pytest.mark.parametrize("mode", ["hang", "exit"])
@pytest.mark.parametrize("containment", ["cgroup", "subreaper"])
def test_a_double_fork_into_a_new_session_is_stopped_too(tmp_path, monkeypatch, containment, mode, environment):
    """setsid + fork leaves the child's group and parent; the cgroup holds it, or the subreaper gets it
    back (by its inherited marker, or as the only trial's orphan when it dropped its environment)."""
    from pipefit.tools import process_tree

    if sys.platform != "linux":
        pytest.skip("cgroups and the child subreaper are Linux's")
    if containment == "cgroup" and not _cgroup_allowed():
        pytest.skip("this machine lets pipefit make no cgroup v2 group")
    if containment == "subreaper":
        monkeypatch.setattr(process_tree, "_new_cgroup", lambda name: None)
    pid_file = tmp_path / "pid"
    extra = ["clean-env"] if environment == "dropped" else []
    result = trial("escapes.py", pid_file, mode, *extra, timeout=1.5 if mode == "hang" else None)
    escaped = int(pid_file.read_text())
    assert result.containment == containment
    assert result.outcome == ("timeout" if mode == "hang" else "ok")
    assert not alive(escaped)
    with pytest.raises(psutil.NoSuchProcess):  # and reaped: no zombie left under this process
        psutil.Process(escaped).status()
    if mode == "exit":
        assert result.warnings == ["The script left 1 process(es) running when it ended; pipefit stopped them."]


def test_peak_ram_is_the_scripts_not_the_callers():
    """A child's kernel high-water mark starts at its parent's (fork, vfork and exec keep it): the
    sampled tree alone counts, so a large caller (a server after a big request) does not show."""
    ballast = bytearray(768 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # resident, every page
    result = trial("exits.py", 0)
    assert psutil.Process().memory_info().rss > 768 * 2**20
    assert result.outcome == "ok" and 0 < result.peak_rss_bytes < 256 * 2**20, result.peak_rss_bytes
    del ballast


def test_the_default_log_folder_is_pruned_by_age_and_size(tmp_path):
    from pipefit.tools.trial import prune_trials

    now = time.time()
    root = tmp_path / "trials"

    def made(name: str, days_ago: float, size: int) -> Path:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "output.log").write_bytes(b"x" * size)
        os.utime(folder / "output.log", (now - days_ago * 86400,) * 2)
        return folder

    old = made("20260101-000000-gen-a", 30, 10)
    big_older = made("20260110-000000-gen-b", 3, 600)
    big_newer = made("20260111-000000-gen-c", 2, 600)
    running = made("20260112-000000-gen-d", 0, 600)  # written to just now: a trial may be running
    mine = made("notes", 60, 10)  # not a trial's folder
    removed = prune_trials(root, max_age_days=14, max_bytes=1300, now=now)  # d and c fit; b, older, does not
    assert set(removed) == {old, big_older}
    assert big_newer.is_dir() and running.is_dir() and mine.is_dir()


def test_an_interrupt_leaves_no_process_behind(tmp_path):
    pids = tmp_path / "pids"

    def interrupt_once_started(message):
        if message.startswith("started"):
            deadline = time.monotonic() + 30
            while not pids.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trial("hang.py", pids, progress=interrupt_once_started)
    child, helper = map(int, pids.read_text().split())
    assert not alive(child) and not alive(helper)


def test_a_script_that_does_not_parse_is_an_error():
    result = trial("bad_syntax.py")
    assert result.outcome == "error" and result.exit_code == 1
    assert result.error.startswith("SyntaxError:")
    assert "bad_syntax.py" in result.output_tail


def test_an_exception_gives_its_type_and_the_scripts_own_traceback():
    result = trial("raises.py")
    assert result.outcome == "error"
    assert result.error == "KeyError: 'scheduler'"
    assert 'raises.py", line 8' in result.output_tail and "trial_runner" not in result.output_tail
    assert result.stage == "load"  # no pipeline was ever called


@pytest.mark.parametrize("status, outcome", [(0, "ok"), (3, "error")])
def test_the_exit_status_decides_and_both_streams_are_logged(status, outcome):
    result = trial("exits.py", status)
    assert result.outcome == outcome and result.exit_code == status
    assert "to stdout" in result.output_tail and "to stderr" in result.output_tail
    if status:
        assert result.error == "Exited with status 3."


# ---- a plan, and input that must be refused --------------------------------------------------------


def test_a_plan_runs_as_a_patched_copy_and_the_script_is_untouched(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub))
    script = tmp_path / "flux_main_argparse.py"
    shutil.copy(CORPUS / script.name, script)
    before = (script.read_bytes(), script.stat().st_mtime_ns)
    plan = {"offload": "group_block", "group": {"num_blocks_per_group": 1}}
    result = run_trial(script, plan, args=["--steps", "4", "--height", "256", "--width", "256"], cwd=tmp_path)
    assert result.outcome == "ok", result.output_tail
    assert (script.read_bytes(), script.stat().st_mtime_ns) == before
    assert result.ran != result.script and Path(result.ran).parent == Path(result.log_path).parent
    assert "enable_group_offload" in Path(result.ran).read_text()
    assert result.patch_edits and all(edit.startswith("line ") for edit in result.patch_edits)
    assert (tmp_path / "out.png").stat().st_size > 0  # the script ran in the folder it was given
    assert len(result.step_seconds) == 4


def test_bad_input_is_refused_before_anything_runs(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(PipefitError, match="does not exist"):
        run_trial(tmp_path / "missing.py", log_dir=logs)
    with pytest.raises(PipefitError, match="is a folder"):
        run_trial(tmp_path, log_dir=logs)
    with pytest.raises(PipefitError, match="^`vram_cap`: cannot read the size"):
        run_trial(SCRIPTS / "exits.py", vram_cap="twelve", log_dir=logs)
    with pytest.raises(PipefitError, match="No diffusers pipeline found"):
        run_trial(SCRIPTS / "exits.py", {"offload": "model"}, log_dir=logs)
    with pytest.raises(PipefitError, match="timeout"):
        run_trial(SCRIPTS / "exits.py", timeout=0, log_dir=logs)
    with pytest.raises(PipefitError, match="below the 64.00 MiB a Python interpreter needs"):
        run_trial(SCRIPTS / "exits.py", ram_cap="1KiB", log_dir=logs)
    assert not logs.exists()


# ---- device memory, through a stand-in NVML --------------------------------------------------------


def fake_nvml(children_visible: bool, per_process: int = 3 * GiB, total: int = 80 * GiB, base: int = GiB):
    """An NVML that sees this test's live child processes each holding ``per_process`` bytes."""

    def children():
        return [p for p in psutil.Process().children(recursive=True) if alive(p.pid)]

    memory = lambda handle: types.SimpleNamespace(  # noqa: E731
        total=total, used=base + per_process * len(children()), free=total - base - per_process * len(children())
    )
    processes = lambda handle: [  # noqa: E731
        types.SimpleNamespace(pid=p.pid, usedGpuMemory=per_process) for p in children() if children_visible
    ]
    return types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: index, nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetComputeRunningProcesses=processes,
    )  # fmt: skip


@pytest.mark.parametrize("visible, source", [(True, "nvml_process"), (False, "nvml_device")])
def test_device_memory_is_the_childs_where_nvml_can_tell(monkeypatch, visible, source):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(children_visible=visible))
    result = trial("grow_ram.py")  # runs ~3 s: many samples
    assert result.outcome == "ok"
    assert result.vram_source == source
    assert result.peak_vram_bytes == 3 * GiB
    assert result.gpu_memory_released is True


def test_a_vram_cap_is_refused_where_it_cannot_be_simulated(monkeypatch, tmp_path):
    absent = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("no driver")))
    monkeypatch.setitem(sys.modules, "pynvml", absent)
    with pytest.raises(PipefitError, match="NVML finds no GPU"):
        trial("exits.py", 0, vram_cap="12GiB", log_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(children_visible=True))
    with pytest.raises(PipefitError, match="not below this GPU's 80.00 GiB"):
        trial("exits.py", 0, vram_cap="80GiB", log_dir=tmp_path)


def test_a_vram_cap_says_when_the_script_had_no_cuda_to_cap(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(children_visible=True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = trial("memory_error.py", vram_cap="12GiB")  # imports no torch
    assert result.vram_cap_bytes == 12 * GiB
    assert "not applied" in result.simulation


# ---- the command line ------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipefit", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_passes_arguments_after_the_separator_and_exits_by_outcome(tmp_path):
    run = _cli("trial", str(SCRIPTS / "exits.py"), "--json", "--log-dir", str(tmp_path), "--", "3", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    result = json.loads(run.stdout)
    assert result["outcome"] == "error" and result["exit_code"] == 3
    assert Path(result["log_path"]).parent.parent == tmp_path

    run = _cli("trial", str(SCRIPTS / "exits.py"), "--log-dir", str(tmp_path), "--", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok in ") and "peak RAM (RSS)" in run.stdout


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    run = _cli("trial", "missing.py", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("pipefit: error: The script 'missing.py' does not exist.")
    assert "Traceback" not in run.stderr
    run = _cli("detect", "--", "x", cwd=tmp_path)
    assert run.returncode == 2 and "only for `pipefit trial`" in run.stderr


# ---- on the GPU -----------------------------------------------------------------------------------

RANDOM_PIPELINE = Path(__file__).parents[1] / "bench" / "random_pipeline.py"


def assert_peaks_agree(result):
    """The driver sees at least what PyTorch reserved, which holds at least what it allocated, and
    the difference is a CUDA context (about 0.5-1.5 GiB), not a miscount."""
    assert result.vram_source in ("nvml_process", "nvml_device")
    assert 0 < result.peak_torch_allocated_bytes <= result.peak_torch_reserved_bytes <= result.peak_vram_bytes
    assert result.peak_vram_bytes - result.peak_torch_reserved_bytes < 2 * GiB
    assert result.gpu_memory_released is True


@pytest.mark.gpu
def test_gpu_tiny_pipeline_peaks_agree_with_torch(tiny_run):
    result, _ = tiny_run
    assert result.outcome == "ok"
    assert_peaks_agree(result)


@pytest.fixture(scope="module")
def sdxl_free(tmp_path_factory):
    """Full-size SDXL (random weights) at 1024x1024, 4 steps, uncapped."""
    logs = tmp_path_factory.mktemp("sdxl")
    return run_trial(RANDOM_PIPELINE, args=["sdxl-base", "--steps", "4"], log_dir=logs)


@pytest.mark.gpu
def test_gpu_full_size_peaks_agree_with_torch(sdxl_free):
    assert sdxl_free.outcome == "ok", sdxl_free.output_tail
    assert_peaks_agree(sdxl_free)
    assert sdxl_free.peak_torch_allocated_bytes > 6 * GiB  # the weights alone are ~6.6 GiB in fp16
    assert len(sdxl_free.step_seconds) == 4
    # one call: its own peaks are the run's (the allocator's counters restart when a call begins)
    (call,) = sdxl_free.calls
    assert call.peak_torch_allocated_bytes == sdxl_free.peak_torch_allocated_bytes
    assert 0 < call.peak_torch_reserved_bytes <= call.peak_vram_bytes <= sdxl_free.peak_vram_bytes
    printed = re.search(r"peak allocated (\d+) reserved (\d+)", sdxl_free.output_tail).groups()
    assert [sdxl_free.peak_torch_allocated_bytes, sdxl_free.peak_torch_reserved_bytes] == list(map(int, printed))


@pytest.mark.gpu
def test_gpu_cap_below_the_weights_is_an_oom_at_load(sdxl_free, tmp_path):
    result = run_trial(RANDOM_PIPELINE, args=["sdxl-base", "--steps", "4"], vram_cap="4GiB", log_dir=tmp_path)
    assert result.outcome == "cuda_oom" and result.stage == "load", result.output_tail
    assert result.oom.allowed_bytes is not None and result.oom.allowed_bytes < 4 * GiB
    assert result.cuda_context_bytes > 0 and "Simulated a 4.00 GiB card" in result.simulation
    assert result.gpu_memory_released is True


@pytest.mark.gpu
def test_gpu_cap_below_the_peak_is_an_oom_after_load(sdxl_free, tmp_path):
    # Below what PyTorch allocated at the peak (not reserved: under a cap the allocator frees its cache
    # and retries, so a cap below the free run's reservation can still pass). The weights still fit.
    context = sdxl_free.peak_vram_bytes - sdxl_free.peak_torch_reserved_bytes
    cap = context + int(sdxl_free.peak_torch_allocated_bytes * 0.8)
    result = run_trial(RANDOM_PIPELINE, args=["sdxl-base", "--steps", "4"], vram_cap=cap, log_dir=tmp_path)
    assert result.outcome == "cuda_oom", result.output_tail
    assert result.stage in ("text_encode", "denoise", "vae_decode")
    assert result.peak_torch_reserved_bytes <= cap


@pytest.mark.gpu
def test_gpu_cap_above_the_peak_runs_and_keeps_the_allocator_under_it(sdxl_free, tmp_path):
    cap = sdxl_free.peak_vram_bytes + GiB
    result = run_trial(RANDOM_PIPELINE, args=["sdxl-base", "--steps", "4"], vram_cap=cap, log_dir=tmp_path)
    assert result.outcome == "ok", result.output_tail
    assert result.peak_torch_reserved_bytes <= cap - result.cuda_context_bytes
    assert_peaks_agree(result)


def test_the_allocator_the_script_ran_with_is_reported(tiny_dirs, tmp_path):
    """A plan's default allocator setting reaches the child before torch starts, and the trial says so."""
    patched = trial("tiny_flux.py", tiny_dirs["flux"], 1, 1, plan={"offload": "none"}, cwd=tmp_path)
    assert patched.outcome == "ok", patched.output_tail
    assert patched.allocator == "expandable_segments:True"
    plain = trial("tiny_flux.py", tiny_dirs["flux"], 1, 1, plan={"allocator": "default"}, cwd=tmp_path)
    assert plain.outcome == "ok" and plain.allocator == (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default")
