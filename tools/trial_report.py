"""From what a trial left behind to what it means: pure functions over the child's recorded events.

The runner (tools/trial_runner.py) writes one JSON event per line: ``start``, ``cap``, and per
pipeline call ``call_start``, ``loop_start``, ``step``, ``call_end``; ``exception`` and ``end``.
These functions read such a list (and the exit status, the log's tail) and return the timings, the
stage a run stopped in, and its outcome; nothing here runs or samples anything, so each is tested on
recorded events.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from .triage import OomTriage, Stage, triage_oom
from .units import format_bytes

Outcome = Literal["ok", "cuda_oom", "host_oom", "timeout", "cancelled", "error"]
StoppedFor = Literal["timeout", "cancelled", "ram_cap"]


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


def call_phase(number: int) -> str:
    """The sampler's name for the ``number``-th pipeline call (from 1): peaks are kept per phase."""
    return f"call {number}"


def phase_after(event: dict, calls_started: int) -> str | None:
    """The sampling phase an event opens (``calls_started`` counts this event), or None if it opens none."""
    if event["event"] == "call_start":
        return call_phase(calls_started)
    if event["event"] == "call_end":
        return "between calls"
    return None


def call_timings(events: list[dict]) -> tuple[list[CallTiming], float | None, str | None]:
    """Each pipeline call's timings, the seconds from the start to the first call, and the allocator
    setting the first call saw."""
    start = next((e["t"] for e in events if e["event"] == "start"), None)
    calls: list[CallTiming] = []
    before_first = allocator = None
    call = call_t = loop_t = last_t = None
    for event in events:
        kind, t = event["event"], event["t"]
        if kind == "call_start":
            call = CallTiming(pipeline=event["pipeline"], ok=False)
            call_t, loop_t, last_t = t, None, None
            calls.append(call)
            if before_first is None and start is not None:
                before_first = round(t - start, 3)
            allocator = allocator or event.get("allocator")
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
    return calls, before_first, allocator


def torch_peaks(events: list[dict]) -> tuple[int | None, int | None]:
    """PyTorch's allocated and reserved peaks over the run, as the child reported them."""
    allocated = [e["allocated"] for e in events if "allocated" in e]
    reserved = [e["reserved"] for e in events if "reserved" in e]
    return max(allocated, default=None), max(reserved, default=None)


def loop_total(events: list[dict]) -> int | None:
    """The step count of the latest denoising loop, where the pipeline said it."""
    return next((e.get("total") for e in reversed(events) if e["event"] == "loop_start"), None)


def stage_at(events: list[dict]) -> Stage | None:
    """Where the run was when it stopped, from the last pipeline event (None between calls)."""
    calls = [e for e in events if e["event"] in ("call_start", "loop_start", "step", "call_end")]
    if not calls:
        return "load"
    last = calls[-1]
    if last["event"] == "call_start":
        return "text_encode"
    if last["event"] == "loop_start":
        return "denoise"
    if last["event"] == "step":
        total = loop_total(events)
        return "vae_decode" if total is not None and last["index"] + 1 >= total else "denoise"
    return None  # between calls: the frames (triage) may tell


def describe(event: dict, events: list[dict]) -> str | None:
    """The progress message for one event, or None for those not worth one."""
    kind = event["event"]
    if kind == "start":
        return f"started (pid {event['pid']})"
    if kind == "call_start":
        return f"{event['pipeline']}: called (encoding the prompt)"
    if kind == "loop_start":
        return f"denoising, {event['total']} steps" if event.get("total") else "denoising"
    if kind == "step":
        return f"step {event['index'] + 1}/{loop_total(events) or '?'}"
    if kind == "call_end" and event.get("ok"):
        return "call done"
    return None


@dataclass(frozen=True)
class Verdict:
    """How a run ended: its outcome, the one-line error, the triage of an OOM, the stage it stopped in."""

    outcome: Outcome
    error: str | None = None
    oom: OomTriage | None = None
    stage: Stage | None = None


