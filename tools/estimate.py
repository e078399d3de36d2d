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

What the allocator reserves beyond the live tensors is replayed, not fitted: the dry run's own
allocations go through a model of PyTorch's caching allocator under the plan's allocator
(strategies.allocator), with the cache emptied where the placement empties it, block-level group
offloading's freed groups and quantized layers' dequantized copies; a fraction of the working memory
remains only where no replay exists (a tiled or sliced decode), and layerwise casting keeps its freed
upcast copies (strategies.layerwise_casting). Seconds come from the FLOPs the dry run counted at the
GPU's rates, plus the transfers the placement makes at the host's measured bandwidth. Host RAM is
the process's own plus what the loading path reads and converts and what the placement holds, per
byte of the weights concerned (strategies.loading, offload, group_offload), at the host's terms.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple

from pydantic import BaseModel, Field

from .gpus import GpuProfile, gpu_profile
from .measure import PipelineMeasurement
from .plan import Plan
from .strategies import (
    Rates,
    Weights,
    allocator,
    cache_emptied,
    host_bytes,
    layerwise_casting,
    loading,
    mapped_setup_bytes,
    onloaded_tensors,
    quantize,
    resident,
    setup_host_bytes,
    torch_compile,
    transfer_seconds,
)
from .strategies import cache as step_cache

if TYPE_CHECKING:
    from .dryrun import ComponentCall, Trace

CALIBRATION = Path(__file__).with_name("calibration.json")
Basis = Literal["measured", "derived"]


class Coefficients(BaseModel):
    """The host's RAM and transfer terms and the kernels' speed factors (fitted on the H100 host by the
    since-removed bench/fit_models.py; bench/fit_gpu.py --write keeps ``measured`` and ``margin_fraction``)."""

    gpu: str
    ram_base_bytes: dict[str, float] = Field(description="the process's RSS before any weight: 'load', 'load_held' (of it, the anonymous and "
        "shared part: the libraries' code is file pages) and 'run' (CUDA's host side)")
    ram_copy_per_byte: dict[str, float] = Field(
        description="RSS per byte of weights the host holds, by who holds them: model, model_quantized (its "
        "quantized components), sequential, group, "
        "group_low_cpu_mem (ordinary memory the host allocator keeps), pinned (per pinned byte), host_quantize "
        "(converting on the CPU while loading), host_leftover (what that conversion leaves)"
    )
    ram_per_output_byte: float = Field(
        0.0,
        description="RSS while running per byte of the decoded output at float32 (the pipeline's postprocessing "
        "holds it on the host: frames x height x width x 3 x 4 bytes)",
    )
    step_factor: dict[str, float] = Field(description="step time relative to bf16, by quantization backend or 'fp8_cast'")
    transfer_efficiency: dict[str, float] = Field(description="rate reached / measured pageable rate, by mechanism")
    copy_seconds: dict[str, float] = Field(
        default_factory=dict, description="fixed seconds per group copied, by group-offloading mechanism"
    )
    pageable_bytes_per_s: float
    pinned_bytes_per_s: float
    margin_fraction: float = Field(description="the largest under-prediction seen, kept free on the GPU")
    margin_fraction_by_allocator: dict[str, float] = Field(
        default_factory=dict,
        description="the same per allocator: expandable segments' runs and the default allocator's differ (SDXL's "
        "float32 decode under the default allocator was under by 20%)",
    )
    compile_step_factor: float = Field(0.85, description="regional compile's step time relative to eager")
    compile_seconds_per_block: float = Field(
        30.0, description="the first call's compile time per block compiled (regional: per repeated block class)"
    )
    compile_ram_bytes: float = Field(0.0, description="host RAM torch.compile keeps once it compiled (Inductor, Triton)")
    measured: dict[str, list[str]] = Field(
        default_factory=dict, description="pipeline class -> plan signatures run on a GPU (basis 'measured')"
    )
    provenance: dict = Field(default_factory=dict)

    def margin_for(self, allocator: str) -> float:
        """The share of the card kept free for plans run with ``allocator``."""
        return self.margin_fraction_by_allocator.get(allocator, self.margin_fraction)


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
    float,
    Field(ge=0, le=100, allow_inf_nan=False,
          description="the call's guidance_scale; omit for the model card's example's, else the pipeline's default"),
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


    def output_bytes(self) -> int:
        """The decoded output at float32, as the pipeline's postprocessing holds it on the host."""
        return 4 * 3 * self.height * self.width * (self.frames or 1) * self.batch


class StagePeak(BaseModel):
    stage: str = Field(description="the component (the VAE's decode is 'vae')")
    call: str = Field(description="which call: 'text_encoder', 'transformer step 0', 'vae decode' ...")
    resident_bytes: int
    working_bytes: int
    kept_bytes: int = Field(0, description="what the allocator reserves beyond the live tensors (freed blocks it keeps)")


