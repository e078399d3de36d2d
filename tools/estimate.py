"""Predicted peak VRAM, host RAM and seconds per call of one plan, from measured component sizes.

The model is a sum of exact and fitted terms. Exact: what each placement keeps on the GPU in each
stage (the bytes of every component after quantization or fp8 casting, offload groups, largest
layers, all from measure_components). Fitted on full-size pipelines run on the GPU
(bench/fit_models.py over bench/results/strategies-*.jsonl, stored in tools/calibration.json):
the CUDA context, activations per latent element of the denoiser, the VAE decode per output
element, host RAM per byte loaded or offloaded, matmul and attention throughput, the transfer
rates the offloading hooks reach relative to the host's measured pageable bandwidth.

Peak VRAM is the driver's (shared/design.md): context + max over stages of (resident weights +
that stage's working memory). The stages are each text encoder, the denoiser, the VAE decode.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .errors import PipefitError
from .measure import ComponentMeasurement, PipelineMeasurement
from .plan import Plan
from .strategies.quantize import LOADS_IN_HOST_RAM
from .strategies.vae import tile_size

CALIBRATION = Path(__file__).with_name("calibration.json")
Basis = Literal["calibrated", "modelled"]

# How a pipeline runs classifier-free guidance: (batch per forward, forwards per step).
_GUIDANCE = {"StableDiffusionXL": (2, 1), "StableDiffusion": (2, 1), "Wan": (1, 2), "Flux": (1, 1), "QwenImage": (1, 2)}
# Text tokens that join the image tokens in the denoiser's attention (joint attention models).
_JOINT_TEXT_TOKENS = {"Flux": 512, "SD3": 333, "QwenImage": 512}
# Dense bf16 throughput, to scale step times measured on the calibration GPU (vendor figures, TFLOP/s).
GPU_BF16_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "B200": 2250, "A100": 312, "L40S": 362, "L40": 181,
                   "A10G": 70, "A10": 125, "L4": 121, "RTX 4090": 165, "RTX 4080": 97, "RTX 3090": 71, "T4": 65,
                   "RTX 5090": 210, "A6000": 155}  # fmt: skip


class Coefficients(BaseModel):
    """The fitted terms (bench/fit_models.py writes them; the provenance says on what)."""

    gpu: str
    context_bytes: float
    denoise_bytes_per_element: dict[str, float] = Field(description="by denoiser kind: unet, transformer")
    decode_bytes_per_element: dict[str, float] = Field(description="by VAE class, and 'default'")
    tiled_decode_factor: float
    decode_fragmentation: dict[str, float] = Field(
        description="the decode's working memory relative to a plan that keeps everything on the GPU, by "
        "'placement:VAE class'"
    )
    decode_leftover: dict[str, float] = Field(
        default_factory=dict,
        description="group offloading: the allocator's cache of freed groups the decode cannot reuse, per "
        "byte of the weights offloaded before it, by placement",
    )
    ram_load_base_bytes: float
    ram_run_base_bytes: float
    ram_load_per_byte: dict[str, float] = Field(description="'largest' (streamed to the GPU), 'host' (held on the CPU)")
    ram_run_offloaded_per_byte: dict[str, float] = Field(description="by mechanism: model, sequential, group")
    ram_run_host_per_byte: float = Field(description="left over from quantizing or casting in host RAM")
    ram_run_pinned_per_byte: float
    matmul_flops_per_s: dict[str, float]
    attention_flops_per_s: float
    step_overhead_seconds: float
    decode_seconds_per_element: float
    tiled_decode_time_factor: float
    encode_seconds: float
    step_factor: dict[str, float] = Field(description="step time relative to bf16, by quantization backend or 'fp8_cast'")
    transfer_efficiency: dict[str, float] = Field(description="rate reached / measured pageable rate, by mechanism")
    pageable_bytes_per_s: float
    pinned_bytes_per_s: float
    margin_fraction: float = Field(description="the largest under-prediction seen in calibration, kept as a margin")
    compile_step_factor: float = Field(0.85, description="not calibrated: regional compile's usual step gain")
    calibrated_signatures: list[str] = Field(default_factory=list, description="plan shapes run in calibration")
    provenance: dict = Field(default_factory=dict)


@cache
def load_coefficients(path: str = str(CALIBRATION)) -> Coefficients:
    """The coefficients shipped with pipefit."""
    return Coefficients.model_validate(json.loads(Path(path).read_text()))


class Workload(BaseModel):
    """What one pipeline call produces."""

    height: int = Field(1024, ge=8)
    width: int = Field(1024, ge=8)
    frames: int | None = Field(None, ge=1, description="video pipelines")
    steps: int = Field(28, ge=1)
    batch: int = Field(1, ge=1)


class StagePeak(BaseModel):
    stage: str
    resident_bytes: int
    working_bytes: int


class Estimate(BaseModel):
    vram_bytes: int
    ram_load_bytes: int
    ram_run_bytes: int
    seconds: float = Field(description="one call, steady state (not the first, which also warms up)")
    peak_stage: str
    stages: list[StagePeak]
    basis: Basis = Field(description="calibrated: this kind of plan was run in calibration; modelled: extrapolated")


@dataclass(frozen=True)
class Architecture:
    """What the models need to know about a pipeline, read from its measured configs."""

    pipeline_class: str
    denoiser: str
    denoiser_kind: str  # unet | transformer
    encoders: tuple[str, ...]
    vae: str | None
    hidden: int
    layers: int
    denoiser_params: int
    patch: int
    text_tokens: int
    guidance_batch: int
    forwards_per_step: int
    vae_class: str | None
    vae_channels: int
    vae_spatial: int
    vae_temporal: int | None
    vae_upcast: bool
    tile: int | None

    @classmethod
    def of(cls, m: PipelineMeasurement) -> Architecture:
        comps = m.components
        denoiser = "unet" if "unet" in comps else "transformer"
        if denoiser not in comps:
            raise PipefitError(
                f"{m.pipeline_class} has neither a transformer nor a unet component: recommend has no model for it.",
                "Measure it with `pipefit measure` and size it by hand from the component figures.",
            )
        d, dc = comps[denoiser], comps[denoiser].config
        vae_name = "vae" if "vae" in comps and comps["vae"].bytes else None
        vc = comps[vae_name].config if vae_name else {}
        prefix = next((p for p in _GUIDANCE if m.pipeline_class.startswith(p)), None)
        batch, forwards = _GUIDANCE.get(prefix, (2, 1))
        text = next((n for p, n in _JOINT_TEXT_TOKENS.items() if m.pipeline_class.startswith(p)), 0)
        if denoiser == "unet":
            hidden, layers, patch = max(dc.get("block_out_channels") or [1280]), 0, 1
        else:
            hidden = (dc.get("num_attention_heads") or 24) * (dc.get("attention_head_dim") or 128)
            layers = (dc.get("num_layers") or 0) + (dc.get("num_single_layers") or 0)
            patch_cfg = dc.get("patch_size") or 1
            patch = patch_cfg[-1] if isinstance(patch_cfg, list) else patch_cfg
            latent_channels = vc.get("latent_channels") or vc.get("z_dim") or 16
            packed = (dc.get("in_channels") or latent_channels) // latent_channels
            if packed > 1:  # Flux packs 2x2 latent patches into channels
                patch = max(patch, math.isqrt(packed))
        spatial = vc.get("scale_factor_spatial") or 2 ** (len(vc.get("block_out_channels") or [0, 0, 0, 0]) - 1)
        channels = (vc.get("block_out_channels") or [vc.get("base_dim") or 128])[0]
        return cls(
            pipeline_class=m.pipeline_class, denoiser=denoiser, denoiser_kind=denoiser,
            encoders=tuple(n for n in comps if n.startswith(("text_encoder", "image_encoder")) and comps[n].bytes),
            vae=vae_name, hidden=hidden, layers=layers, denoiser_params=d.params or 0, patch=patch,
            text_tokens=text, guidance_batch=batch, forwards_per_step=forwards,
            vae_class=comps[vae_name].class_name if vae_name else None, vae_channels=channels,
            vae_spatial=spatial, vae_temporal=vc.get("scale_factor_temporal"),
            vae_upcast=bool(vc.get("force_upcast")) and m.dtype == "float16",
            tile=tile_size(comps[vae_name].class_name, vc) if vae_name else None,
        )  # fmt: skip

    def tokens(self, w: Workload) -> int:
        """Tokens (or latent pixels) the denoiser sees per sample."""
        side = self.vae_spatial * self.patch
        frames = 1 if not (w.frames and self.vae_temporal) else (w.frames - 1) // self.vae_temporal + 1
        return (w.height // side) * (w.width // side) * frames + self.text_tokens

    def denoise_elements(self, w: Workload) -> float:
        return self.tokens(w) * self.hidden * self.guidance_batch * w.batch

    def decode_elements(self, w: Workload, tiled: bool = False, sliced: bool = False, whole: bool = False) -> float:
        """Output elements the VAE holds at once (``whole``: in all), at its widest level, times its dtype's bytes."""
        h, wd = w.height, w.width
        if tiled and self.tile:
            h, wd = min(h, self.tile), min(wd, self.tile)
        video = bool(w.frames and self.vae_temporal)
        # causal video VAEs decode a latent frame (temporal factor output frames) at a time
        frames = (w.frames if whole else self.vae_temporal) if video else 1
        batch = 1 if sliced else w.batch
        return h * wd * frames * self.vae_channels * batch * (4 if self.vae_upcast else 2)

    def step_flops(self, w: Workload) -> tuple[float, float]:
        """(matmul, attention) FLOPs of one denoising step."""
        t = self.tokens(w)
        n = self.guidance_batch * self.forwards_per_step * w.batch
        return 2.0 * self.denoiser_params * t * n, 4.0 * self.layers * t * t * self.hidden * n