def classify(
    events: list[dict],
    exit_code: int | None,
    stopped_for: StoppedFor | None,
    log_tail: str,
    *,
    source: str | None = None,
    timeout: float | None = None,
    peak_held: int = 0,
    ram_cap: int | None = None,
    oom_killed: bool | None = None,
) -> Verdict:
    """The verdict on a run from its events, exit status, why pipefit stopped it (if it did) and the
    end of its log. ``source`` is the script that ran (triage reads the model from it);
    ``oom_killed``: whether the container's OOM-kill count rose during the run (None: unknown)."""
    stage = None if exit_code == 0 and stopped_for is None else stage_at(events)
    exception = next((e for e in events if e["event"] == "exception"), None)
    if stopped_for == "timeout":
        verdict = Verdict("timeout", f"Ran past the {timeout:g} s timeout; pipefit stopped the script and its processes.")
    elif stopped_for == "cancelled":
        verdict = Verdict("cancelled", "Cancelled by the caller; pipefit stopped the script and its processes.")
    elif stopped_for == "ram_cap":
        verdict = Verdict("host_oom", (
            f"The script's processes held {format_bytes(peak_held)} of RAM, over the {format_bytes(ram_cap)} "
            "cap; pipefit stopped them (a simulated host limit: anonymous and shared pages count, mapped weight "
            "files do not)."
        ))  # fmt: skip
    elif exit_code == 0:
        verdict = Verdict("ok")
    elif exception is not None:
        verdict = _from_exception(exception, source)
    else:
        verdict = _from_exit(exit_code, events, log_tail, source, oom_killed)
    oom = verdict.oom
    if oom is not None and oom.stage is None:
        oom = oom.model_copy(update={"stage": stage})
    elif oom is not None:
        stage = oom.stage
    return Verdict(verdict.outcome, verdict.error, oom, stage)


def _from_exception(exception: dict, source: str | None) -> Verdict:
    triage = triage_oom(exception["traceback"], script=source)
    message = exception["message"].strip().splitlines()[0] if exception["message"].strip() else ""
    error = f"{exception['type']}: {message}"[:500] if message else exception["type"]
    if exception["type"] == "OutOfMemoryError" or triage.kind in ("cuda_oom", "mps_oom", "alloc_failure"):
        return Verdict("cuda_oom", error, triage)
    if exception["type"] == "MemoryError" or triage.kind == "host_oom":
        return Verdict("host_oom", error, triage)
    return Verdict("error", error)


def _from_exit(code: int | None, events: list[dict], log_tail: str, source: str | None, oom_killed: bool | None) -> Verdict:
    """No Python exception: a signal, a C++ abort, or sys.exit(N). The log may still say why."""
    triage = triage_oom(log_tail, script=source)
    sigkill = code == -getattr(signal, "SIGKILL", 9)
    if triage.kind == "host_oom":
        return Verdict("host_oom", triage.error, triage)
    if sigkill:
        why = (
            "Killed by SIGKILL; the container's OOM-kill count rose: the host ran out of memory."
            if oom_killed
            else "Killed by SIGKILL, which pipefit did not send: most likely the kernel's OOM killer or a "
            "container memory limit."
        )
        return Verdict("host_oom", why)
    if triage.kind in ("cuda_oom", "alloc_failure"):
        return Verdict("cuda_oom", triage.error, triage)
    if code is not None and code < 0:
        return Verdict("error", f"Killed by signal {_signal_name(-code)}.")
    cap_failed = next((e for e in events if e["event"] == "cap" and "error" in e), None)
    if cap_failed:
        return Verdict("error", f"Could not simulate the VRAM cap: {cap_failed['error']}.")
    return Verdict("error", f"Exited with status {code}.")


def simulation(events: list[dict], cap: int, gpu_index: int, gpu_total: int) -> tuple[str, int | None]:
    """What a simulated VRAM cap covered, in words, and the CUDA context measured at start (None: not applied)."""
    event = next((e for e in events if e["event"] == "cap"), None)
    if event is None or "allocator_bytes" not in event:
        return "The VRAM cap was not applied: the script never imported torch, or had no CUDA.", None
    context = event["context_bytes"]
    return (
        f"Simulated a {format_bytes(cap)} card on GPU {gpu_index} ({format_bytes(gpu_total)}): PyTorch's allocator "
        f"was capped at {format_bytes(event['allocator_bytes'])}, the cap minus the {format_bytes(context)} CUDA "
        "context measured at start. Not covered: device memory outside PyTorch's allocator that grows later "
        "(kernels loaded on first use, library handles; the driver-level peak shows it), another card's context "
        "size, and speed: the timings are this GPU's."
    ), context


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
