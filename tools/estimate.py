"""Predicted peak VRAM, host RAM and seconds per call of one plan, from the pipeline's own code.

Peak VRAM is the driver's (shared/design.md): the CUDA context, plus the largest over the pipeline's
component calls of (weights on the device during that call + the call's working memory), plus what
the allocator keeps beyond it. Each term is derived, none is fitted per family:

- the calls, their order, shapes and working memory: the dry run of the pipeline's own ``__call__``
  on the meta device (tools/dryrun.py): each encoder pass, each denoiser forward (with the
  pipeline's own guidance), the VAE decode on its plain, tiled and sliced paths, and what is live at
  each large convolution (cuDNN's workspace sits beside it);
- the weights on the device during each call: the placement's own module (tools/strategies:
  offload for none/model/sequential, group_offload for groups) over the measured sizes;
- the context, the convolution workspace, the allocator's fragmentation and the compute rates: the
  GPU's (tools/gpus.py), measured where pipefit ran there.

The fragmentation is a fraction of the peak call's working memory, smaller with expandable
segments (the plans' default) than with the default caching allocator, which under group
offloading also keeps freed group buffers. Seconds come from the FLOPs the dry run counted at the
GPU's rates, plus the transfers the placement makes at the host's measured bandwidth. Host RAM is
the process's own plus what the loading path reads and converts and what the placement holds, per
byte of the weights concerned (strategies.loading, offload, group_offload), at the host's terms.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field

from .gpus import GpuProfile, gpu_profile
from .measure import PipelineMeasurement
from .plan import Plan
from .strategies import Rates, Weights, host_bytes, loading, resident, setup_host_bytes, transfer_seconds

if TYPE_CHECKING:
    from .dryrun import ComponentCall, Trace

CALIBRATION = Path(__file__).with_name("calibration.json")
Basis = Literal["measured", "derived"]


class Coefficients(BaseModel):
    """The host's RAM and transfer terms and the kernels' speed factors (fitted on the H100 host by the
    since-removed bench/fit_models.py; bench/fit_gpu.py --write keeps ``measured`` and ``margin_fraction``)."""

    gpu: str
    ram_base_bytes: dict[str, float] = Field(description="the process's RSS before any weight: 'load', and 'run' (CUDA's host side)")
    ram_copy_per_byte: dict[str, float] = Field(
        description="RSS per byte of weights the host holds, by who holds them: model, model_quantized (its "
        "quantized components), sequential, group, "
        "group_low_cpu_mem (ordinary memory the host allocator keeps), pinned (per pinned byte), host_quantize "
        "(converting on the CPU while loading), host_leftover (what that conversion leaves)"
    )
    step_factor: dict[str, float] = Field(description="step time relative to bf16, by quantization backend or 'fp8_cast'")
    transfer_efficiency: dict[str, float] = Field(description="rate reached / measured pageable rate, by mechanism")
    pageable_bytes_per_s: float
    pinned_bytes_per_s: float
    margin_fraction: float = Field(description="the largest under-prediction seen, kept free on the GPU")
    compile_step_factor: float = Field(0.85, description="regional compile's step time relative to eager")
    measured: dict[str, list[str]] = Field(
        default_factory=dict, description="pipeline class -> plan signatures run on a GPU (basis 'measured')"
    )
    provenance: dict = Field(default_factory=dict)


@cache
def load_coefficients(path: str = str(CALIBRATION)) -> Coefficients:
    """The coefficients shipped with pipefit."""
    return Coefficients.model_validate(json.loads(Path(path).read_text()))


# A workload's bounds, once: the CLI and the MCP tools take these types. Wide enough for any real call
# (a 16K image, a 4096-frame video, 1000 steps: a scheduler's whole schedule), narrow enough that a typo
# is an error instead of a dry run of a 10^9-pixel image.
Height = Annotated[int, Field(ge=8, le=16384, description="pixels")]
Width = Annotated[int, Field(ge=8, le=16384, description="pixels")]
Frames = Annotated[int, Field(ge=1, le=4096, description="video pipelines only: frames per call")]
Steps = Annotated[int, Field(ge=1, le=1000)]
Batch = Annotated[int, Field(ge=1, le=64, description="images or videos per call")]
GuidanceScale = Annotated[
    float, Field(ge=0, le=100, allow_inf_nan=False, description="the call's guidance_scale; omit for the pipeline's default")
]


class Workload(BaseModel):
    """What one pipeline call produces."""

    height: Height = 1024
    width: Width = 1024
    frames: Frames | None = None
    steps: Steps = 28
    batch: Batch = 1
    guidance_scale: GuidanceScale | None = Field(
        None, description="None: the pipeline's own default; the pipeline decides from it whether CFG runs"
    )


class StagePeak(BaseModel):
    stage: str = Field(description="the component (the VAE's decode is 'vae')")
    call: str = Field(description="which call: 'text_encoder', 'transformer step 0', 'vae decode' ...")
    resident_bytes: int
    working_bytes: int


class Estimate(BaseModel):
    vram_bytes: int
    ram_load_bytes: int
    ram_run_bytes: int
    seconds: float = Field(description="one call, steady state (not the first, which also warms up)")
    peak_stage: str
    stages: list[StagePeak]
    allocator: Literal["expandable_segments", "default"]
    basis: Basis = Field(description="measured: this family and kind of plan ran on a GPU; derived: from the code alone")


def trace_for(m: PipelineMeasurement, w: Workload) -> "Trace":
    """The dry run of ``m``'s pipeline at ``w`` (cached)."""
    from .dryrun import trace_pipeline

    return trace_pipeline(
        m.model, height=w.height, width=w.width, frames=w.frames, batch=w.batch, steps=w.steps,
        guidance_scale=w.guidance_scale, dtype=m.dtype,
    )  # fmt: skip


