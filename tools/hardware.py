"""detect_hardware: what the machine offers a diffusers pipeline.

GPUs come from NVML (nvidia-ml-py) because it is fast and sees the whole device, other processes
included; torch.cuda is the fallback, and only when there is a sign of a GPU, since importing torch
costs more than the whole detection should. A machine without a GPU gets a clean answer, not an
error. Host memory honours the container's limit: that, not /proc/meminfo, is what OOM-kills.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import platform
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, Field

# Packages whose versions decide what a plan can use. Distribution names, as pip knows them.
STACK_PACKAGES = (
    "torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "torchao", "gguf",
    "flash-attn", "sageattention", "xformers",
)  # fmt: skip

_NO_CGROUP_LIMIT = 2**60  # cgroup v1 writes a huge number for "no limit"


class Capabilities(BaseModel):
    """What the GPU's architecture allows (compute capability), independent of installed kernels."""

    bf16: bool = Field(description="bfloat16 compute (sm 8.0+)")
    fp8_storage: bool = Field(description="float8 weights stored and upcast per layer (any CUDA GPU)")
    fp8_compute: bool = Field(description="float8 matmuls (sm 8.9+)")
    flash_attention: bool = Field(description="FlashAttention-2 kernels can run (sm 8.0+)")


class Gpu(BaseModel):
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    compute_capability: str | None = None
    other_processes_bytes: int | None = Field(
        None, description="Device memory held by other processes, where NVML can tell"
    )
    unified_memory: bool = Field(False, description="Apple silicon: device memory is host RAM")
    capabilities: Capabilities | None = None
    source: Literal["nvml", "torch", "mps"]


class HostMemory(BaseModel):
    total_bytes: int
    available_bytes: int
    container_limit_bytes: int | None = Field(None, description="cgroup memory limit, when one is set")
    effective_bytes: int = Field(description="What this process can really use: min(available, container room)")
    swap_total_bytes: int
    swap_free_bytes: int


class Bandwidth(BaseModel):
    """Host-to-device copy speed; offloading strategies are bounded by it."""

    gpu_index: int
    probe_bytes: int
    pinned_bytes_per_s: float
    pageable_bytes_per_s: float


class HardwareReport(BaseModel):
    accelerator: Literal["cuda", "mps", "none"]
    gpus: list[Gpu]
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    ram: HostMemory
    cpu_count: int
    platform: str
    python: str
    stack: dict[str, str | None] = Field(description="Installed versions, null when missing")
    bandwidth: Bandwidth | None = None
    notes: list[str] = Field(default_factory=list)


def detect_hardware(bandwidth: bool = False) -> HardwareReport:
    """Describe this machine for planning a diffusers pipeline: GPUs, host RAM, software stack.

    Reports each GPU's total, free and used memory (bytes) and what other processes hold, the
    compute capability and what it allows (bf16, fp8 storage, fp8 compute, flash attention), host
    RAM with the container's cgroup limit, and the versions of torch, diffusers and the optional
    quantization / attention packages. Never fails on a machine without a GPU: it says so.

    With ``bandwidth=True`` it also times host-to-device copies from pinned and from pageable memory
    (about a second); offloading speed depends on it and differs ~20x between the two.
    Call this before ``recommend`` when the user has not said how much VRAM/RAM they have.
    """
    notes: list[str] = []
    gpus, driver, cuda_driver = _nvidia_gpus_from_nvml(notes)
    if not gpus and _gpu_likely_present():
        gpus = _gpus_from_torch(notes)
    accelerator: Literal["cuda", "mps", "none"] = "cuda" if gpus else "none"
    ram = host_memory()
    if not gpus and sys.platform == "darwin" and platform.machine() == "arm64":
        gpus = _mps_gpu(ram, notes)
        accelerator = "mps" if gpus else "none"
    if not gpus:
        notes.append("No GPU found: pipelines will run on the CPU; GPU-only strategies are unavailable.")

    probe = None
    if bandwidth:
        if accelerator == "cuda":
            probe = measure_bandwidth(gpus[0].index)
        else:
            notes.append("Bandwidth probe skipped: it needs a CUDA GPU.")

    return HardwareReport(
        accelerator=accelerator,
        gpus=gpus,
        driver_version=driver,
        cuda_driver_version=cuda_driver,
        ram=ram,
        cpu_count=os.cpu_count() or 1,
        platform=platform.platform(terse=True),
        python=platform.python_version(),
        stack=installed_versions(),
        bandwidth=probe,
        notes=notes,
    )


def capabilities_for(compute_capability: str | None) -> Capabilities | None:
    """Map an sm version ("8.9") to the features pipefit's strategies need."""
    if compute_capability is None:
        return None
    major, minor = (int(x) for x in compute_capability.split(".")[:2])
    sm = (major, minor)
    return Capabilities(bf16=sm >= (8, 0), fp8_storage=True, fp8_compute=sm >= (8, 9), flash_attention=sm >= (8, 0))


def installed_versions(packages: tuple[str, ...] = STACK_PACKAGES) -> dict[str, str | None]:
    """Versions of the packages that decide which strategies are available; None when missing."""
    return {name: _version(name) for name in packages}


