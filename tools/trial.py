"""run_trial: run the user's script, or a plan applied to it, and measure what really happened.

The script runs in a child process (tools/trial_runner.py instruments it without editing it) while
this process samples the child tree's device memory (NVML) and RSS (psutil), reports progress from
the child's events, and enforces the timeout and an optional RAM cap by stopping the whole tree.
The outcome is classified (ok, cuda_oom, host_oom, timeout, error) from the child's exception, its
exit status and its log, with triage_oom reading the numbers out of an OOM message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, Field

from . import trial_runner
from .errors import PipefitError
from .hardware import cgroup_oom_kills
from .measure import cache_dir
from .plan import Plan
from .sampler import Nvml, TreeSampler, VramSource
from .triage import OomTriage, Stage, triage_oom
from .units import format_bytes, parse_size

Outcome = Literal["ok", "cuda_oom", "host_oom", "timeout", "cancelled", "error"]
DEFAULT_TIMEOUT_S = 1800.0
_POLL_S = 0.05
_GRACE_S = 3.0  # between SIGTERM and SIGKILL
_HEARTBEAT_S = 5.0  # progress while nothing else happens (loading)
_TAIL_LINES, _TAIL_CHARS = 40, 4000


class CallTiming(BaseModel):
    """One pipeline call, timed from the child's events (seconds)."""

    pipeline: str
    ok: bool = Field(description="the call returned (False: it raised, or the run was stopped in it)")
    seconds: float | None = None
    before_first_step_seconds: float | None = Field(
        None, description="call start to the denoising loop: prompt encoding, latents, offload transfers"
    )
    step_seconds: list[float] = Field(default_factory=list)
    steps_expected: int | None = None
    after_last_step_seconds: float | None = Field(None, description="the last step to the return: VAE decode")
    peak_vram_bytes: int | None = Field(None, description="the driver's peak during this call, as sampled")
    peak_torch_allocated_bytes: int | None = Field(None, description="PyTorch's peak during this call alone")
    peak_torch_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = Field(None, description="the tree's RSS peak during this call, as sampled")


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
    warnings: list[str] = Field(default_factory=list)