def weight_bytes(plan: Plan, name: str, comp: ComponentMeasurement) -> int:
    """A component's bytes on the device under ``plan`` (quantized, fp8-cast or as measured)."""
    size = comp.bytes or 0
    if plan.quantize and name in plan.quantize.components:
        backend = "torchao_int8wo" if plan.quantize.backend == "torchao_fp8wo" else plan.quantize.backend
        return (comp.quantized_bytes or {}).get(backend, size)
    if plan.layerwise_casting and name in plan.layerwise_casting.components:
        return comp.layerwise_fp8_bytes or size
    return size


def _resident(plan: Plan, arch: Architecture, m: PipelineMeasurement, weights: dict[str, int], active: str) -> int:
    """Bytes of weights on the GPU while ``active`` runs."""
    if plan.offload == "none":
        return sum(weights.values())
    scale = weights[active] / max(m.components[active].bytes or 1, 1)
    leaf = int((m.components[active].largest_leaf_bytes or 0) * scale)
    if plan.offload == "model":
        return weights[active]
    if plan.offload == "sequential":
        return 2 * leaf
    group = plan.group_settings
    resident = sum(weights[c] for c in group.exclude if c in weights)
    if active in group.exclude:
        return resident
    ahead = 2 if group.use_stream else 1  # streams prefetch the next group while one runs
    if plan.offload == "group_leaf":
        return resident + ahead * leaf
    groups = m.components[active].block_offload_groups_bytes or [weights[active]]
    per = 1 if group.use_stream else group.num_blocks_per_group
    blocks, root = (groups[:-1], groups[-1]) if len(groups) > 1 else (groups, 0)
    chunks = [sum(blocks[i : i + per]) for i in range(0, len(blocks), per)] or [0]
    # with streams the next group is copied in while one runs: two neighbours at once
    window = max(sum(chunks[i : i + 2]) for i in range(len(chunks))) if group.use_stream else max(chunks)
    return resident + int((window + root) * scale)


