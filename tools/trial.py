"""run_trial: run the user's script, or a plan applied to it, and measure what really happened.

The script runs in a child process (tools/trial_runner.py instruments it without editing it) while
this process samples the child tree's device memory (NVML) and RSS (psutil), reports progress from
the child's events, and enforces the timeout, cancellation and an optional RAM cap by stopping the
whole tree (tools/process_tree.py holds it, whatever the script starts). What the run left is read
by the pure functions of tools/trial_report.py: timings, the stage, and the outcome (ok, cuda_oom,
host_oom, timeout, cancelled, error), with triage_oom reading the numbers out of an OOM message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from . import trial_runner
from .errors import PipefitError
from .hardware import cgroup_oom_kills
from .measure import cache_dir
from .plan import Plan
from .process_tree import Containment, ProcessTree
from .sampler import Nvml, TreeSampler, VramSource
from .trial_report import (
    CallTiming, Outcome, StoppedFor, call_phase, call_timings, classify, describe, phase_after, simulation, torch_peaks,
)  # fmt: skip
from .triage import OomTriage, Stage
from .units import format_bytes, parse_size

__all__ = ["CallTiming", "TrialResult", "run_trial"]

DEFAULT_TIMEOUT_S = 1800.0
MIN_RAM_CAP_BYTES = 64 * 2**20  # a Python interpreter and the runner, before the script imports anything
_POLL_S = 0.05
_GRACE_S = 3.0  # between SIGTERM and SIGKILL, for a script that cleans up on SIGTERM
_CANCEL_GRACE_S = 1.0  # a caller who cancelled is waiting: a second, then SIGKILL
_HEARTBEAT_S = 5.0  # progress while nothing else happens (loading)
_TAIL_LINES, _TAIL_CHARS = 40, 4000
KEEP_TRIALS_DAYS = 14  # the default log folder keeps two weeks of trials ...
KEEP_TRIALS_BYTES = 2 * 2**30  # ... and at most this much of them, newest first


class TrialResult(BaseModel):
    """What happened when the script ran; bytes and seconds, null where this machine cannot tell."""

    outcome: Outcome
    seconds: float = Field(description="wall time of the child process")
    peak_vram_bytes: int | None = Field(
        None, description="device memory at its peak as the driver saw it (NVML, sampled every 20 ms), on one GPU"
    )
    peak_torch_allocated_bytes: int | None = None
    peak_torch_reserved_bytes: int | None = None
    peak_rss_bytes: int = Field(description="resident memory of the child's process tree at its peak")
    peak_rss_load_bytes: int | None = Field(None, description="the RSS peak before the first pipeline call: loading")
    peak_rss_run_bytes: int | None = Field(None, description="the RSS peak from the first pipeline call on")
    peak_held_bytes: int | None = Field(
        None, description="the peak of the RSS the machine must hold: anonymous and shared pages (heap, pinned "
        "copies), without mapped weight files the kernel can drop; what `ram_cap` limits (Linux; else the RSS)"
    )
    peak_held_load_bytes: int | None = Field(None, description="the held peak before the first pipeline call")
    peak_held_run_bytes: int | None = Field(None, description="the held peak from the first pipeline call on")
    peak_vram_load_bytes: int | None = Field(
        None, description="the driver's peak before the first pipeline call: loading (recommend's 'load' stage)"
    )
    step_seconds: list[float] = Field(description="the last pipeline call's steps; every call's are in calls")
    vram_cap_bytes: int | None = None
    oom: OomTriage | None = None
    error: str | None = None
    log_path: str
    output_tail: str
    script: str
    ran: str = Field(description="the file that ran: the script, or its patched copy when a plan was given")
    patch_edits: list[str] = Field(default_factory=list)
    exit_code: int | None = Field(None, description="the child's exit status; negative: the signal that ended it")
    stage: Stage | None = Field(None, description="where a failed run stopped")
    seconds_before_first_call: float | None = Field(None, description="imports and loading, up to the first call")
    calls: list[CallTiming] = Field(default_factory=list)
    vram_source: VramSource | None = Field(
        None, description="nvml_process: the child's own processes; nvml_device: the device's growth since start"
    )
    gpu_memory_released: bool | None = Field(None, description="the child's device memory was free after it ended")
    ram_cap_bytes: int | None = None
    cuda_context_bytes: int | None = Field(None, description="measured when a VRAM cap is simulated")
    allocator: str | None = Field(
        None, description="PYTORCH_CUDA_ALLOC_CONF as the script's first pipeline call saw it ('default': unset)"
    )
    simulation: str | None = Field(None, description="what a simulated VRAM cap covers and what it does not")
    containment: Containment | None = Field(
        None, description="how the script's processes were held and stopped: cgroup (all of them), subreaper "
        "(orphans too), session (its process group and what was seen)"
    )
    warnings: list[str] = Field(default_factory=list)


def run_trial(
    script: str | Path,
    plan: str | dict | Plan | None = None,
    *,
    replace: bool = False,
    args: Sequence[str] = (),
    vram_cap: str | int | None = None,
    ram_cap: str | int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    cwd: str | Path | None = None,
    python: str | None = None,
    log_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> TrialResult:
    """Run a script in a child process and measure its real peaks and times; classify how it ended.

    ``script`` runs as ``python script ARGS`` would (in ``cwd``, default the current folder, with
    ``python``, default this interpreter); the file is never modified. With ``plan`` (Plan, dict,
    inline JSON or a JSON file) the script is first patched into a copy next to the log (additive, as
    patch_script; ``replace`` makes the plan complete), and the copy runs. Measures: peak VRAM as the
    driver sees it (NVML; null without a GPU), PyTorch's allocated and reserved peaks, peak RSS of the child tree, wall time, each pipeline call's step times (via
    callback_on_step_end) and the time before the first step and after the last.
    ``vram_cap`` (e.g. "12GiB") simulates a smaller card: PyTorch's allocator is capped at the cap
    minus the measured CUDA context. ``ram_cap`` stops the run when the tree's held RAM passes it
    (a simulated host limit, at least 64 MiB: the RSS less file-backed pages such as mapped weight files,
    which a machine that size drops and reads again; ``peak_held_bytes``). ``timeout`` seconds (None: no limit) stops the whole tree, and so does
    setting ``cancel`` from another thread.
    Outcome: ok, cuda_oom (numbers and stage in ``oom``), host_oom, timeout, cancelled or error; the output's
    tail is in the result, the full log at ``log_path``. Next step on an OOM: recommend with a
    smaller budget, or triage_oom on the log.
    """
    path = _readable_script(script)
    workdir = Path(cwd).expanduser() if cwd is not None else Path.cwd()
    if not workdir.is_dir():
        raise PipefitError(f"The working folder {str(cwd)!r} does not exist.", "Pass an existing folder as `cwd`.")
    if timeout is not None and timeout <= 0:
        raise PipefitError(f"`timeout` must be positive, not {timeout}.", "Pass seconds, or None for no limit.")
    cap = parse_size(vram_cap, "vram_cap") if vram_cap is not None else None
    ram_limit = parse_size(ram_cap, "ram_cap") if ram_cap is not None else None
    if ram_limit is not None and ram_limit < MIN_RAM_CAP_BYTES:
        raise PipefitError(
            f"`ram_cap` {format_bytes(ram_limit)} is below the {format_bytes(MIN_RAM_CAP_BYTES)} a Python "
            "interpreter needs to start: the run could only be stopped at once.",
            "Give the RAM of the machine to simulate, e.g. 32GiB.",
        )
    patched = None
    if plan is not None:  # before anything is written: a plan that does not apply stops here
        from .patch import patch_script

        patched = patch_script(path, plan, replace=replace)
    nvml = Nvml()
    try:
        gpu = _cap_device(nvml, cap) if cap is not None else None
        trial_dir = _new_trial_dir(log_dir, path)
        ran, edits, warnings = path, [], []
        if patched is not None:
            ran, edits, warnings = trial_dir / path.name, patched.edits, list(patched.warnings)
            ran.write_text(patched.source, encoding="utf-8")
        spec = _Spec(
            script=path, ran=ran, args=list(args), python=python or sys.executable, workdir=workdir,
            trial_dir=trial_dir, timeout=timeout, vram_cap=cap, gpu=gpu, ram_cap=ram_limit,
            patch_edits=edits, warnings=warnings,
        )  # fmt: skip
        return _execute(spec, nvml, progress or (lambda message: None), cancel)
    finally:
        nvml.close()


def _readable_script(script: str | Path) -> Path:
    path = Path(script).expanduser().resolve()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise PipefitError(f"The script {str(script)!r} {what}.", "Pass the path of the Python script to run.")
    return path


def _new_trial_dir(log_dir: str | Path | None, script: Path) -> Path:
    """A new folder for this trial's log, events and patched copy; the default folder is pruned first."""
    if log_dir is None:
        root = cache_dir() / "trials"
        prune_trials(root)
    else:
        root = Path(log_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-{script.stem}-", dir=root))


def prune_trials(
    root: Path, max_age_days: float = KEEP_TRIALS_DAYS, max_bytes: int = KEEP_TRIALS_BYTES, now: float | None = None
) -> list[Path]:
    """Remove trial folders under ``root`` older than ``max_age_days``, then the oldest until the rest
    hold at most ``max_bytes``; a folder written to in the last hour (a trial may be running) stays.
    Only folders named as run_trial names them are touched. Returns those removed."""
    now = time.time() if now is None else now
    if not root.is_dir():
        return []
    trials = []
    for folder in root.iterdir():
        if not (folder.is_dir() and not folder.is_symlink() and folder.name[:8].isdigit() and folder.name[8:9] == "-"):
            continue
        stats = [f.stat() for f in folder.rglob("*") if f.is_file() and not f.is_symlink()]
        latest = max((st.st_mtime for st in stats), default=folder.stat().st_mtime)
        trials.append((latest, sum(st.st_size for st in stats), folder))
    trials.sort(reverse=True)  # newest first
    removed, kept_bytes = [], 0
    for latest, size, folder in trials:
        recent = now - latest < 3600
        if not recent and (now - latest > max_age_days * 86400 or kept_bytes + size > max_bytes):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        else:
            kept_bytes += size
    return removed


def _cap_device(nvml: Nvml, cap: int) -> tuple[int, int]:
    """(index, total bytes) of the GPU the child's torch will call cuda:0; refuses caps it cannot simulate."""
    if not nvml.available:
        raise PipefitError(
            "A VRAM cap simulates a smaller NVIDIA GPU on a bigger one, and NVML finds no GPU here.",
            "Run without `vram_cap`, or on a machine with an NVIDIA GPU.",
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    totals = nvml.total()
    index = int(visible) if visible.isdigit() and int(visible) < len(totals) else 0
    total = totals[index]
    if cap >= total:
        raise PipefitError(
            f"The VRAM cap {format_bytes(cap)} is not below this GPU's {format_bytes(total)}: nothing to simulate.",
            "Give a smaller cap, or run without one.",
        )
    return index, total


# ---- running it -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything fixed about one run before it starts."""

    script: Path
    ran: Path
    args: list[str]
    python: str
    workdir: Path
    trial_dir: Path
    timeout: float | None
    vram_cap: int | None
    gpu: tuple[int, int] | None  # (index, total bytes) of the GPU a VRAM cap applies to
    ram_cap: int | None
    patch_edits: list[str]
    warnings: list[str]

    @property
    def log_path(self) -> Path:
        return self.trial_dir / "output.log"

    @property
    def events_path(self) -> Path:
        return self.trial_dir / "events.jsonl"


class _EventLog:
    """The child's events file, read as it grows: complete lines only."""

    def __init__(self, path: Path):
        self.path, self.events, self._offset = path, [], 0

    def read(self) -> list[dict]:
        """The events appended since the last read."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.events += new
        return new


def _execute(spec: _Spec, nvml: Nvml, progress: Callable[[str], None], cancel: threading.Event | None) -> TrialResult:
    tree = ProcessTree()
    sampler = TreeSampler(tree.members, nvml)  # before the child starts: its baseline is the others'
    config = {"events": str(spec.events_path), "import_dir": str(spec.script), "vram_cap_bytes": spec.vram_cap,
              "cgroup": str(tree.cgroup) if tree.cgroup else None}  # fmt: skip
    if spec.gpu is not None:
        config["others_bytes"], config["nvml_index"] = sampler.baseline_used[spec.gpu[0]], spec.gpu[0]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", trial_runner.CONFIG_ENV: json.dumps(config), **tree.environment}
    oom_kills_before = cgroup_oom_kills()
    events = _EventLog(spec.events_path)
    progress(f"running {spec.ran.name}")
    started = time.monotonic()
    try:
        with open(spec.log_path, "wb") as log:
            try:
                child = subprocess.Popen(
                    [spec.python, trial_runner.__file__, str(spec.ran), *spec.args], cwd=spec.workdir, env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=os.name == "posix",
                )  # fmt: skip
            except OSError as exc:
                raise PipefitError(f"Cannot start {spec.python!r}: {exc.strerror}.", "Pass an existing interpreter.") from None
        tree.adopt(child.pid)
        sampler.set_phase("load")
        sampler.start()
        stopped_for = None
        try:
            stopped_for = _watch(child, tree, sampler, events, spec, progress, cancel, started)
        finally:
            sampler.stop()
            if child.poll() is None:  # interrupted (Ctrl-C): leave nothing running
                _stop(tree, child, _CANCEL_GRACE_S)
        seconds = time.monotonic() - started
        leftovers = _stop_leftovers(tree, child)
    finally:
        tree.close()
    events.read()
    containment = _joined(events, tree)
    oom_kills = cgroup_oom_kills()
    oom_killed = None if oom_kills is None or oom_kills_before is None else oom_kills > oom_kills_before
    result = _result(spec, events.events, sampler, child.returncode, seconds, stopped_for, oom_killed)
    result.containment = containment
    result.warnings += leftovers
    result.gpu_memory_released = _wait_released(sampler)
    progress(f"{result.outcome} after {seconds:.1f} s")
    return result


def _joined(events: _EventLog, tree: ProcessTree) -> Containment:
    """How the tree was held: in its cgroup if the runner got in (its start event says), else by the subreaper."""
    start = next((e for e in events.events if e["event"] == "start"), None)
    if start is not None and start.get("cgroup") == "joined":
        return "cgroup"
    return "subreaper" if tree.subreaper else "session"


def _watch(
    child: subprocess.Popen, tree: ProcessTree, sampler: TreeSampler, events: _EventLog, spec: _Spec,
    progress: Callable[[str], None], cancel: threading.Event | None, started: float,
) -> StoppedFor | None:  # fmt: skip
    """Wait for the child, reporting progress; stop the tree at the timeout, the RAM cap or a cancel."""
    last_report, calls_started = started, 0
    while child.poll() is None:
        for event in events.read():
            last_report = time.monotonic()
            calls_started += event["event"] == "call_start"
            if (phase := phase_after(event, calls_started)) is not None:
                sampler.set_phase(phase)
            if message := describe(event, events.events):
                progress(message)
        now = time.monotonic()
        if cancel is not None and cancel.is_set():
            progress("cancelled: stopping the script")
            _stop(tree, child, _CANCEL_GRACE_S)
            return "cancelled"
        if spec.timeout is not None and now - started > spec.timeout:
            progress(f"timeout after {spec.timeout:g} s: stopping the script")
            _stop(tree, child, _GRACE_S)
            return "timeout"
        # file pages (weights mapped while they are read) do not count: a machine that size drops and re-reads them
        if spec.ram_cap is not None and sampler.held_bytes > spec.ram_cap:
            progress(f"held RAM {format_bytes(sampler.held_bytes)} (RSS {format_bytes(sampler.rss_bytes)}) "
                     "passed the RAM cap: stopping the script")  # fmt: skip
            _stop(tree, child, _GRACE_S)
            return "ram_cap"
        if now - last_report > _HEARTBEAT_S:
            last_report = now
            vram = sampler.peak_vram_bytes
            progress(f"{now - started:.0f} s, RAM {format_bytes(sampler.rss_bytes)}"
                     + (f", peak VRAM {format_bytes(vram)}" if vram else ""))  # fmt: skip
        time.sleep(_POLL_S)
    return None


def _stop(tree: ProcessTree, child: subprocess.Popen, grace: float) -> None:
    """Stop the whole tree: SIGTERM, then SIGKILL after ``grace``; reap the child."""
    tree.stop(grace, root_exited=lambda: child.poll() is not None)
    child.wait()


def _stop_leftovers(tree: ProcessTree, child: subprocess.Popen) -> list[str]:
    """Processes the script started and left running when it ended: stopped, and said so."""
    left = [p for p in tree.members() if p.pid != child.pid]
    if not left:
        return []
    tree.stop(0.0)
    return [f"The script left {len(left)} process(es) running when it ended; pipefit stopped them."]


def _wait_released(sampler: TreeSampler, patience: float = 10.0) -> bool | None:
    deadline = time.monotonic() + patience
    while (holds := sampler.tree_holds_gpu_memory()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return None if holds is None else not holds


# ---- what it measured -----------------------------------------------------------------------------


def _run_peak(by_phase: dict[str, int]) -> int | None:
    """The peak from the first pipeline call on: every phase but loading."""
    return max((v for phase, v in by_phase.items() if phase != "load"), default=None)


def _result(
    spec: _Spec, events: list[dict], sampler: TreeSampler, exit_code: int | None, seconds: float,
    stopped_for: StoppedFor | None, oom_killed: bool | None,
) -> TrialResult:  # fmt: skip
    calls, before_first, allocator = call_timings(events)
    allocated, reserved = torch_peaks(events)
    vram_by_phase, rss_by_phase = sampler.peak_vram_by_phase, sampler.peak_rss_by_phase
    for number, call in enumerate(calls, start=1):
        call.peak_rss_bytes = rss_by_phase.get(call_phase(number))
        if (call_vram := vram_by_phase.get(call_phase(number))) is not None:
            call.peak_vram_bytes = max(call_vram, call.peak_torch_reserved_bytes or 0)
    # A spike shorter than the sampling interval can slip by; the driver held at least what the allocator did.
    peak_vram = max(sampler.peak_vram_bytes, reserved or 0) if sampler.peak_vram_bytes is not None else None
    source = _source(spec.ran)
    verdict = classify(
        events, exit_code, stopped_for, _tail(spec.log_path, lines=200, chars=20000), source=source,
        timeout=spec.timeout, peak_held=sampler.peak_held_bytes, ram_cap=spec.ram_cap, oom_killed=oom_killed,
    )  # fmt: skip
    done = [c for c in calls if c.step_seconds]
    result = TrialResult(
        outcome=verdict.outcome, error=verdict.error, oom=verdict.oom, stage=verdict.stage,
        seconds=round(seconds, 3), log_path=str(spec.log_path), output_tail=_tail(spec.log_path),
        script=str(spec.script), ran=str(spec.ran), exit_code=exit_code,
        peak_vram_bytes=peak_vram, peak_torch_allocated_bytes=allocated, peak_torch_reserved_bytes=reserved,
        peak_rss_bytes=sampler.peak_rss_bytes, peak_rss_load_bytes=rss_by_phase.get("load"),
        peak_rss_run_bytes=_run_peak(rss_by_phase), peak_held_bytes=sampler.peak_held_bytes,
        peak_held_load_bytes=sampler.peak_held_by_phase.get("load"), peak_held_run_bytes=_run_peak(sampler.peak_held_by_phase),
        peak_vram_load_bytes=vram_by_phase.get("load"), vram_source=sampler.vram_source,
        step_seconds=done[-1].step_seconds if done else [], calls=calls, seconds_before_first_call=before_first,
        allocator=allocator, vram_cap_bytes=spec.vram_cap, ram_cap_bytes=spec.ram_cap,
        patch_edits=spec.patch_edits, warnings=list(spec.warnings),
    )  # fmt: skip
    if spec.vram_cap is not None:
        result.simulation, result.cuda_context_bytes = simulation(events, spec.vram_cap, *spec.gpu)
        over = (peak_vram or 0) - spec.vram_cap
        if over > 0:
            result.warnings.append(
                f"The driver-level peak ({format_bytes(peak_vram)}) passed the cap by {format_bytes(over)}: on a "
                "real card of that size this run could fail."
            )
    return result


def _source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _tail(path: Path, lines: int = _TAIL_LINES, chars: int = _TAIL_CHARS) -> str:
    """The end of the log as a terminal would show it: a progress bar's redraws collapsed to the last."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * chars))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(shown[-lines:])[-chars:]
