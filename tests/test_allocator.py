"""The allocator model (tools/strategies/allocator.py): PyTorch's CUDA caching allocator replayed on a dry
run's allocations. Checked against the GPU's own allocator on recorded replays, by PyTorch's own rules, and
on the allocation streams of real dry runs."""

import json
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
from pipefit.tools.dryrun import trace_pipeline
from pipefit.tools.plan import Plan
from pipefit.tools.strategies import allocator
from pipefit.tools.strategies.allocator import CachingAllocator, pool_reserved

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
WORKSPACE = {"2d": 1.0341328755021095, "3d": 1.1884513409147537, "2d_float32": 1.0246537812054157}  # as replayed


def _recorded():
    lines = [json.loads(line) for line in (ROOT / "bench/results/allocator-replay-h200.jsonl").read_text().splitlines()]
    return [(line, json.loads((ROOT / "bench/replay" / f"{line['build']}.json").read_text())) for line in lines]


@pytest.mark.parametrize("line,data", _recorded(), ids=lambda v: f"{v['build']}-{v['allocator']}" if "build" in v and "allocator" in v else "")
def test_the_model_reserves_what_the_gpus_allocator_reserved(line, data):
    """Four full-size dry runs' allocations replayed on the H200 under both allocators
    (bench/allocator_replay.py): the model's peak reserved memory is the GPU's, to the byte."""
    trace = SimpleNamespace(allocations=data["allocations"], workspaces=[tuple(w) for w in data["workspaces"]],
                            calls=[SimpleNamespace(**c) for c in data["calls"]])  # fmt: skip
    model = max(pool_reserved(trace, SimpleNamespace(allocator=line["allocator"]), WORKSPACE, frozenset()))
    assert model == line["real_peak_reserved"]


def test_default_allocator_rules():
    allocator = CachingAllocator(expandable=False)
    small = allocator.malloc(1000)  # rounded to 1024, from a 2 MiB small-pool segment
    assert (small.size, allocator.reserved) == (1024, 2 * MiB)
    mid = allocator.malloc(3 * MiB)  # 1-10 MiB: a 20 MiB segment, split
    assert allocator.reserved == 22 * MiB
    allocator.malloc(5 * MiB)  # fits the rest of that segment
    assert allocator.reserved == 22 * MiB
    big = allocator.malloc(100 * MiB + 1)  # above 10 MiB: its own segment, rounded up to 2 MiB
    assert allocator.reserved == 124 * MiB
    allocator.free(big)
    allocator.malloc(60 * MiB)  # the smallest free block that fits, split
    assert allocator.reserved == 124 * MiB
    allocator.malloc(60 * MiB)  # 42 MiB left there is too small: a new segment
    assert allocator.reserved == 184 * MiB
    allocator.free(mid)
    allocator.empty_cache()  # only whole free segments go back: the 20 MiB one still holds 5 MiB
    assert allocator.reserved == 184 * MiB
    assert allocator.allocated == 1024 + 5 * MiB + 120 * MiB


def test_expandable_segments_grow_in_place():
    allocator = CachingAllocator(expandable=True)
    first = allocator.malloc(30 * MiB)  # pages of 20 MiB
    assert allocator.reserved == 40 * MiB
    allocator.malloc(5 * MiB)  # the 10 MiB left at the end
    assert allocator.reserved == 40 * MiB
    allocator.free(first)
    allocator.malloc(50 * MiB)  # the freed 30 MiB cannot move: the end grows (5 MiB free there + 60 new)
    assert allocator.reserved == 100 * MiB
    allocator.malloc(25 * MiB)  # the freed 30 MiB block at the start, split
    assert allocator.reserved == 100 * MiB
    tail = allocator.malloc(1 * MiB + 512)  # the free end (15 MiB) is the smallest that fits, but best fit
    assert allocator.reserved == 100 * MiB and tail.address < allocator._tail[False].address  # takes the 5 MiB left
    allocator.malloc(4 * MiB)  # ... which leaves the end for what nothing else fits
    assert allocator.reserved == 100 * MiB