def estimate(
    plan: Plan, m: PipelineMeasurement, w: Workload, *, gpu_name: str | None = None,
    pageable_bytes_per_s: float | None = None, pinned_bytes_per_s: float | None = None,
    coefficients: Coefficients | None = None,
) -> Estimate:  # fmt: skip
    """Peak VRAM (driver), RSS while loading and running, and seconds per call of ``plan`` for ``w``."""
    k = coefficients or load_coefficients()
    arch = Architecture.of(m)
    models = {n: c for n, c in m.components.items() if c.bytes}
    weights = {n: weight_bytes(plan, n, c) for n, c in models.items()}

    # ---- VRAM: each stage's resident weights and working memory
    tiled = plan.vae.tiling and arch.tile is not None and max(w.height, w.width) > arch.tile  # else no tiles
    decode = arch.decode_elements(w, tiled, plan.vae.slicing)
    vae_k = k.decode_bytes_per_element.get(arch.vae_class or "", k.decode_bytes_per_element["default"])
    work = {
        arch.denoiser: k.denoise_bytes_per_element.get(arch.denoiser_kind, 0.0) * arch.denoise_elements(w) * 2,
        **({arch.vae: vae_k * decode * (k.tiled_decode_factor if tiled else 1.0) * _fragmentation(plan, arch.vae_class, k)
                      + _leftover(plan, k) * _grouped_bytes(plan, weights, arch.vae)}
           if arch.vae else {}),
    }
    order = [*arch.encoders, arch.denoiser, *([arch.vae] if arch.vae else [])]
    stages = [
        StagePeak(stage=name, resident_bytes=_resident(plan, arch, m, weights, name), working_bytes=int(work.get(name, 0)))
        for name in order
    ]  # fmt: skip
    peak = max(stages, key=lambda s: s.resident_bytes + s.working_bytes)
    vram = int(k.context_bytes + peak.resident_bytes + peak.working_bytes)

    # ---- host RAM
    full = {n: c.bytes or 0 for n, c in models.items()}
    offloading = plan.offload != "none"
    host_loaded = bool(plan.layerwise_casting) or bool(plan.quantize and plan.quantize.backend in LOADS_IN_HOST_RAM)
    if host_loaded:  # quantized or cast on the CPU: the whole pipeline passes through host RAM
        ram_load = k.ram_load_base_bytes + k.ram_load_per_byte["host"] * sum(full.values())
    elif offloading:  # the hooks take the weights as they are mapped from the files
        ram_load = k.ram_load_base_bytes
    else:  # moved to the GPU component by component
        ram_load = k.ram_load_base_bytes + k.ram_load_per_byte["largest"] * max(full.values())
    ram_run = k.ram_run_base_bytes
    converted = {*(plan.layerwise_casting.components if plan.layerwise_casting else [])}
    if plan.quantize and plan.quantize.backend in LOADS_IN_HOST_RAM:
        converted |= set(plan.quantize.components)
    ram_run += k.ram_run_host_per_byte * sum(full.get(n, 0) for n in converted)
    if offloading:
        kept = set(plan.group_settings.exclude) if plan.offload.startswith("group") else set()
        off = sum(b for n, b in weights.items() if n not in kept)
        g = plan.group_settings
        pinned = plan.offload.startswith("group") and g.use_stream and not g.low_cpu_mem_usage
        per_byte = k.ram_run_offloaded_per_byte
        fitted = per_byte.get(ram_mechanism(plan), max(per_byte.values()))
        ram_run += off * (k.ram_run_pinned_per_byte if pinned else fitted)
        if pinned:
            ram_load = max(ram_load, ram_run)  # pinned copies are made at setup

    # ---- seconds per call
    scale = _speed_scale(gpu_name, k)
    matmul, attention = arch.step_flops(w)
    step = matmul / k.matmul_flops_per_s[arch.denoiser_kind] + attention / k.attention_flops_per_s
    step = step * scale + k.step_overhead_seconds
    if plan.quantize and arch.denoiser in plan.quantize.components:
        step *= k.step_factor.get(plan.quantize.backend, 1.0)
    if plan.layerwise_casting and arch.denoiser in plan.layerwise_casting.components:
        step *= k.step_factor["fp8_cast"]
    if plan.compile != "none":
        step *= k.compile_step_factor
    decode_s = k.decode_seconds_per_element * arch.decode_elements(w, whole=True) * scale
    if tiled:
        decode_s *= k.tiled_decode_time_factor
    seconds = k.encode_seconds + w.steps * step + decode_s
    seconds += _transfer_seconds(plan, arch, weights, w, step, k, pageable_bytes_per_s, pinned_bytes_per_s)

    calibrated = signature(plan) in k.calibrated_signatures
    return Estimate(
        vram_bytes=vram, ram_load_bytes=int(ram_load), ram_run_bytes=int(ram_run), seconds=round(seconds, 3),
        peak_stage=peak.stage, stages=stages, basis="calibrated" if calibrated else "modelled",
    )  # fmt: skip