def denoiser_of(m: PipelineMeasurement) -> str:
    """The component that runs every step: the UNet, else the (first) transformer."""
    return next((n for n in ("unet", "transformer", "prior") if m.components.get(n) and m.components[n].bytes),
                next((n for n, c in m.components.items() if c.bytes and "transformer" in n), ""))  # fmt: skip


def estimate(
    plan: Plan, m: PipelineMeasurement, w: Workload, *, trace: "Trace | None" = None, gpu: GpuProfile | str | None = None,
    pageable_bytes_per_s: float | None = None, pinned_bytes_per_s: float | None = None,
    coefficients: Coefficients | None = None,
) -> Estimate:  # fmt: skip
    """Peak VRAM (driver), RSS while loading and running, and seconds per call of ``plan`` for ``w``."""
    k = coefficients or load_coefficients()
    profile = gpu if isinstance(gpu, GpuProfile) else gpu_profile(gpu)
    trace = trace or trace_for(m, w)
    weights = Weights.of(plan, m)

    # ---- VRAM: each call's resident weights and working memory
    on_device = [on + _upcast(plan, call, m) for call, on in zip(trace.calls, resident(plan, trace, weights))]
    stages = [
        StagePeak(stage=call.component, call=_label(call), resident_bytes=on, working_bytes=int(_working(plan, call, trace, weights, profile)))
        for call, on in zip(trace.calls, on_device)
    ]  # fmt: skip
    if not stages:  # nothing traced: the weights alone, as a floor
        stages = [StagePeak(stage="load", call="load", resident_bytes=weights.total, working_bytes=0)]
    at_load, layer = loading.device_bytes_at_load(plan, weights)
    if at_load:  # quantized on the GPU while loading, before the placement moves anything
        stages.append(StagePeak(stage="load", call="loading", resident_bytes=at_load, working_bytes=layer))
    index = max(range(len(stages)), key=lambda i: stages[i].resident_bytes + stages[i].working_bytes)
    peak = stages[index]
    allocated = peak.resident_bytes + peak.working_bytes
    # freed activation blocks the allocator keeps mapped; the caching allocator also keeps group buffers
    extra = profile.fragmentation_for(plan.allocator, conv_kind(trace.calls, index)) * peak.working_bytes
    if plan.allocator == "default" and plan.grouped:
        extra += profile.cached_per_offloaded_byte * weights.total
    vram = int(profile.context_bytes + allocated + extra)

    ram_load, ram_run = host_ram(plan, weights, k)

    # ---- seconds per call: FLOPs over the GPU's rates, per call, plus the placement's transfers
    steps_seen = max(trace.steps_run, 1)
    seconds = 0.0
    step = 0.0
    for call in trace.calls:
        t = call_seconds(call, profile)
        if call.step is not None:
            t *= _step_factor(plan, call.component, k)
            step += t / steps_seen
        else:
            seconds += t
    seconds += w.steps * step
    rates = Rates(pageable_bytes_per_s or k.pageable_bytes_per_s, pinned_bytes_per_s or k.pinned_bytes_per_s,
                  k.transfer_efficiency)  # fmt: skip
    seconds += transfer_seconds(plan, trace, weights, rates, w.steps, step)

    measured = signature(plan) in k.measured.get(m.pipeline_class, [])
    return Estimate(
        vram_bytes=vram, ram_load_bytes=int(ram_load), ram_run_bytes=int(ram_run), seconds=round(seconds, 3),
        peak_stage=peak.stage, stages=stages, allocator=plan.allocator, basis="measured" if measured else "derived",
    )  # fmt: skip


def conv_kind(calls: list["ComponentCall"], index: int) -> str:
    """'3d' when the call at ``index`` runs 3-D convolutions, else '2d' for 2-D ones, else 'none' (the loading
    stage, after the calls, runs none)."""
    kinds = {kind.split("_")[0] for kind in calls[index].convs} if index < len(calls) else set()
    return "3d" if "3d" in kinds else "2d" if "2d" in kinds else "none"