class Estimate(BaseModel):
    vram_bytes: int
    ram_load_bytes: int
    ram_load_mapped_bytes: int = Field(
        0, description="of ram_load_bytes, file pages the kernel can drop: weight files mapped while read once, "
        "the libraries' code"
    )
    ram_run_bytes: int
    seconds: float = Field(description="one call, steady state (not the first, which also warms up)")
    first_call_seconds: float = Field(description="the first call: compiling included")
    peak_stage: str
    peak_call: int | None = Field(description="the peak's index in the dry run's calls; None: loading")
    peak_resident_bytes: int
    peak_working_bytes: int
    peak_kept_bytes: int = Field(0, description="the peak call's reserved memory beyond its live tensors and weights")
    stages: list[StagePeak] = Field(description="the largest call of each component and method, and loading")
    allocator: Literal["expandable_segments", "default"]
    basis: Basis = Field(description="measured: this family and kind of plan ran on a GPU; derived: from the code alone")

    @property
    def ram_load_held_bytes(self) -> int:
        """Loading's RSS peak less its file pages (weight files mapped while read once, the libraries'
        code), which a machine drops and reads again when memory is short."""
        return self.ram_load_bytes - self.ram_load_mapped_bytes

    @property
    def ram_bytes(self) -> int:
        """The RAM a machine must have: the larger of loading's held peak and running's."""
        return max(self.ram_load_held_bytes, self.ram_run_bytes)


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
    coefficients: Coefficients | None = None, memo: dict | None = None,
) -> Estimate:  # fmt: skip
    """Peak VRAM (driver), RSS while loading and running, and seconds per call of ``plan`` for ``w``.
    ``memo``: a dict the caller keeps for every plan of one trace and GPU (what no plan changes, once)."""
    k = coefficients or load_coefficients()
    profile = gpu if isinstance(gpu, GpuProfile) else gpu_profile(gpu)
    trace = trace or trace_for(m, w)
    weights = Weights.of(plan, m)

    # ---- VRAM: each call's resident weights and working memory
    denoiser = denoiser_of(m)
    # a step cache's state: created in the first denoiser call, freed when the pipeline call ends
    held = step_cache.held_bytes(plan, trace, denoiser)
    first = next((i for i, c in enumerate(trace.calls) if c.component == denoiser and c.step is not None), len(trace.calls))
    on_device = [on + _upcast(plan, call, m) + (held if i >= first else 0)
                 for i, (call, on) in enumerate(zip(trace.calls, resident(plan, trace, weights)))]  # fmt: skip
    memo = {} if memo is None else memo
    # (stage, label, resident, working, kept) per call, then the loading stage: plain tuples, as recommend asks
    # for hundreds of plans of tens of calls each; the models are made for the largest call of each stage only
    # each converted component's largest layer at full precision, held while that layer computes
    converted = {n: weights.converted_layer(plan, n) for n in plan.converted if n in weights.bytes}
    kept = _allocator_kept(plan, trace, weights, profile, memo, converted)
    entries = [(call.component, i, on, work, kept(i, call, on, work))
               for i, (call, on) in enumerate(zip(trace.calls, on_device))
               for work in (_working(plan, i, call, trace, profile, memo) + converted.get(call.component, 0),)]  # fmt: skip
    if not entries:  # nothing traced: the weights alone, as a floor
        entries = [("load", -1, weights.total, 0, 0)]
    at_load, layer = loading.device_bytes_at_load(plan, weights)
    if at_load:  # quantized on the GPU while loading, before the placement moves anything
        entries.append(("load", -1, at_load, layer, 0))
    index = max(range(len(entries)), key=lambda j: sum(entries[j][2:]))
    _, peak_call, peak_resident, peak_working, peak_kept = entries[index]
    extra = layerwise_casting.kept_bytes(plan, m, profile.cast_kept_per_byte)
    vram = int(profile.context_bytes + peak_resident + peak_working + peak_kept + extra)

    ram = host_ram(plan, weights, k, w.output_bytes())

    # ---- seconds per call: FLOPs over the GPU's rates, per call, plus the placement's transfers
    steps_seen = max(trace.steps_run, 1)
    backend = plan.attention_backend if denoiser != "unet" else None  # UNet attention does not dispatch
    saved_flops, saved_attention = step_cache.saved_per_cached_call(plan, trace, denoiser)
    cached = step_cache.cached_fraction(plan, w.steps, m.components[denoiser].class_name if denoiser else None)
    seconds = 0.0
    step = 0.0
    for i, call in enumerate(trace.calls):
        own = backend if call.component == denoiser else None
        key = ("seconds", i, own, plan.vae.tiling, plan.vae.slicing)  # all a call's compute time depends on
        if key not in memo:
            memo[key] = call_seconds(_decode_run(plan, call, trace), profile, own)
        t = memo[key]
        if call.step is not None:
            if call.component == denoiser and cached:  # the hooked modules do not run on cached steps
                t -= cached * compute_seconds(saved_flops, 0.0, saved_attention, profile, own)
            t *= _step_factor(plan, call.component, k)
            step += t / steps_seen
        else:
            seconds += t
    seconds += w.steps * step
    rates = Rates(pageable_bytes_per_s or k.pageable_bytes_per_s, pinned_bytes_per_s or k.pinned_bytes_per_s,
                  k.transfer_efficiency, k.copy_seconds)  # fmt: skip
    seconds += transfer_seconds(plan, trace, weights, rates, w.steps, step)

    compiling = torch_compile.first_call_seconds(plan, m.components.get(denoiser), k.compile_seconds_per_block)
    measured = signature(plan) in k.measured.get(m.pipeline_class, [])
    return Estimate(
        vram_bytes=vram, ram_load_bytes=int(ram.load), ram_load_mapped_bytes=int(ram.load_mapped), ram_run_bytes=int(ram.run), seconds=round(seconds, 3),
        first_call_seconds=round(seconds + compiling, 3),
        peak_stage=entries[index][0], peak_call=peak_call if peak_call >= 0 else None, peak_resident_bytes=peak_resident,
        peak_working_bytes=peak_working, peak_kept_bytes=peak_kept, stages=_largest_per_stage(entries, trace), allocator=plan.allocator,
        basis="measured" if measured else "derived",
    )  # fmt: skip