def placement(plan: Plan) -> str:
    """How weights move, as far as the allocator sees it: none, model, sequential, group_block,
    group_leaf, and the group ones with a CUDA stream (``_stream``)."""
    stream = plan.offload.startswith("group") and plan.group_settings.use_stream
    return plan.offload + ("_stream" if stream else "")


def _fragmentation(plan: Plan, vae_class: str | None, k: Coefficients) -> float:
    """Measured for this placement and VAE class; else the largest seen for the placement, else any."""
    table, where = k.decode_fragmentation, placement(plan)
    if where == "none":
        return 1.0
    if (key := f"{where}:{vae_class}") in table:
        return table[key]
    seen = [v for name, v in table.items() if name.split(":")[0] == where] or list(table.values()) or [1.0]
    return max(seen)


def _grouped_bytes(plan: Plan, weights: dict[str, int], vae: str) -> int:
    """Weights group offloading moves through the GPU before the decode."""
    if not plan.offload.startswith("group"):
        return 0
    return sum(b for n, b in weights.items() if n != vae and n not in plan.group_settings.exclude)


def _leftover(plan: Plan, k: Coefficients) -> float:
    if not plan.offload.startswith("group"):
        return 0.0
    return k.decode_leftover.get(placement(plan), max(k.decode_leftover.values(), default=0.0))


