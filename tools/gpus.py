"""Per-GPU constants: the only fitted terms of the predictions, and none of them a model family's.

For a GPU measured here (bench/fit_gpu.py over bench/results/strategies-*.jsonl, written to
tools/gpus.json) the CUDA context, the allocator's slack and the matmul and attention rates reached
by diffusers pipelines come from those runs. For any other card the rates are its vendor's dense
bf16 figure times the efficiency measured on the calibration GPU, and its context is the measured
one: those profiles say ``source: "vendor"``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .errors import PipefitError

PROFILES = Path(__file__).with_name("gpus.json")


class GpuProfile(BaseModel):
    """What a GPU adds to the weights and the working memory, and how fast it computes."""

    name: str
    memory_bytes: int | None = None
    context_bytes: float = Field(description="CUDA context and library handles: the driver's figure minus PyTorch's reserved")
    fragmentation: dict[str, float] = Field(
        description="reserved above allocated at the peak, per byte of the peak call's working memory, by allocator "
        "(expandable_segments, default) and by the convolutions the call runs ('expandable_segments:3d'): freed "
        "activation blocks the allocator keeps mapped"
    )
    cast_kept_per_byte: float = Field(
        0.0,
        description="layerwise casting: freed upcast copies the allocator keeps mapped, per byte of the cast "
        "components at full precision (bench/fit_gpu.py: the largest excess over the fragmentation)",
    )
    conv_workspace_per_byte: dict[str, float] = Field(
        default_factory=dict,
        description="cuDNN's workspace beside a convolution, per byte of its input + output, by kind ('2d', '3d')",
    )
    matmul_flops_per_s: float
    attention_flops_per_s: float
    conv_flops_per_s: float | None = Field(None, description="convolutions (cuDNN); None: at the matmul rate")
    call_overhead_seconds: float = Field(description="per component call: kernel launches and Python")
    attention_speed: dict[str, float] = Field(
        default_factory=dict,
        description="attention rate of each diffusers attention backend relative to 'native' (PyTorch's SDPA), "
        "measured here; a backend not measured counts as native",
    )
    source: Literal["measured", "vendor"]
    measured_on: str | None = Field(None, description="the GPU whose runs the efficiency comes from")

    def fragmentation_for(self, allocator: str, kind: str) -> float:
        """The fragmentation of a call running ``kind`` convolutions ('2d', '3d', 'none') under ``allocator``:
        measured for that kind, else the allocator's largest, else the largest of any."""
        for key in (f"{allocator}:{kind}", allocator):
            if key in self.fragmentation:
                return self.fragmentation[key]
        return max(self.fragmentation.values(), default=0.0)


# Dense bf16 tensor throughput (TFLOP/s) and memory (GiB), vendor figures.
VENDOR = {
    "H200": (989, 141), "H100": (989, 80), "GH200": (989, 96), "B200": (2250, 180), "A100": (312, 80),
    "L40S": (362, 48), "L40": (181, 48), "A10G": (70, 24), "A10": (125, 24), "L4": (121, 24), "T4": (65, 16),
    "RTX 5090": (210, 32), "RTX 4090": (165, 24), "RTX 4080": (97, 16), "RTX 4070": (58, 12), "RTX 4060": (30, 8),
    "RTX 3090": (71, 24), "RTX 3080": (59, 10), "RTX 3060": (25, 12), "A6000": (155, 48), "V100": (125, 32),
}  # fmt: skip


@cache
def _measured() -> dict[str, GpuProfile]:
    data = json.loads(PROFILES.read_text())
    return {name: GpuProfile.model_validate(p) for name, p in data["profiles"].items()}


def _vendor_key(name: str) -> str | None:
    return next((key for key in sorted(VENDOR, key=len, reverse=True) if key.lower() in name.lower()), None)


def gpu_profile(name: str | None) -> GpuProfile:
    """The profile of the GPU called ``name`` (nvidia-smi's name or a short one: "RTX 4090", "H100"):
    measured where pipefit ran there, else scaled from the calibration GPU by vendor figures.
    ``None``: the calibration GPU itself."""
    measured = _measured()
    reference = next(iter(measured.values()))
    if name is None:
        return reference
    key = _vendor_key(name)
    for profile in measured.values():
        if key and _vendor_key(profile.name) == key:
            return profile
    if key is None:
        raise PipefitError(
            f"No figures for a GPU called {name!r}.", f"Use one of: {', '.join(VENDOR)} (or run on the card itself)."
        )
    ratio = VENDOR[key][0] / VENDOR[_vendor_key(reference.name)][0]
    return reference.model_copy(update={
        "name": name, "memory_bytes": VENDOR[key][1] * 2**30, "source": "vendor", "measured_on": reference.name,
        "attention_speed": {},  # kernels' relative speed differs by architecture: only where measured
        "matmul_flops_per_s": reference.matmul_flops_per_s * ratio,
        "attention_flops_per_s": reference.attention_flops_per_s * ratio,
        "conv_flops_per_s": reference.conv_flops_per_s * ratio if reference.conv_flops_per_s else None,
    })  # fmt: skip


def known_gpus() -> list[str]:
    """Short names ``gpu_profile`` knows."""
    return list(VENDOR)