def _largest_per_stage(entries: list[tuple[str, int, int, int, int]], trace: "Trace") -> list[StagePeak]:
    """The largest call of each component and method (and the loading stage), in call order."""
    largest: dict[tuple[str, str], tuple[str, int, int, int, int]] = {}
    for entry in entries:
        stage, i = entry[:2]
        key = (stage, trace.calls[i].method if i >= 0 else "load")
        if key not in largest or sum(entry[2:]) > sum(largest[key][2:]):
            largest[key] = entry
    return [StagePeak(stage=stage, call=_label(trace.calls[i]) if i >= 0 else "loading", resident_bytes=on,
                      working_bytes=work, kept_bytes=kept) for stage, i, on, work, kept in largest.values()]  # fmt: skip


def _allocator_kept(plan: Plan, trace: "Trace", weights: Weights, profile: GpuProfile, memo: dict,
                    converted: dict[str, int]):  # fmt: skip
    """``kept(index, call, resident, working)``: what the allocator reserves during a call beyond its live
    tensors and the weights. From the dry run's allocations replayed under the plan's allocator
    (strategies.allocator): the run's blocks as the allocator lays them out, the freed ones earlier calls left
    cached, the cache emptied where the placement empties it, and the weights' own rounding. A decode the plan
    runs on another path (tiled, sliced) was not replayed: there, and for traces without allocations, the
    GPU's fragmentation share of the call's working memory."""
    emptied = cache_emptied(plan, trace, weights)
    onloads = onloaded_tensors(plan, trace, weights)
    dequantized = quantize.dequantized_for_matmuls(plan) if trace.weight_uses else frozenset()
    key = ("pool", plan.allocator, emptied, tuple((i, tuple(v)) for i, v in sorted(onloads.items())), dequantized)
    if key not in memo:
        memo[key] = (allocator.cached_pool_reserved(trace, plan, profile.conv_workspace_per_byte, emptied, onloads, dequantized)
                     if trace.allocations else None)  # fmt: skip
    if ("rounding", plan.allocator) not in memo:
        memo["rounding", plan.allocator] = allocator.weights_reserved_per_byte(trace, plan)
    pool, per_weight_byte = memo[key], memo["rounding", plan.allocator]

    def kept(index: int, call: "ComponentCall", resident: int, working: int) -> int:
        rounding = int((per_weight_byte - 1.0) * resident)
        if pool is None or call.events is None or _decode_run(plan, call, trace) is not call:
            return rounding + int(profile.fragmentation_for(plan.allocator, conv_kind(trace.calls, index)) * working)
        # the working memory counts one converted layer at full precision; the replay has each dequantized copy
        layer = converted.get(call.component, 0)
        replayed_copy = layer if call.component in dequantized else 0
        return rounding + max(0, pool[index] + layer - replayed_copy - working - sum(onloads.get(index, ())))

    return kept


def conv_kind(calls: list["ComponentCall"], index: int | None) -> str:
    """'3d' when the call at ``index`` runs 3-D convolutions, else '2d' for 2-D ones, else 'none' (the loading
    stage, -1 or None, runs none)."""
    kinds = {kind.split("_")[0] for kind in calls[index].convs} if index is not None and 0 <= index < len(calls) else set()
    return "3d" if "3d" in kinds else "2d" if "2d" in kinds else "none"