def run_trial(
    script: str | Path,
    plan: str | dict | Plan | None = None,
    *,
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
    inline JSON or a JSON file) the script is first patched into a copy next to the log, and the copy
    runs. Measures: peak VRAM as the driver sees it (NVML; null without a GPU), PyTorch's allocated
    and reserved peaks, peak RSS of the child tree, wall time, each pipeline call's step times (via
    callback_on_step_end) and the time before the first step and after the last.
    ``vram_cap`` (e.g. "12GiB") simulates a smaller card: PyTorch's allocator is capped at the cap
    minus the measured CUDA context. ``ram_cap`` stops the run when the tree's RSS passes it (a
    simulated host limit). ``timeout`` seconds (None: no limit) stops the whole tree, and so does
    setting ``cancel`` from another thread.
    Outcome: ok, cuda_oom (numbers and stage in ``oom``), host_oom, timeout, cancelled or error; the output's
    tail is in the result, the full log at ``log_path``. Next step on an OOM: recommend with a
    smaller budget, or triage_oom on the log.
    """
    path = _readable_script(script)
    workdir = Path(cwd).expanduser() if cwd is not None else Path.cwd()
    if not workdir.is_dir():
        raise PipefitError(f"The working folder {str(cwd)!r} does not exist.", "Pass an existing folder as cwd.")
    if timeout is not None and timeout <= 0:
        raise PipefitError(f"The timeout must be positive, not {timeout}.", "Pass seconds, or None for no limit.")
    cap = parse_size(vram_cap) if vram_cap is not None else None
    ram_limit = parse_size(ram_cap) if ram_cap is not None else None
    patched = None
    if plan is not None:  # before anything is written: a plan that does not apply stops here
        from .patch import patch_script

        patched = patch_script(path, plan)
    nvml = Nvml()
    try:
        gpu = _cap_device(nvml, cap) if cap is not None else None
        trial_dir = _new_trial_dir(log_dir, path)
        ran, edits, warnings = path, [], []
        if patched is not None:
            ran, edits, warnings = trial_dir / path.name, patched.edits, list(patched.warnings)
            ran.write_text(patched.source, encoding="utf-8")
        run = _Run(
            script=path, ran=ran, args=list(args), python=python or sys.executable, workdir=workdir,
            trial_dir=trial_dir, timeout=timeout, vram_cap=cap, gpu=gpu, ram_cap=ram_limit, nvml=nvml,
            progress=progress or (lambda message: None), patch_edits=edits, warnings=warnings, cancel=cancel,
        )  # fmt: skip
        return run.execute()
    finally:
        nvml.close()


def _readable_script(script: str | Path) -> Path:
    path = Path(script).expanduser().resolve()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise PipefitError(f"The script {str(script)!r} {what}.", "Pass the path of the Python script to run.")
    return path


def _new_trial_dir(log_dir: str | Path | None, script: Path) -> Path:
    root = Path(log_dir).expanduser() if log_dir is not None else cache_dir() / "trials"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-{script.stem}-", dir=root))


def _cap_device(nvml: Nvml, cap: int) -> tuple[int, int]:
    """(index, total bytes) of the GPU the child's torch will call cuda:0; refuses caps it cannot simulate."""
    if not nvml.available:
        raise PipefitError(
            "A VRAM cap simulates a smaller NVIDIA GPU on a bigger one, and NVML finds no GPU here.",
            "Run without --vram-cap, or on a machine with an NVIDIA GPU.",
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


@dataclass
class _Run:
    """One child process, from spawn to classified result."""

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
    nvml: Nvml
    progress: Callable[[str], None]
    patch_edits: list[str]
    warnings: list[str]
    cancel: threading.Event | None = None
    events: list[dict] = field(default_factory=list)
    sampler: TreeSampler = field(init=False)
    _read_offset: int = 0
    _calls_started: int = 0

    def __post_init__(self):
        self.sampler = TreeSampler(self.nvml)  # before the child starts: its baseline is the others'

    @property
    def log_path(self) -> Path:
        return self.trial_dir / "output.log"

    @property
    def events_path(self) -> Path:
        return self.trial_dir / "events.jsonl"

    def execute(self) -> TrialResult:
        config = {"events": str(self.events_path), "import_dir": str(self.script), "vram_cap_bytes": self.vram_cap}
        sampler = self.sampler
        if self.gpu is not None:
            config["others_bytes"] = sampler.baseline_used[self.gpu[0]]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", trial_runner.CONFIG_ENV: json.dumps(config)}
        command = [self.python, trial_runner.__file__, str(self.ran), *self.args]
        oom_kills_before = cgroup_oom_kills()
        self.progress(f"running {self.ran.name}")
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            try:
                child = subprocess.Popen(
                    command, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=os.name == "posix",
                )  # fmt: skip
            except OSError as exc:
                raise PipefitError(f"Cannot start {self.python!r}: {exc.strerror}.", "Pass an existing interpreter.")
        sampler.set_phase("load")
        sampler.start(child.pid)
        stopped_for, max_rss = None, None
        try:
            stopped_for, max_rss = self._watch(child, started)
        finally:
            sampler.stop()
            if child.returncode is None:  # interrupted (Ctrl-C): leave nothing running
                self._stop_tree(child)
        seconds = time.monotonic() - started
        leftovers = self._stop_leftovers(child)
        self._read_events()
        result = TrialResult(
            outcome="ok", seconds=round(seconds, 3), step_seconds=[], log_path=str(self.log_path),
            output_tail=_tail(self.log_path), script=str(self.script), ran=str(self.ran),
            peak_rss_bytes=max(sampler.peak_rss_bytes, max_rss or 0),
            peak_rss_load_bytes=sampler.peak_rss_by_phase.get("load"),
            peak_rss_run_bytes=max(
                (v for phase, v in sampler.peak_rss_by_phase.items() if phase != "load"), default=None
            ),
            peak_vram_load_bytes=sampler.peak_vram_by_phase.get("load"),
            vram_source=sampler.vram_source,
            vram_cap_bytes=self.vram_cap, ram_cap_bytes=self.ram_cap, patch_edits=self.patch_edits,
            exit_code=child.returncode, warnings=self.warnings + leftovers,
        )  # fmt: skip
        self._add_timings(result)
        self._add_peaks(result)
        self._classify(result, stopped_for, oom_kills_before)
        if self.vram_cap is not None:
            self._describe_simulation(result)
        result.gpu_memory_released = self._wait_released()
        self.progress(f"{result.outcome} after {seconds:.1f} s")
        return result

    # ---- while it runs ------------------------------------------------------------------------

    def _watch(self, child: subprocess.Popen, started: float) -> tuple[str | None, int | None]:
        """Wait for the child, reporting progress; stop it at the timeout or the RAM cap."""
        last_report = started
        while True:
            exited, max_rss = _reap(child, block=False)
            if exited:
                return None, max_rss
            if self._read_events():
                last_report = time.monotonic()
            now = time.monotonic()
            if self.cancel is not None and self.cancel.is_set():
                self.progress("cancelled: stopping the script")
                return "cancelled", self._stop_tree(child)
            if self.timeout is not None and now - started > self.timeout:
                self.progress(f"timeout after {self.timeout:g} s: stopping the script")
                return "timeout", self._stop_tree(child)
            if self.ram_cap is not None and self.sampler.rss_bytes > self.ram_cap:
                self.progress(f"RSS {format_bytes(self.sampler.rss_bytes)} passed the RAM cap: stopping the script")
                return "ram_cap", self._stop_tree(child)
            if now - last_report > _HEARTBEAT_S:
                last_report = now
                vram = self.sampler.peak_vram_bytes
                self.progress(
                    f"{now - started:.0f} s, RAM {format_bytes(self.sampler.rss_bytes)}"
                    + (f", peak VRAM {format_bytes(vram)}" if vram else "")
                )
            time.sleep(_POLL_S)

    def _read_events(self) -> bool:
        """Take the complete lines the child appended since the last read; report them as progress."""
        try:
            with open(self.events_path, "rb") as f:
                f.seek(self._read_offset)
                data = f.read()
        except FileNotFoundError:
            return False
        complete = data[: data.rfind(b"\n") + 1]
        self._read_offset += len(complete)
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        for event in new:
            self.events.append(event)
            if event["event"] == "call_start":
                self._calls_started += 1
                self.sampler.set_phase(_call_phase(self._calls_started))
            elif event["event"] == "call_end":
                self.sampler.set_phase("between calls")
            if message := self._describe(event):
                self.progress(message)
        return bool(new)

    def _describe(self, event: dict) -> str | None:
        kind = event["event"]
        if kind == "start":
            return f"started (pid {event['pid']})"
        if kind == "call_start":
            return f"{event['pipeline']}: called (encoding the prompt)"
        if kind == "loop_start":
            return f"denoising, {event['total']} steps" if event.get("total") else "denoising"
        if kind == "step":
            return f"step {event['index'] + 1}/{_loop_total(self.events) or '?'}"
        if kind == "call_end" and event.get("ok"):
            return "call done"
        return None

    def _stop_tree(self, child: subprocess.Popen) -> int | None:
        """SIGTERM the child, its session and its tree; SIGKILL what is left after a grace. Returns
        the child's peak RSS where the OS reports it."""
        tree = _tree(child.pid, self.sampler)
        max_rss = None
        for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
            if child.returncode is None:
                child.send_signal(sig)
            if os.name == "posix":
                try:
                    os.killpg(child.pid, sig)  # also reaches what started after the listing
                except (ProcessLookupError, PermissionError):
                    pass
            for process in tree:
                try:
                    process.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = time.monotonic() + _GRACE_S
            while time.monotonic() < deadline:
                exited, rss = _reap(child, block=False)
                max_rss = rss if rss is not None else max_rss
                if exited and not any(_running(p) for p in tree):
                    return max_rss
                time.sleep(_POLL_S)
        _, rss = _reap(child, block=True)
        return rss if rss is not None else max_rss

    def _stop_leftovers(self, child: subprocess.Popen) -> list[str]:
        """Processes the script started and left running when it ended: stopped, and said so."""
        left = [p for p in _tree(child.pid, self.sampler) if _running(p)]
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        _wait_stopped(left)
        return [f"The script left {len(left)} process(es) running when it ended; pipefit stopped them."] if left else []

    def _wait_released(self, patience: float = 10.0) -> bool | None:
        deadline = time.monotonic() + patience
        while (holds := self.sampler.tree_holds_gpu_memory()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return None if holds is None else not holds

    # ---- after it ended -----------------------------------------------------------------------

    def _add_timings(self, result: TrialResult) -> None:
        start = next((e["t"] for e in self.events if e["event"] == "start"), None)
        call = loop_t = last_t = None
        for event in self.events:
            kind, t = event["event"], event["t"]
            if kind == "call_start":
                call = CallTiming(pipeline=event["pipeline"], ok=False)
                call_t, loop_t, last_t = t, None, None
                result.calls.append(call)
                if result.seconds_before_first_call is None and start is not None:
                    result.seconds_before_first_call = round(t - start, 3)
                result.allocator = result.allocator or event.get("allocator")
            elif call is None:
                continue
            elif kind == "loop_start":
                if call.before_first_step_seconds is None:
                    call.before_first_step_seconds = round(t - call_t, 4)
                call.steps_expected = (call.steps_expected or 0) + (event.get("total") or 0) or None
                loop_t = last_t = t
            elif kind == "step":
                call.step_seconds.append(round(t - (last_t if last_t is not None else call_t), 4))
                last_t = t
            elif kind == "call_end":
                call.ok = bool(event.get("ok"))
                call.peak_torch_allocated_bytes = event.get("allocated")
                call.peak_torch_reserved_bytes = event.get("reserved")
                call.seconds = round(t - call_t, 4)
                if last_t is not None and loop_t is not None and call.step_seconds:
                    call.after_last_step_seconds = round(t - last_t, 4)
                call = None
        done = [c for c in result.calls if c.step_seconds]
        result.step_seconds = done[-1].step_seconds if done else []

    def _add_peaks(self, result: TrialResult) -> None:
        allocated = [e["allocated"] for e in self.events if "allocated" in e]
        reserved = [e["reserved"] for e in self.events if "reserved" in e]
        result.peak_torch_allocated_bytes = max(allocated, default=None)
        result.peak_torch_reserved_bytes = max(reserved, default=None)
        vram = self.sampler.peak_vram_bytes
        if vram is not None:
            # A spike shorter than the sampling interval can slip by; the driver held at least what the allocator did.
            result.peak_vram_bytes = max(vram, result.peak_torch_reserved_bytes or 0)
        vram_by_phase, rss_by_phase = self.sampler.peak_vram_by_phase, self.sampler.peak_rss_by_phase
        for number, call in enumerate(result.calls, start=1):
            call.peak_rss_bytes = rss_by_phase.get(_call_phase(number))
            if (call_vram := vram_by_phase.get(_call_phase(number))) is not None:
                call.peak_vram_bytes = max(call_vram, call.peak_torch_reserved_bytes or 0)

    def _classify(self, result: TrialResult, stopped_for: str | None, oom_kills_before: int | None) -> None:
        code = result.exit_code
        exception = next((e for e in self.events if e["event"] == "exception"), None)
        result.stage = None if code == 0 and stopped_for is None else self._stage()
        if stopped_for == "timeout":
            result.outcome = "timeout"
            result.error = f"Ran past the {self.timeout:g} s timeout; pipefit stopped the script and its processes."
        elif stopped_for == "cancelled":
            result.outcome = "cancelled"
            result.error = "Cancelled by the caller; pipefit stopped the script and its processes."
        elif stopped_for == "ram_cap":
            result.outcome = "host_oom"
            result.error = (
                f"The script's processes reached {format_bytes(result.peak_rss_bytes)} of RAM, over the "
                f"{format_bytes(result.ram_cap_bytes)} cap; pipefit stopped them (a simulated host limit)."
            )
        elif code == 0:
            result.outcome = "ok"
        elif exception is not None:
            self._classify_exception(result, exception)
        else:
            self._classify_exit(result, code, oom_kills_before)
        if result.oom is not None and result.oom.stage is None:
            result.oom.stage = result.stage
        elif result.oom is not None:
            result.stage = result.oom.stage

    def _classify_exception(self, result: TrialResult, exception: dict) -> None:
        triage = triage_oom(exception["traceback"], script=self._source())
        message = exception["message"].strip().splitlines()[0] if exception["message"].strip() else ""
        result.error = f"{exception['type']}: {message}"[:500] if message else exception["type"]
        if exception["type"] == "OutOfMemoryError" or triage.kind in ("cuda_oom", "mps_oom", "alloc_failure"):
            result.outcome, result.oom = "cuda_oom", triage
        elif exception["type"] == "MemoryError" or triage.kind == "host_oom":
            result.outcome, result.oom = "host_oom", triage
        else:
            result.outcome = "error"

    def _classify_exit(self, result: TrialResult, code: int, oom_kills_before: int | None) -> None:
        """No Python exception: a signal, a C++ abort, or sys.exit(N). The log may still say why."""
        triage = triage_oom(_tail(self.log_path, lines=200, chars=20000), script=self._source())
        if triage.kind == "host_oom" or code == -signal.SIGKILL:
            result.outcome, result.oom = "host_oom", triage if triage.kind == "host_oom" else None
            oom_kills = cgroup_oom_kills()
            if triage.kind == "host_oom":
                result.error = triage.error
            elif oom_kills is not None and oom_kills_before is not None and oom_kills > oom_kills_before:
                result.error = "Killed by SIGKILL; the container's OOM-kill count rose: the host ran out of memory."
            else:
                result.error = (
                    "Killed by SIGKILL, which pipefit did not send: most likely the kernel's OOM killer or a "
                    "container memory limit."
                )
        elif triage.kind in ("cuda_oom", "alloc_failure"):
            result.outcome, result.oom, result.error = "cuda_oom", triage, triage.error
        elif code < 0:
            result.outcome, result.error = "error", f"Killed by signal {_signal_name(-code)}."
        else:
            cap_failed = next((e for e in self.events if e["event"] == "cap" and "error" in e), None)
            result.outcome = "error"
            result.error = (
                f"Could not simulate the VRAM cap: {cap_failed['error']}."
                if cap_failed
                else f"Exited with status {code}."
            )

    def _stage(self) -> Stage | None:
        """Where the run was when it stopped, from the last pipeline event."""
        calls = [e for e in self.events if e["event"] in ("call_start", "loop_start", "step", "call_end")]
        if not calls:
            return "load"
        last = calls[-1]
        if last["event"] == "call_start":
            return "text_encode"
        if last["event"] == "loop_start":
            return "denoise"
        if last["event"] == "step":
            total = _loop_total(self.events)
            return "vae_decode" if total is not None and last["index"] + 1 >= total else "denoise"
        return None  # between calls: the frames (triage) may tell

    def _describe_simulation(self, result: TrialResult) -> None:
        index, total = self.gpu
        cap_event = next((e for e in self.events if e["event"] == "cap"), None)
        if cap_event is None or "allocator_bytes" not in cap_event:
            result.simulation = "The VRAM cap was not applied: the script never imported torch, or had no CUDA."
            return
        context = cap_event["context_bytes"]
        result.cuda_context_bytes = context
        result.simulation = (
            f"Simulated a {format_bytes(result.vram_cap_bytes)} card on GPU {index} ({format_bytes(total)}): "
            f"PyTorch's allocator was capped at {format_bytes(cap_event['allocator_bytes'])}, the cap minus the "
            f"{format_bytes(context)} CUDA context measured at start. Not covered: device memory outside PyTorch's "
            "allocator that grows later (kernels loaded on first use, library handles; the driver-level peak "
            "shows it), another card's context size, and speed: the timings are this GPU's."
        )
        over = (result.peak_vram_bytes or 0) - (result.vram_cap_bytes or 0)
        if over > 0:
            result.warnings.append(
                f"The driver-level peak ({format_bytes(result.peak_vram_bytes)}) passed the cap by "
                f"{format_bytes(over)}: on a real card of that size this run could fail."
            )

    def _source(self) -> str | None:
        try:
            return self.ran.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None


def _call_phase(number: int) -> str:
    return f"call {number}"


def _reap(child: subprocess.Popen, block: bool) -> tuple[bool, int | None]:
    """(exited, the child's own peak RSS in bytes where the OS reports it) without losing its exit status."""
    if child.returncode is not None:
        return True, None
    if not hasattr(os, "wait4"):
        return (child.wait() if block else child.poll()) is not None, None
    try:
        pid, status, usage = os.wait4(child.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return True, None
    if pid == 0:
        return False, None
    child.returncode = os.waitstatus_to_exitcode(status)
    return True, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


def _loop_total(events: list[dict]) -> int | None:
    """The step count of the latest denoising loop, where the pipeline said it."""
    return next((e.get("total") for e in reversed(events) if e["event"] == "loop_start"), None)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _tree(pid: int, sampler: TreeSampler) -> list[psutil.Process]:
    """The child's descendants: those alive now, those sampled earlier, and the members of its
    session (start_new_session made the child a group leader) that were reparented away."""
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        found = []
    found += [p for p in sampler.processes.values() if p.pid != pid]
    if os.name == "posix":
        for process in psutil.process_iter():
            try:
                if process.pid != pid and os.getpgid(process.pid) == pid:
                    found.append(process)
            except (OSError, psutil.Error):
                continue
    return list({p.pid: p for p in found}.values())


def _wait_stopped(processes: list[psutil.Process], patience: float = _GRACE_S) -> None:
    deadline = time.monotonic() + patience
    while any(_running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.02)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