def _speed_scale(gpu_name: str | None, k: Coefficients) -> float:
    """Step time on ``gpu_name`` relative to the calibration GPU, by dense bf16 throughput."""
    def tflops(name: str | None) -> float | None:
        return next((v for key, v in sorted(GPU_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if name and key in name), None)  # fmt: skip

    here, there = tflops(gpu_name), tflops(k.gpu)
    return there / here if here and there else 1.0


def _transfer_seconds(
    plan: Plan, arch: Architecture, weights: dict[str, int], w: Workload, step: float, k: Coefficients,
    pageable: float | None, pinned: float | None,
) -> float:  # fmt: skip
    """Time the offloading hooks spend moving weights in one call, beyond the compute."""
    pageable = pageable or k.pageable_bytes_per_s
    pinned = pinned or k.pinned_bytes_per_s
    eff = k.transfer_efficiency
    den = weights[arch.denoiser]
    others = sum(b for n, b in weights.items() if n != arch.denoiser)
    per_step = den * arch.forwards_per_step
    if plan.offload == "none":
        return 0.0
    if plan.offload == "model":  # each component moved on and off once per call
        return 2 * sum(weights.values()) / (eff["model"] * pageable)
    group = plan.group_settings
    kept = set(group.exclude) if plan.offload.startswith("group") else set()
    per_step = 0 if arch.denoiser in kept else per_step
    others = sum(b for n, b in weights.items() if n != arch.denoiser and n not in kept)
    if plan.offload.startswith("group") and group.use_stream:
        if group.low_cpu_mem_usage:  # pinned on the fly: no overlap to speak of
            rate = eff["stream_low_cpu_mem"] * pageable
            return (w.steps * per_step + others) / rate
        return w.steps * max(0.0, per_step / pinned - step) + others / pinned
    # layer by layer, or group by group without streams: each move waits for the last
    rate = eff.get(transfer_mechanism(plan), eff["sequential"]) * pageable
    return (w.steps * per_step + others) / rate


def ram_mechanism(plan: Plan) -> str:
    """Which fitted host-RAM term a plan's offloaded weights follow: model, sequential or group."""
    return "group" if plan.offload.startswith("group") else plan.offload


def transfer_mechanism(plan: Plan) -> str | None:
    """Which fitted transfer rate a plan's moves run at: model, sequential, group (no streams) or
    stream_low_cpu_mem (None: no moves, or pinned streams, which run at the measured pinned rate)."""
    if plan.offload in ("model", "sequential"):
        return plan.offload
    if plan.offload.startswith("group"):
        g = plan.group_settings
        return "group" if not g.use_stream else "stream_low_cpu_mem" if g.low_cpu_mem_usage else None
    return None


def signature(plan: Plan) -> str:
    """The shape of a plan as far as the models care: placement, streams, precision, VAE, compile."""
    parts = [plan.offload]
    if plan.offload.startswith("group"):
        g = plan.group_settings
        parts += [name for name, on in (("stream", g.use_stream), ("low_cpu_mem", g.low_cpu_mem_usage)) if on]
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