def call_seconds(call: "ComponentCall", profile: GpuProfile, attention_backend: str | None = None) -> float:
    """One component call's compute time: its matmul, convolution and attention FLOPs at the GPU's rates
    (attention at ``attention_backend``'s where the GPU's profile measured it)."""
    return compute_seconds(call.flops, call.conv_flops, call.attention_flops, profile, attention_backend) + profile.call_overhead_seconds


def compute_seconds(flops: float, conv_flops: float, attention_flops: float, profile: GpuProfile,
                    attention_backend: str | None = None) -> float:  # fmt: skip
    """FLOPs at the GPU's rates: matmuls, convolutions and attention (by backend)."""
    conv_rate = profile.conv_flops_per_s or profile.matmul_flops_per_s
    attention_rate = profile.attention_flops_per_s * profile.attention_speed.get(attention_backend or "native", 1.0)
    return (flops - conv_flops) / profile.matmul_flops_per_s + conv_flops / conv_rate + attention_flops / attention_rate


def _label(call: "ComponentCall") -> str:
    if call.method != "forward":
        return f"{call.component} {call.method}"
    return call.component if call.step is None else f"{call.component} step {call.step}"


def _working(plan: Plan, index: int, call: "ComponentCall", trace: "Trace", profile: GpuProfile, memo: dict) -> int:
    """The call's working memory under the plan before any converted layer: the VAE's tiled or sliced decode
    where the plan turns them on, cuDNN's workspace beside a convolution. ``memo`` keeps it per call and VAE
    settings (nothing else changes it)."""
    key = (index, plan.vae.tiling, plan.vae.slicing)
    working = memo.get(key)
    if working is None:
        chosen = _decode_run(plan, call, trace)
        if chosen.peak_bytes < call.peak_bytes:
            call = chosen
        # cuDNN's workspace beside a convolution, on top of what is live while it runs
        per_byte = profile.conv_workspace_per_byte
        working = memo[key] = max([call.peak_bytes] + [
            live + per_byte.get(kind, per_byte.get(kind.split("_")[0], 0.0)) * size  # unmeasured dtype: half precision's
            for kind, points in call.convs.items() for live, size in points
        ])  # fmt: skip
    return int(working)


def _decode_run(plan: Plan, call: "ComponentCall", trace: "Trace") -> "ComponentCall":
    """The VAE decode the plan runs: its own sliced or tiled path where the plan turns it on (overlapping
    tiles: more FLOPs), else the call as traced."""
    if call.method != "decode":
        return call
    chosen = trace.decode_sliced if plan.vae.slicing and trace.decode_sliced else None
    return chosen or (trace.decode_tiled if plan.vae.tiling else None) or call


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


class HostRam(NamedTuple):
    load: float  # RSS while loading, up to the first call
    load_mapped: float  # of it, file pages the kernel can drop: weight files read once, the libraries' code
    run: float  # RSS while running


def host_ram(plan: Plan, weights: Weights, k: Coefficients, output_bytes: float = 0.0) -> HostRam:
    """RSS while loading (up to the first call) and while running: the process's own, plus what the
    loading path reads and converts (strategies.loading) and what the placement holds (its module);
    while running also the decoded output (``output_bytes``: Workload.output_bytes). ``load_mapped``
    is what loading's peak has fewer when file pages are not held: the weight files the loading path and
    the placement read once through their mmap, and the process's own mapped libraries (the base's
    ``load_held`` is its anonymous and shared part)."""
    per_byte = k.ram_copy_per_byte
    on_device = loading.on_device_after_load(plan, weights)
    setup = setup_host_bytes(plan, weights, per_byte, on_device)
    held_setup = setup - mapped_setup_bytes(plan, weights, on_device)
    running = host_bytes(plan, weights, per_byte) + loading.host_leftover_bytes(plan, weights, per_byte)
    at_load = loading.host_bytes_at_load(plan, weights, setup, per_byte)
    held_at_load = loading.host_bytes_at_load(plan, weights, held_setup, per_byte, held=True)
    compiler = k.compile_ram_bytes if plan.compile != "none" else 0.0  # compiling happens in the first call
    output = k.ram_per_output_byte * output_bytes
    base, base_held = k.ram_base_bytes["load"], k.ram_base_bytes.get("load_held", k.ram_base_bytes["load"])
    mapped = base - base_held + at_load - held_at_load
    return HostRam(base + at_load, mapped, k.ram_base_bytes["run"] + running + compiler + output)


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
    if plan.cache is not None:
        parts.append(f"cache_{plan.cache.method}" + ("_lite" if getattr(plan.cache, "lite", False) else ""))
    if plan.compile != "none":
        parts.append(f"compile_{plan.compile}")
    if plan.attention_backend:
        parts.append(f"attention_{plan.attention_backend}")
    return "+".join(parts)
