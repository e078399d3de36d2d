"""trial_report: timings, stage and outcome from events recorded by real runs (tests/fixtures/trial/events).

tiny_flux_two_calls.jsonl: tests/fixtures/trial/tiny_flux.py on the tiny Flux pipeline, 3 steps, 2 calls.
oom_in_denoise.jsonl: tests/fixtures/trial/oom_at.py raising torch.OutOfMemoryError in the transformer.
"""

import json
import signal
from pathlib import Path

import pytest

from pipefit.tools.trial_report import call_timings, classify, describe, stage_at, torch_peaks

EVENTS = Path(__file__).parent / "fixtures" / "trial" / "events"


def recorded(name: str) -> list[dict]:
    return [json.loads(line) for line in (EVENTS / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def test_each_call_is_timed_from_its_events():
    events = recorded("tiny_flux_two_calls")
    calls, before_first, allocator = call_timings(events)
    assert [c.pipeline for c in calls] == ["FluxPipeline", "FluxPipeline"] and allocator == "default"
    first_call = next(e["t"] for e in events if e["event"] == "call_start")
    assert before_first == pytest.approx(first_call - events[0]["t"], abs=1e-3)
    for call in calls:
        assert call.ok and call.steps_expected == 3 and len(call.step_seconds) == 3
        pieces = call.before_first_step_seconds + sum(call.step_seconds) + call.after_last_step_seconds
        assert pieces == pytest.approx(call.seconds, abs=1e-3)


def test_a_run_stopped_part_way_is_placed_in_its_stage():
    events = recorded("tiny_flux_two_calls")
    first = [e["event"] for e in events].index("call_start")
    loop = [e["event"] for e in events].index("loop_start")
    steps = [i for i, e in enumerate(events) if e["event"] == "step"]
    assert stage_at(events[:first]) == "load"
    assert stage_at(events[: first + 1]) == "text_encode"
    assert stage_at(events[: loop + 1]) == "denoise"
    assert stage_at(events[: steps[0] + 1]) == "denoise"
    assert stage_at(events[: steps[2] + 1]) == "vae_decode"  # the last step done: decoding
    assert stage_at(events) is None  # between calls


def test_an_oom_is_classified_with_its_numbers_and_stage():
    events = recorded("oom_in_denoise")
    verdict = classify(events, 1, None, "")
    assert verdict.outcome == "cuda_oom" and verdict.stage == "denoise"
    assert verdict.oom.tried_to_allocate_bytes == 2 * 2**30 and verdict.error.startswith("OutOfMemoryError: CUDA out of memory")


@pytest.mark.parametrize(
    ("exit_code", "stopped_for", "oom_killed", "outcome", "says"),
    [
        (0, None, None, "ok", None),
        (-signal.SIGKILL, None, True, "host_oom", "OOM-kill count rose"),
        (-signal.SIGKILL, None, None, "host_oom", "which pipefit did not send"),
        (-signal.SIGSEGV, None, None, "error", "SIGSEGV"),
        (3, None, None, "error", "status 3"),
        (-signal.SIGTERM, "timeout", None, "timeout", "60 s timeout"),
        (-signal.SIGTERM, "cancelled", None, "cancelled", "Cancelled"),
        (-signal.SIGTERM, "ram_cap", None, "host_oom", "over the 1.00 GiB cap"),
    ],
)
def test_how_a_run_ended_decides_its_outcome(exit_code, stopped_for, oom_killed, outcome, says):
    events = recorded("tiny_flux_two_calls")[:4]  # stopped in the first call's denoising loop
    verdict = classify(events, exit_code, stopped_for, "", timeout=60, peak_held=2**31, ram_cap=2**30,
                       oom_killed=oom_killed)  # fmt: skip
    assert verdict.outcome == outcome
    assert (verdict.error is None) if says is None else (says in verdict.error), verdict.error
    assert verdict.stage == (None if outcome == "ok" else "denoise")


def test_a_killed_run_whose_log_shows_a_cuda_oom_is_one():
    log = (Path(__file__).parent / "fixtures" / "tracebacks" / "flux_denoise_torch2_5.txt").read_text()
    verdict = classify(recorded("tiny_flux_two_calls")[:2], -signal.SIGABRT, None, log)
    assert verdict.outcome == "cuda_oom" and verdict.oom is not None


def test_torch_peaks_and_progress_messages():
    events = recorded("tiny_flux_two_calls")
    assert torch_peaks(events) == (None, None)  # recorded on a CPU: no allocator to report
    on_gpu = [*events[:-1], {**events[-1], "allocated": 5 * 2**30, "reserved": 6 * 2**30}]
    assert torch_peaks(on_gpu) == (5 * 2**30, 6 * 2**30)
    messages = [m for e in events if (m := describe(e, events))]
    assert messages[0].startswith("started") and "step 3/3" in messages and messages[-1] == "call done"