@lru_cache(maxsize=64)
def _version(name: str) -> str | None:
    # read once per process: a package's metadata costs milliseconds each time
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_memory(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> HostMemory:
    """Host RAM as this process can use it, container limit included."""
    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    limit, usage = cgroup_memory_limit(cgroup_root, proc_cgroup)
    effective = vm.available
    if limit is not None:
        # Page cache counts towards cgroup usage but is reclaimable; psutil's available already
        # reflects the host, so take the tighter of the two.
        effective = min(effective, max(limit - (usage or 0), 0))
    return HostMemory(
        total_bytes=vm.total,
        available_bytes=vm.available,
        container_limit_bytes=limit,
        effective_bytes=effective,
        swap_total_bytes=swap.total,
        swap_free_bytes=swap.free,
    )


def cgroup_memory_limit(cgroup_root: Path, proc_cgroup: Path) -> tuple[int | None, int | None]:
    """(limit, usage) in bytes from cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``; None if unset."""
    own = _own_cgroup_path(proc_cgroup)
    candidates = [
        (cgroup_root / own / "memory.max", cgroup_root / own / "memory.current"),
        (cgroup_root / "memory.max", cgroup_root / "memory.current"),
        (cgroup_root / "memory" / "memory.limit_in_bytes", cgroup_root / "memory" / "memory.usage_in_bytes"),
    ]
    for limit_file, usage_file in candidates:
        limit = _read_int(limit_file)
        if limit is not None and limit < _NO_CGROUP_LIMIT:
            return limit, _read_int(usage_file)
    return None, None


def cgroup_oom_kills(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """How many processes the kernel has OOM-killed in this container; None where no cgroup tells.

    cgroup v2 counts them in ``memory.events``, v1 in ``memory.oom_control``.
    """
    own = _own_cgroup_path(proc_cgroup)
    candidates = (cgroup_root / own / "memory.events", cgroup_root / "memory.events")
    for events in (*candidates, cgroup_root / "memory" / "memory.oom_control"):
        try:
            for line in events.read_text().splitlines():
                name, _, count = line.partition(" ")
                if name == "oom_kill":
                    return int(count)
        except (OSError, ValueError):
            continue
    return None


def _own_cgroup_path(proc_cgroup: Path) -> str:
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):  # the cgroup v2 unified hierarchy
                return line[3:].lstrip("/")
    except OSError:
        pass
    return ""


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit


def _gpu_likely_present() -> bool:
    # /dev/nvidia0 on Linux, /dev/dxg under WSL; ROCm exposes /dev/kfd.
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg") or os.path.exists("/dev/kfd"))


def _nvidia_gpus_from_nvml(notes: list[str]) -> tuple[list[Gpu], str | None, str | None]:
    """Read every GPU through NVML; ([], None, None) when NVML or its driver library is absent."""
    try:
        import pynvml as nvml
    except ImportError:
        return [], None, None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA driver here
        return [], None, None
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        cuda_driver = f"{cuda // 1000}.{cuda % 1000 // 10}"
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc = f"{major}.{minor}"
            except Exception:
                cc = None
            gpus.append(
                Gpu(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    total_bytes=memory.total,
                    free_bytes=memory.free,
                    used_bytes=memory.used,
                    compute_capability=cc,
                    other_processes_bytes=_other_processes_bytes(nvml, handle),
                    capabilities=capabilities_for(cc),
                    source="nvml",
                )
            )
        return gpus, driver, cuda_driver
    except Exception as exc:  # a half-working driver: report what NVML said and fall back
        notes.append(f"NVML failed ({exc}); GPU figures come from torch.cuda instead.")
        return [], None, None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _other_processes_bytes(nvml: Any, handle: Any) -> int | None:
    """Memory other processes hold on this GPU; None where NVML cannot see them (containers)."""
    try:
        processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        processes += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
    except Exception:
        return None
    used = [p.usedGpuMemory for p in processes if p.pid != os.getpid()]
    if any(u is None for u in used):
        return None
    return sum(used)


def _gpus_from_torch(notes: list[str]) -> list[Gpu]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        props = torch.cuda.get_device_properties(index)
        cc = f"{props.major}.{props.minor}"
        gpus.append(
            Gpu(
                index=index,
                name=props.name,
                total_bytes=total,
                free_bytes=free,
                used_bytes=total - free,
                compute_capability=cc,
                capabilities=capabilities_for(cc),
                source="torch",
            )
        )
    notes.append("GPU figures from torch.cuda (NVML unavailable): memory of other processes is unknown.")
    return gpus


def _mps_gpu(ram: HostMemory, notes: list[str]) -> list[Gpu]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.backends.mps.is_available():
        return []
    notes.append("Apple MPS: GPU memory is unified with host RAM; VRAM and RAM budgets are one budget.")
    return [
        Gpu(
            index=0,
            name="Apple MPS",
            total_bytes=ram.total_bytes,
            free_bytes=ram.available_bytes,
            used_bytes=ram.total_bytes - ram.available_bytes,
            unified_memory=True,
            source="mps",
        )
    ]


def measure_bandwidth(gpu_index: int = 0, probe_bytes: int = 256 * 2**20, repeats: int = 4) -> Bandwidth:
    """Time host-to-device copies of ``probe_bytes`` from pinned and from pageable memory."""
    import torch

    device = torch.device("cuda", gpu_index)
    pageable = torch.empty(probe_bytes, dtype=torch.uint8)
    pinned = torch.empty(probe_bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(probe_bytes, dtype=torch.uint8, device=device)

    def rate(source: "torch.Tensor") -> float:
        target.copy_(source, non_blocking=True)  # warm-up: first touch, driver mappings
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source, non_blocking=True)
        torch.cuda.synchronize(device)
        return probe_bytes * repeats / (time.perf_counter() - start)

    try:
        return Bandwidth(
            gpu_index=gpu_index,
            probe_bytes=probe_bytes,
            pinned_bytes_per_s=rate(pinned),
            pageable_bytes_per_s=rate(pageable),
        )
    finally:
        del pageable, pinned, target
        torch.cuda.empty_cache()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
