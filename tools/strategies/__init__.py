"""Memory and speed strategies, one module each: what a strategy does to memory, the rules it must
obey, and the code that applies it to a pipeline.

- ``quantize``: bitsandbytes nf4 / int8 and torchao int8 / fp8 weight-only, which layers each converts.
- ``layerwise_casting``: fp8 storage of diffusers models' weights, upcast per layer.
- ``offload``: where the pipeline lives: all on the device, model CPU offload, sequential offload.
- ``group_offload``: the groups diffusers' group offloading really makes.
- ``loading``: how quantized components load (on the GPU, in host RAM, or one at a time).
- ``vae``: VAE tiling and slicing.
- ``torch_compile``: regional (repeated blocks) or full torch.compile of the denoiser.
- ``attention``: the attention backend of the denoiser.

Each module declares ``RULES`` (see ``tools.plan.Rule``) and an ``apply`` function returning ``Code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..dryrun import Trace
    from ..measure import PipelineMeasurement
    from ..plan import Plan


@dataclass(frozen=True)
class Site:
    """Where applied code lands in a script: source expressions for the pipeline and its settings."""

    pipe: str = "pipe"
    device: str = '"cuda"'
    dtype: str = "torch.bfloat16"
    denoiser: str = "transformer"

    @property
    def device_is_default_cuda(self) -> bool:
        return self.device in ('"cuda"', "'cuda'")


@dataclass(frozen=True)
class Code:
    """Source applying one strategy: statements run once the pipeline exists, the imports they use,
    and the edit in words for the person reviewing the change."""

    statements: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    edit: str = ""


@dataclass(frozen=True)
class Weights:
    """Each component's bytes on the device under a plan (quantized, fp8-cast or as measured), with
    the measured offload units scaled the same way."""

    bytes: dict[str, int]
    measured: "PipelineMeasurement" = field(repr=False)
    measured_backend: dict[str, str] = field(default_factory=dict, repr=False)  # quantized component -> sizes' backend

    @classmethod
    def of(cls, plan: "Plan", m: "PipelineMeasurement") -> "Weights":
        backend = {n: _measured_as(plan.quantize.backend) for n in plan.quantize.components} if plan.quantize else {}
        return cls({n: device_bytes(plan, n, c) for n, c in m.components.items() if c.bytes}, m, backend)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def _scale(self, name: str) -> float:
        return self.bytes[name] / max(self.measured.components[name].bytes or 1, 1)

    def _largest_kept(self, name: str) -> bool:
        """Whether the plan's quantization leaves ``name``'s largest layer as it is: larger than any layer the
        backend converts (an embedding: bitsandbytes and torchao convert Linear layers only)."""
        plan_backend = self.measured_backend.get(name)
        comp = self.measured.components[name]
        converted = (comp.largest_quantized_layer_bytes or {}).get(plan_backend) if plan_backend else None
        return converted is not None and (comp.largest_leaf_bytes or 0) > converted

    def largest_leaf(self, name: str) -> int:
        """The largest layer of ``name`` as stored under the plan."""
        if name not in self.bytes:
            return 0
        largest = self.measured.components[name].largest_leaf_bytes or 0
        return largest if self._largest_kept(name) else int(largest * self._scale(name))

    def leaf_pair(self, name: str) -> int:
        """The two largest layers of ``name`` as stored under the plan (group_offload.leaf_pair_bytes); twice
        the largest where the measurement predates the field. A largest layer the quantization leaves alone
        (UMT5's shared embedding under torchao) keeps its size; the other shrinks with the component."""
        if name not in self.bytes:
            return 0
        comp = self.measured.components[name]
        largest = comp.largest_leaf_bytes or 0
        pair = comp.leaf_pair_bytes if comp.leaf_pair_bytes is not None else 2 * largest
        if self._largest_kept(name):
            return int(largest + (pair - largest) * self._scale(name))
        return int(pair * self._scale(name))

    def converted_layer(self, plan: "Plan", name: str) -> int:
        """The largest layer of ``name`` the plan converts, at full precision: what it holds dequantized
        (or upcast) while that layer computes, or before it is quantized while loading."""
        comp = self.measured.components[name]
        if plan.quantize and name in plan.quantize.components:
            return (comp.largest_quantized_layer_bytes or {}).get(_measured_as(plan.quantize.backend), comp.largest_leaf_bytes or 0)
        cast = plan.layerwise_casting is not None and name in plan.layerwise_casting.components
        return (comp.largest_leaf_bytes or 0) if cast else 0

    def block_peak(self, name: str, key: str) -> int:
        """The most bytes of ``name`` block-level offloading holds at once (``key``: blocks per group, or
        "stream"), as stored under the plan; the whole component where it was not measured."""
        peaks = self.measured.components[name].block_offload_peak_bytes
        measured = peaks.get(key) if peaks else None
        if measured is None and peaks:  # a group size between the measured ones: the next larger
            larger = [int(k) for k in peaks if k.isdigit() and int(k) >= int(key or 1)]
            measured = peaks[str(min(larger))] if larger else None
        return int((measured if measured is not None else self.measured.components[name].bytes) * self._scale(name))


def device_bytes(plan: "Plan", name: str, comp) -> int:
    """A component's bytes on the device under ``plan`` (quantized, fp8-cast or as measured)."""
    size = comp.bytes or 0
    if plan.quantize and name in plan.quantize.components:
        return (comp.quantized_bytes or {}).get(_measured_as(plan.quantize.backend), size)
    if plan.layerwise_casting and name in plan.layerwise_casting.components:
        return comp.layerwise_fp8_bytes or size
    return size


def _measured_as(backend: str) -> str:
    """The backend whose measured sizes stand for ``backend``'s: torchao's fp8 configs (weight-only and
    dynamic-activation) store a byte per weight, as its int8 does."""
    return "torchao_int8wo" if backend in ("torchao_fp8wo", "torchao_fp8dq") else backend


def resident(plan: "Plan", trace: "Trace", weights: Weights) -> list[int]:
    """Weight bytes on the device during each call of ``trace``, by the plan's placement module."""
    return plan.placement_module().resident(plan, trace, weights)


def cache_emptied(plan: "Plan", trace: "Trace", weights: Weights) -> frozenset[int]:
    """The calls before which the plan's placement empties the allocator's cache, by its module."""
    return plan.placement_module().cache_emptied(plan, trace, weights)


def onloaded_tensors(plan: "Plan", trace: "Trace", weights: Weights) -> dict[int, list[int]]:
    """The weight tensors the placement brings into the allocator's pool during each call, by its module."""
    return plan.placement_module().onloaded_tensors(plan, trace, weights)


@dataclass(frozen=True)
class Rates:
    """How fast this host moves weights: its measured pageable and pinned copy rates, and the share of
    the pageable rate each offloading mechanism reaches (fitted on the H100 host)."""

    pageable_bytes_per_s: float
    pinned_bytes_per_s: float
    efficiency: dict[str, float]
    copy_seconds: dict[str, float] = field(default_factory=dict)  # per copy, by mechanism: launch and sync


def moved_per_step(trace: "Trace", weights: Weights, kept: set[str] = frozenset()) -> tuple[float, float]:
    """(bytes of the components called in the denoising loop, per step; bytes of the others): what an
    offloading hook moves through the GPU per step and once per call."""
    return per_step(trace, weights.bytes, kept)


def per_step(trace: "Trace", per_call: dict[str, float], kept: set[str] = frozenset()) -> tuple[float, float]:
    """(``per_call`` summed over the denoising loop's calls, per step; summed over the other components, once):
    ``per_call`` is what each component's call costs (bytes moved, copies made)."""
    in_loop = [c.component for c in trace.calls if c.step is not None and c.component not in kept]
    looped = set(in_loop)
    others = sum(v for n, v in per_call.items() if n not in looped and n not in kept)
    return sum(per_call.get(n, 0) for n in in_loop) / max(trace.steps_run, 1), others


def transfer_seconds(plan: "Plan", trace: "Trace", weights: Weights, rates: Rates, steps: int, step_seconds: float) -> float:
    """Seconds per call the plan's offloading spends moving weights beyond the compute, by its placement module."""
    return plan.placement_module().transfer_seconds(plan, trace, weights, rates, steps, step_seconds)


def host_bytes(plan: "Plan", weights: Weights, copy_per_byte: dict[str, float]) -> float:
    """Host RAM the plan's placement holds while the pipeline runs, above the process's own."""
    return plan.placement_module().host_bytes(plan, weights, copy_per_byte)


def setup_host_bytes(plan: "Plan", weights: Weights, copy_per_byte: dict[str, float], on_device: list[str]) -> float:
    """Host RAM the plan's placement takes when applied, with ``on_device`` already on the GPU."""
    return plan.placement_module().setup_host_bytes(plan, weights, copy_per_byte, on_device)


def mapped_setup_bytes(plan: "Plan", weights: Weights, on_device: list[str]) -> float:
    """Of ``setup_host_bytes``, the weight files' pages mapped while the placement reads them once: file
    pages the kernel can drop, so a machine need not hold them."""
    return plan.placement_module().mapped_setup_bytes(plan, weights, on_device)
