"""detect_hardware on this (GPU-less) machine, and with a fake NVML standing in for absent GPUs."""

import importlib.metadata
import json
import subprocess
import sys
import types
from collections import namedtuple

import pytest

from pipefit.tools import hardware
from pipefit.tools.hardware import cgroup_memory_limit, detect_hardware


def test_machine_without_gpu_gets_a_clean_answer(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were missing
    monkeypatch.setattr(hardware, "_gpu_likely_present", lambda: False)
    report = detect_hardware(bandwidth=True)
    assert report.accelerator == "none" and report.gpus == []
    assert any("No GPU" in note for note in report.notes)
    assert any("Bandwidth probe skipped" in note for note in report.notes)
    assert 0 < report.ram.effective_bytes <= report.ram.total_bytes
    assert report.stack["torch"] == importlib.metadata.version("torch")
    assert report.stack["flash-attn"] is None or isinstance(report.stack["flash-attn"], str)


Memory = namedtuple("Memory", "total free used")
Process = namedtuple("Process", "pid usedGpuMemory")


def _fake_nvml(processes, fail_init=False):
    """NVML as nvidia-ml-py exposes it, for two GPUs: an H100 and an RTX 4090."""
    gpus = [("NVIDIA H100 80GB HBM3", (9, 0), Memory(85520809984, 84500000000, 1020809984)),
            (b"NVIDIA GeForce RTX 4090", (8, 9), Memory(25757220864, 20000000000, 5757220864))]  # fmt: skip

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    return types.SimpleNamespace(
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "580.159.04",
        nvmlSystemGetCudaDriverVersion=lambda: 13000,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: gpus[h][0],
        nvmlDeviceGetMemoryInfo=lambda h: gpus[h][2],
        nvmlDeviceGetCudaComputeCapability=lambda h: gpus[h][1],
        nvmlDeviceGetComputeRunningProcesses=lambda h: processes[h],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [],
    )


def test_gpus_from_nvml_with_other_processes(monkeypatch):
    import os

    others = [[Process(os.getpid(), 500), Process(4242, 2**30)], [Process(77, None)]]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(others))
    report = detect_hardware()
    assert report.accelerator == "cuda"
    assert report.driver_version == "580.159.04" and report.cuda_driver_version == "13.0"
    h100, rtx = report.gpus
    assert (h100.name, h100.total_bytes, h100.free_bytes) == ("NVIDIA H100 80GB HBM3", 85520809984, 84500000000)
    assert h100.other_processes_bytes == 2**30  # our own process is not "other"
    assert rtx.other_processes_bytes is None  # NVML could not tell (containers hide usedGpuMemory)
    assert rtx.name == "NVIDIA GeForce RTX 4090"  # older nvidia-ml-py returns bytes
    assert h100.capabilities.fp8_compute and rtx.capabilities.fp8_compute
    assert h100.capabilities.bf16 and h100.capabilities.flash_attention


def test_nvml_without_driver_falls_back_without_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([[], []], fail_init=True))
    monkeypatch.setattr(hardware, "_gpu_likely_present", lambda: False)
    assert detect_hardware().accelerator == "none"


@pytest.mark.parametrize(
    "cc, bf16, fp8_compute", [("7.5", False, False), ("8.0", True, False), ("8.6", True, False), ("8.9", True, True),
                              ("9.0", True, True), ("12.0", True, True)]
)  # fmt: skip
def test_capabilities_follow_compute_capability(cc, bf16, fp8_compute):
    caps = hardware.capabilities_for(cc)
    assert (caps.bf16, caps.fp8_compute, caps.fp8_storage) == (bf16, fp8_compute, True)


def test_cgroup_v2_limit_of_own_group(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/job-7\n")
    group = tmp_path / "fs" / "user.slice" / "job-7"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("17179869184\n")
    (group / "memory.current").write_text("1073741824\n")
    assert cgroup_memory_limit(tmp_path / "fs", proc) == (16 * 2**30, 2**30)


def test_cgroup_v2_max_means_no_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(tmp_path / "fs", proc) == (None, None)


def test_cgroup_v1_limit(tmp_path):
    memory = tmp_path / "fs" / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text(str(8 * 2**30))
    (memory / "memory.usage_in_bytes").write_text(str(2**30))
    assert cgroup_memory_limit(tmp_path / "fs", tmp_path / "missing") == (8 * 2**30, 2**30)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "unlimited"
    assert cgroup_memory_limit(tmp_path / "fs", tmp_path / "missing") == (None, None)


def test_host_memory_respects_container_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    (tmp_path / "memory.max").write_text(str(2 * 2**30))
    (tmp_path / "memory.current").write_text(str(2**30 + 2**29))
    ram = hardware.host_memory(tmp_path, proc)
    assert ram.container_limit_bytes == 2 * 2**30
    assert ram.effective_bytes == 2**29


def test_cli_detect_json_and_table():
    out = subprocess.run([sys.executable, "-m", "pipefit", "detect", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ram"]["total_bytes"] > 0 and "torch" in report["stack"]
    table = subprocess.run([sys.executable, "-m", "pipefit", "detect"], capture_output=True, text=True)
    assert table.returncode == 0 and "RAM:" in table.stdout