def call_seconds(call: "ComponentCall", profile: GpuProfile) -> float:
    """One component call's compute time: its matmul, convolution and attention FLOPs at the GPU's rates."""
    conv_rate = profile.conv_flops_per_s or profile.matmul_flops_per_s
    matmul = call.flops - call.conv_flops
    return (matmul / profile.matmul_flops_per_s + call.conv_flops / conv_rate
            + call.attention_flops / profile.attention_flops_per_s + profile.call_overhead_seconds)  # fmt: skip


def _label(call: "ComponentCall") -> str:
    if call.method != "forward":
        return f"{call.component} {call.method}"
    return call.component if call.step is None else f"{call.component} step {call.step}"


def _working(plan: Plan, call: "ComponentCall", trace: "Trace", weights: Weights, profile: GpuProfile) -> int:
    """The call's working memory under the plan: the VAE's tiled or sliced decode where the plan turns
    them on, cuDNN's workspace beside a convolution, plus one layer dequantized or upcast at a time for
    quantized or fp8-cast components."""
    if call.method == "decode":
        chosen = trace.decode_sliced if plan.vae.slicing and trace.decode_sliced else None
        chosen = chosen or (trace.decode_tiled if plan.vae.tiling else None)
        if chosen is not None and chosen.peak_bytes < call.peak_bytes:
            call = chosen
    # cuDNN's workspace beside a convolution, on top of what is live while it runs
    per_byte = profile.conv_workspace_per_byte
    working = max([call.peak_bytes] + [
        live + per_byte.get(kind, per_byte.get(kind.split("_")[0], 0.0)) * size  # unmeasured dtype: half precision's
        for kind, points in call.convs.items() for live, size in points
    ])  # fmt: skip
    if call.component in plan.converted and call.component in weights.bytes:
        working += weights.converted_layer(plan, call.component)  # the largest layer at full precision, while it computes
    return working


def _upcast(plan: Plan, call: "ComponentCall", m: PipelineMeasurement) -> int:
    """Weight bytes the pipeline added by upcasting the running component (SDXL's float16 VAE decodes in
    float32), where the plan leaves it at the loaded precision."""
    measured = m.components.get(call.component)
    if call.weight_bytes is None or measured is None or not measured.bytes or call.component in plan.converted:
        return 0
    return max(0, call.weight_bytes - measured.bytes)


def _step_factor(plan: Plan, component: str, k: Coefficients) -> float:
    factor = 1.0
    if plan.quantize and component in plan.quantize.components:
        factor *= k.step_factor.get(plan.quantize.backend, 1.0)
    if plan.layerwise_casting and component in plan.layerwise_casting.components:
        factor *= k.step_factor["fp8_cast"]
    if plan.compile != "none":
        factor *= k.compile_step_factor
    return factor


def host_ram(plan: Plan, weights: Weights, k: Coefficients) -> tuple[float, float]:
    """RSS while loading (up to the first call) and while running: the process's own, plus what the
    loading path reads and converts (strategies.loading) and what the placement holds (its module)."""
    per_byte = k.ram_copy_per_byte
    on_device = loading.on_device_after_load(plan, weights)
    setup = setup_host_bytes(plan, weights, per_byte, on_device)
    running = host_bytes(plan, weights, per_byte) + loading.host_leftover_bytes(plan, weights, per_byte)
    ram_load = k.ram_base_bytes["load"] + loading.host_bytes_at_load(plan, weights, setup, per_byte)
    return ram_load, k.ram_base_bytes["run"] + running


def signature(plan: Plan) -> str:
    """The shape of a plan as far as the models care: placement, streams, loading, precision, VAE, compile."""
    parts = [plan.offload]
    if plan.quantize and plan.loading != loading.default_load(plan.quantize.backend):  # not the backend's own way
        parts.append(f"load_{plan.loading}")
    if plan.allocator != "expandable_segments":
        parts.append(f"alloc_{plan.allocator}")
    if plan.grouped:
        g = plan.group_settings
        parts += [name for name, on in (("stream", g.use_stream), ("low_cpu_mem", g.low_cpu_mem_usage), ("disk", g.offload_to_disk)) if on]
    if plan.quantize:
        parts.append(plan.quantize.backend)
    if plan.layerwise_casting:
        parts.append("fp8_cast")
    parts += [name for name, on in (("tiling", plan.vae.tiling), ("slicing", plan.vae.slicing)) if on]
    if plan.compile != "none":
        parts.append(f"compile_{plan.compile}")
    if plan.attention_backend:
        parts.append(f"attention_{plan.attention_backend}")
    return "+".join(parts)
