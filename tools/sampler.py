"""Peak memory of a running process tree: host RSS from /proc (psutil elsewhere), device memory from NVML.

Sampled from outside the process, in a thread of the caller, so that what is measured costs the
measured process nothing and survives its being killed. Device memory is what the driver sees
(CUDA context included; shared/design.md's "peak VRAM"), attributed to the tree's own processes
where NVML lists them; inside a container whose PID namespace hides them from NVML, it falls back
to the growth of the device's used memory since sampling began, and says so.

Host memory is counted twice: the RSS, and the part of it the machine must hold (``held``): the
anonymous and shared pages (heap, pinned copies, tmpfs), without the file-backed pages of mapped
weight files, which the kernel drops and reads again when memory is short.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

import psutil

VramSource = Literal["nvml_process", "nvml_device"]
INTERVAL_S = 0.02
RESCAN_S = 0.5  # listing descendants reads every process in /proc: ~1 ms, too dear for every sample
_HELD_FIELDS = ("RssAnon:", "RssShmem:")  # pinned host memory is shared pages (RssShmem), not anonymous


def resident(process: psutil.Process) -> tuple[int, int]:
    """(RSS, held) of one process in bytes. ``held``: its anonymous and shared resident pages, read from
    /proc/PID/status; file-backed pages (memory-mapped safetensors read once) are left out, as the kernel
    reclaims them under pressure. Where /proc does not split the RSS, ``held`` is the RSS."""
    try:
        with open(f"/proc/{process.pid}/status", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
    except FileNotFoundError:  # not Linux, or it just exited (then psutil says so below)
        lines = []
    except OSError as exc:
        raise psutil.NoSuchProcess(process.pid) from exc
    kib = {fields[0]: int(fields[1]) for line in lines if len(fields := line.split()) >= 2 and fields[0].startswith(("VmRSS", "Rss"))}
    if "VmRSS:" in kib and all(name in kib for name in _HELD_FIELDS):
        return kib["VmRSS:"] * 1024, sum(kib[name] for name in _HELD_FIELDS) * 1024
    rss = process.memory_info().rss
    return rss, rss


class Nvml:
    """The few NVML calls the sampler needs; absent (``available`` False) without a driver."""

    def __init__(self):
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no package, no driver library, no GPU: no device figures
            return
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.available = bool(self._handles)

    def total(self) -> list[int]:
        """Capacity in bytes per device."""
        return [self._nvml.nvmlDeviceGetMemoryInfo(h).total for h in self._handles]

    def used(self) -> list[int]:
        """Used bytes per device, every process included."""
        return [self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles]

    def by_pid(self) -> list[dict[int, int]]:
        """Per device, {pid: bytes} for the processes NVML can attribute memory to."""
        result = []
        for handle in self._handles:
            try:
                processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:
                processes = []
            result.append({p.pid: p.usedGpuMemory for p in processes if p.usedGpuMemory is not None})
        return result

    def close(self) -> None:
        if self.available:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def _settled(nvml: Nvml, patience: float = 2.0, step: float = 0.1, noise: int = 32 * 2**20) -> list[int]:
    """Used bytes per device once they stop falling: a process that just ended (the previous trial)
    returns its memory over a few hundred milliseconds, and a baseline taken meanwhile is too high."""
    deadline, before = time.monotonic() + patience, nvml.used()
    while time.monotonic() < deadline:
        time.sleep(step)
        now = nvml.used()
        if all(b - n < noise for b, n in zip(before, now)):
            return now
        before = now
    return before


class TreeSampler:
    """Samples a process tree every ``interval`` seconds from ``start()`` to ``stop()``; ``members``
    lists the tree's live processes (tools/process_tree.py), looked up every ``RESCAN_S``.

    Create it before starting the process: device memory in use then is the baseline others hold.

    ``peak_rss_bytes`` is the largest sum of the tree's resident sets and ``peak_held_bytes`` of their
    held parts (``resident``); ``peak_vram_bytes`` the largest device memory of the tree on any one GPU
    (what must fit on a card), with ``vram_source`` saying how it was attributed; ``rss_bytes`` and
    ``held_bytes`` are the latest sums. ``peak_rss_by_phase``, ``peak_held_by_phase`` and
    ``peak_vram_by_phase`` hold the peaks within each phase the caller names with ``set_phase``
    (loading, each pipeline call).
    """

    def __init__(self, members: Callable[[], list[psutil.Process]], nvml: Nvml | None = None, interval: float = INTERVAL_S):
        self._members = members
        self.interval = interval
        self.nvml = nvml if nvml is not None and nvml.available else None
        self.baseline_used = _settled(self.nvml) if self.nvml else []
        self.rss_bytes = self.held_bytes = 0
        self.peak_rss_bytes = self.peak_held_bytes = 0
        self.phase = "start"
        self.peak_rss_by_phase: dict[str, int] = {}
        self.peak_held_by_phase: dict[str, int] = {}
        self.processes: dict[int, psutil.Process] = {}  # every process of the tree seen so far
        self._tree: list[psutil.Process] = []
        self._scanned = float("-inf")
        self._peak_by_process = [0] * len(self.baseline_used)
        self._peak_device_growth = [0] * len(self.baseline_used)
        self._vram_by_phase: dict[str, tuple[int, int]] = {}  # phase -> (by process, device growth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipefit-sampler", daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def set_phase(self, name: str) -> None:
        """Peaks from now on count for ``name`` (e.g. loading, then running)."""
        self.phase = name
        # the RSS last seen holds at the switch: a phase shorter than the sampling interval still has a figure
        if self.rss_bytes:
            self._record(name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def vram_source(self) -> VramSource | None:
        if self.nvml is None:
            return None
        return "nvml_process" if any(self._peak_by_process) else "nvml_device"

    @property
    def peak_vram_bytes(self) -> int | None:
        if self.nvml is None:
            return None
        peaks = self._peak_by_process if any(self._peak_by_process) else self._peak_device_growth
        return max(peaks, default=0)

    @property
    def peak_vram_by_phase(self) -> dict[str, int]:
        """The tree's peak device memory within each phase, attributed as ``vram_source`` says."""
        by_process = self.vram_source == "nvml_process"
        return {phase: peaks[0] if by_process else peaks[1] for phase, peaks in self._vram_by_phase.items()}

    def tree_holds_gpu_memory(self) -> bool | None:
        """Whether any process of the tree (as last seen) still holds device memory; None if unknowable."""
        if self.nvml is None:
            return None
        if self.vram_source == "nvml_process":
            return any(pid in self.processes for device in self.nvml.by_pid() for pid in device)
        slack = 64 * 2**20  # other processes' small fluctuations
        return any(used > base + slack for used, base in zip(self.nvml.used(), self.baseline_used))

    def sample(self) -> None:
        """Take one sample now (the thread calls this; tests may too)."""
        now = time.monotonic()
        if now - self._scanned > RESCAN_S:
            self._tree = self._members()
            self._scanned = now
            for process in self._tree:
                self.processes.setdefault(process.pid, process)
        rss = held = 0
        live = set()
        for process in self._tree:
            try:
                process_rss, process_held = resident(process)
            except psutil.Error:  # it exited since the last listing
                continue
            rss, held = rss + process_rss, held + process_held
            live.add(process.pid)
        self.rss_bytes, self.held_bytes = rss, held
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.peak_held_bytes = max(self.peak_held_bytes, held)
        self._record(self.phase)
        if self.nvml is None:
            return
        now_mine = now_growth = 0
        for index, (by_pid, used) in enumerate(zip(self.nvml.by_pid(), self.nvml.used())):
            mine = sum(b for pid, b in by_pid.items() if pid in live)
            self._peak_by_process[index] = max(self._peak_by_process[index], mine)
            growth = used - self.baseline_used[index]
            self._peak_device_growth[index] = max(self._peak_device_growth[index], growth)
            now_mine, now_growth = max(now_mine, mine), max(now_growth, growth)
        mine_before, growth_before = self._vram_by_phase.get(self.phase, (0, 0))
        self._vram_by_phase[self.phase] = (max(mine_before, now_mine), max(growth_before, now_growth))

    def _record(self, phase: str) -> None:
        """The latest host figures count for ``phase``'s peaks."""
        self.peak_rss_by_phase[phase] = max(self.peak_rss_by_phase.get(phase, 0), self.rss_bytes)
        self.peak_held_by_phase[phase] = max(self.peak_held_by_phase.get(phase, 0), self.held_bytes)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