@pytest.fixture(scope="module")
def tiny_trace(tiny_dirs):
    return trace_pipeline(str(tiny_dirs["flux"]), height=64, width=64, steps=2, dtype="float32")


def test_a_dry_runs_allocations_replay_consistently(tiny_trace):
    """A real dry run's allocation stream: every free follows its allocation, the calls' spans are in order,
    and at every call the replayed pool holds at least the tensors the call had live at its peak."""
    trace = tiny_trace
    allocated = 0
    for event in trace.allocations:
        if event > 0:
            allocated += 1
        else:
            assert -event - 1 < allocated
    spans = [c.events for c in trace.calls]
    assert all(a[1] <= b[0] for a, b in pairwise(spans))
    for kind in ("expandable_segments", "default"):
        pool = pool_reserved(trace, Plan(allocator=kind), {}, frozenset())
        assert all(reserved >= call.peak_bytes for reserved, call in zip(pool, trace.calls))
        assert pool == sorted(pool)  # nothing is given back while nothing empties the cache


def test_the_kept_replays_answer_per_trace(tiny_trace, tmp_path, monkeypatch):
    """cached_pool_reserved gives what pool_reserved computes, from this process and then from disk, and a
    trace whose stream differs (its first tensor 64 MiB larger) is replayed on its own, not answered with
    the first trace's pool."""
    monkeypatch.setenv("PIPEFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(allocator, "_REPLAYED", {})
    plan = Plan(allocator="default")
    first = allocator.cached_pool_reserved(tiny_trace, plan, {}, frozenset(), {}, frozenset())
    assert first == pool_reserved(tiny_trace, plan, {}, frozenset()) and len(list((tmp_path / "replay").iterdir())) == 1
    allocator._REPLAYED.clear()
    assert allocator.cached_pool_reserved(tiny_trace, plan, {}, frozenset(), {}, frozenset()) == first  # from disk
    first_tensor = next(i for i, e in enumerate(tiny_trace.allocations) if e > 0)
    stream = list(tiny_trace.allocations)
    stream[first_tensor] += 64 * MiB  # the same ids: frees still name their allocations
    other = tiny_trace.model_copy(update={"allocations": stream})
    pool = allocator.cached_pool_reserved(other, plan, {}, frozenset(), {}, frozenset())
    assert pool == pool_reserved(other, plan, {}, frozenset()) != first
    assert len(list((tmp_path / "replay").iterdir())) == 2


@pytest.mark.gpu
def test_the_replay_on_this_gpu_matches_the_model(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "replay.jsonl"
    subprocess.run([sys.executable, str(ROOT / "bench/allocator_replay.py"), "replay", str(ROOT / "bench/replay"), "--out", str(out)],
                   check=True)  # fmt: skip
    for line in map(json.loads, out.read_text().splitlines()):
        assert line["model_peak_reserved"] == line["real_peak_reserved"], line


@pytest.mark.parametrize("name", ["model-False", "model-True", "sequential-False"])
def test_the_model_replays_a_real_decode_as_the_gpu_reserved_it(name):
    """SDXL's float32 VAE decode as the H200's allocator recorded it (bench/alloc_history.py: every
    allocation, free and cache release of the real call): replayed through the model, with the cache
    emptied where the GPU's allocator released it, the peak is what the GPU reserved, within 1%."""
    import gzip

    data = json.loads(gzip.decompress((ROOT / f"bench/results/alloc-history-sdxl-{name}-h200.json.gz").read_bytes()))
    allocator = CachingAllocator(expandable="expandable_segments:True" in data["allocator"])
    live, previous = {}, None
    for event in data["window"]:
        action = event["action"]
        if action in ("segment_free", "segment_unmap") and previous not in ("segment_free", "segment_unmap"):
            allocator.empty_cache()
        if action == "alloc":
            live[event["addr"]] = allocator.malloc(event["size"])
        elif action == "free_completed" and event["addr"] in live:
            allocator.free(live.pop(event["addr"]))
        previous = action
    assert abs(allocator.peak_reserved - data["max_reserved"]) <= 0.01 * data["max_reserved"]
