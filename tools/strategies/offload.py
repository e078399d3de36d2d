"""Where the pipeline lives while it runs: all on the device, model CPU offload, sequential CPU offload.

Model offload (``enable_model_cpu_offload``) moves one whole component to the device when it runs,
in the order of the pipeline's ``model_cpu_offload_seq``; sequential offload streams every layer's
weights for every call. Both use accelerate hooks, need an accelerator, and exclude group
offloading (diffusers raises ValueError when both are enabled). Group offloading has its own module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Rule
from . import Code

if TYPE_CHECKING:
    from ..dryrun import Trace
    from ..plan import Plan
    from . import Rates, Site, Weights

RULES = (
    Rule(
        "offload.needs_accelerator",
        lambda plan, target: plan.offload
        if plan.offload in ("model", "sequential") and target.device_type == "cpu"
        else None,
        "offload '{0}' needs an accelerator (diffusers: '`enable_model_cpu_offload` requires accelerator, but not "
        "found'); the script runs on cpu.",
        "Use group offloading, or run on a GPU.",
    ),
    Rule(
        "offload.group_settings_need_group_offload",
        lambda plan, target: plan.offload if plan.group is not None and not plan.grouped else None,
        "'group' settings are given but offload is '{0}': group offloading cannot be combined with model or "
        "sequential offloading in one pipeline (diffusers raises ValueError).",
        "Set offload to group_block or group_leaf, or remove 'group'.",
    ),
)


def apply(plan: "Plan", site: "Site") -> Code:
    """Place the pipeline: ``pipe.to(device)`` or one of the accelerate offloading hooks."""
    if plan.offload == "none":
        return Code((f"{site.pipe}.to({site.device})",), (), f"the whole pipeline on `{site.device}`")
    method = {"model": "enable_model_cpu_offload", "sequential": "enable_sequential_cpu_offload"}[plan.offload]
    device = "" if site.device_is_default_cuda else f"device={site.device}"
    return Code((f"{site.pipe}.{method}({device})",), (), f"{plan.offload} CPU offload")


def resident(plan: "Plan", trace: "Trace", weights: "Weights") -> list[int]:
    """Weight bytes on the device during each call of ``trace`` (all on the device, model or sequential offload).

    Model offload follows accelerate's hook chain as diffusers builds it: components in
    ``model_cpu_offload_seq`` get a hook whose pre-forward offloads only the PREVIOUS component of the
    sequence, so an encoder called again (SD3 and SDXL encode the negative prompt after the prompt) comes
    back while its successor is still on the device. Components outside the sequence stay on the device
    from their first call to the end of the call; ``_exclude_from_cpu_offload`` ones stay there throughout.
    Sequential offload moves each layer's own weights in for its forward: about two layers at once.
    """
    if plan.offload == "none":
        return [weights.total] * len(trace.calls)
    if plan.offload == "sequential":
        return [weights.leaf_pair(call.component) for call in trace.calls]
    return [sum(weights.bytes.get(name, 0) for name in on) for on, _ in _model_offload_walk(trace, weights)]


def _model_offload_walk(trace: "Trace", weights: "Weights"):
    """Per call of ``trace`` under model offload: the components on the device during it (one set, updated
    call by call), and whether its hook moved the previous component of the sequence back first (then it
    also emptied the cache)."""
    chain = [name for name in trace.offload_sequence if name in weights.bytes]
    previous = {name: chain[i - 1] for i, name in enumerate(chain) if i}
    on = {name for name in trace.exclude_from_offload if name in weights.bytes}
    for call in trace.calls:
        moved = previous.get(call.component) in on
        on.discard(previous.get(call.component))
        on.add(call.component)
        yield on, moved


def cache_emptied(plan: "Plan", trace: "Trace", weights: "Weights") -> frozenset[int]:
    """The calls before which the allocator's cache is emptied: model offload's hook, moving the previous
    component of the sequence back to the CPU, then calls ``torch.cuda.empty_cache()`` (accelerate's
    ``CpuOffload.pre_forward``). Sequential offload and plain placement never empty it."""
    if plan.offload != "model":
        return frozenset()
    return frozenset(i for i, (_, moved) in enumerate(_model_offload_walk(trace, weights)) if moved)


def onloaded_tensors(plan: "Plan", trace: "Trace", weights: "Weights") -> dict[int, list[int]]:
    """None replayed: whole models are moved between empties of the cache (model offload), stay (none), or
    move a layer at a time (sequential); their bytes are the resident weights."""
    return {}


def transfer_seconds(plan: "Plan", trace: "Trace", weights: "Weights", rates: "Rates", steps: int, step_seconds: float) -> float:
    """Model offload moves each component on and off once per call; sequential offload streams every
    layer of the denoiser each step, waiting for each copy (from pageable memory)."""
    from . import moved_per_step

    if plan.offload == "none":
        return 0.0
    if plan.offload == "model":
        return 2 * weights.total / (rates.efficiency["model"] * rates.pageable_bytes_per_s)
    per_step, others = moved_per_step(trace, weights)
    return (steps * per_step + others) / (rates.efficiency["sequential"] * rates.pageable_bytes_per_s)


def host_bytes(plan: "Plan", weights: "Weights", copy_per_byte: dict[str, float]) -> float:
    """Host RAM above the process's own while the pipeline runs: nothing when it all lives on the device;
    every offloaded weight in anonymous memory once it has been to the GPU and back (model offload copies
    it back each time: the host's allocator keeps more than the bytes), or read from its mmap (sequential)."""
    if plan.offload == "none":
        return 0.0
    quantized = sum(b for n, b in weights.bytes.items() if plan.quantize and n in plan.quantize.components)
    # under model offload, quantized weights come back with new quantization-state tensors each time:
    # more churn per byte (measured apart)
    per_quantized_byte = copy_per_byte["model_quantized" if plan.offload == "model" else plan.offload]
    return copy_per_byte[plan.offload] * (weights.total - quantized) + per_quantized_byte * quantized


def mapped_setup_bytes(plan: "Plan", weights: "Weights", on_device: list[str]) -> float:
    """Nothing the setup maps only to read once: moving a model to the CPU copies its weights."""
    return 0.0


def setup_host_bytes(plan: "Plan", weights: "Weights", copy_per_byte: dict[str, float], on_device: list[str]) -> float:
    """Host RAM the placement takes when it is applied: components already on the GPU (quantized there
    while loading) are copied once into host memory (measured: Flux nf4, 10.3 GiB moved, RSS 11.4 GiB)."""
    if plan.offload == "none":
        return 0.0
    return float(sum(weights.bytes[n] for n in on_device))
