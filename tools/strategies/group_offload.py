"""Group offloading (``diffusers.hooks.apply_group_offloading``): what moves to the GPU at once.

The grouping mirrors diffusers 0.42's ``_apply_group_offloading_block_level``: only the DIRECT
children of a model that are ``ModuleList``/``Sequential`` (or named in ``_group_offload_block_modules``)
become block groups; every other parameter of the model forms one root group. A CLIP or T5 text
encoder has no top-level ModuleList, so block-level offloading moves it whole. Leaf level hooks each
Conv/Linear/Embedding. tests/test_strategies.py checks this against the hooks diffusers installs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Rule
from ..sizes import module_bytes, tensor_bytes
from . import Code

if TYPE_CHECKING:
    import torch

    from ..dryrun import Trace
    from ..plan import Plan
    from . import Rates, Site, Weights

GROUP_KINDS = {"group_block": "block_level", "group_leaf": "leaf_level"}
DISK_FOLDER = "pipefit-offload"  # offload_to_disk_path, beside where the script runs
# Reading the group files back, when the host's rate is unknown: a fast NVMe drive's sequential reads
# (an assumption, said in the answer; nothing here measured it)
ASSUMED_DISK_BYTES_PER_S = 2e9


def block_level_groups(module: "torch.nn.Module", num_blocks_per_group: int = 1) -> list[int]:
    """Bytes of each group block-level offloading makes, in execution order, the root group last."""
    import torch

    block_modules = set(getattr(module, "_group_offload_block_modules", None) or [])

    def groups_of(mod: "torch.nn.Module") -> list[int]:
        groups: list[int] = []
        grouped = 0
        for name, child in mod.named_children():
            if name in block_modules:
                nested = groups_of(child)
                groups += nested
                grouped += module_bytes(child)
            elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
                blocks = list(child)
                for start in range(0, len(blocks), num_blocks_per_group):
                    chunk = blocks[start : start + num_blocks_per_group]
                    size = sum(module_bytes(b) for b in chunk)
                    groups.append(size)
                    grouped += size
        root = module_bytes(mod) - grouped
        if root > 0:
            groups.append(root)
        return groups

    return groups_of(module)


BLOCKS_PER_GROUP = (1, 2, 4, 8, 16)  # the group sizes recommend tries
# What the residency model leaves out, said with every prediction it affects.
STREAM_CAVEAT = (
    "Group offloading with CUDA streams: the side stream's own cached blocks are counted as its largest "
    "moment, kept for the rest of the call (checked on Wan 2.1, SDXL and Flux on an H200; before that model, "
    "SD3.5-medium peaked 20% above the prediction). Prove it with run_trial before relying on it."
)


def block_level_peaks(module: "torch.nn.Module") -> dict[str, int]:
    """The most bytes block-level offloading keeps on the device at once while ``module`` runs, for
    each ``num_blocks_per_group`` in BLOCKS_PER_GROUP and for streams (key "stream": one block per
    group and the next one prefetched).

    diffusers 0.42 nests: a child named in ``_group_offload_block_modules`` (a VAE's encoder and
    decoder) is grouped the same way inside, and every level's leftover parameters form a root group
    that stays on the device for that level's whole forward. So the peak is, down the nesting, the
    sum of the roots plus the largest window of groups at the innermost level that runs.
    """
    import torch

    def peak(mod: "torch.nn.Module", per: int, stream: bool) -> int:
        block_modules = set(getattr(mod, "_group_offload_block_modules", None) or [])
        grouped, inner = 0, 0
        for name, child in mod.named_children():
            if name in block_modules:
                grouped += module_bytes(child)
                inner = max(inner, peak(child, per, stream))
            elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and len(child):
                blocks = [module_bytes(b) for b in child]
                grouped += sum(blocks)
                chunks = [sum(blocks[i : i + per]) for i in range(0, len(blocks), per)]
                window = max(sum(chunks[i : i + 2]) for i in range(len(chunks))) if stream else max(chunks)
                inner = max(inner, window)
        return module_bytes(mod) - grouped + inner

    peaks = {str(n): peak(module, n, False) for n in BLOCKS_PER_GROUP}
    peaks["stream"] = peak(module, 1, True)
    return peaks


def leaf_level_root_bytes(module: "torch.nn.Module") -> int:
    """What leaf-level offloading keeps on the device for the module's whole forward: the parameters and
    buffers outside its Conv/Linear/Embedding layers (norms, position tables)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    leaves = sum(module_bytes(m) for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS))
    return max(module_bytes(module) - leaves, 0)


def _leaf_sizes(module: "torch.nn.Module") -> list[int]:
    """The own weights of each layer leaf-level offloading moves (Conv*/Linear/Embedding), largest first;
    a tensor two layers share (a T5's ``shared`` and ``encoder.embed_tokens``) counted once."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    seen: set[int] = set()
    sizes = []
    for leaf in (m for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)):
        tensors = [t for t in (*leaf.parameters(recurse=False), *leaf.buffers(recurse=False)) if id(t) not in seen]
        seen.update(map(id, tensors))
        sizes.append(sum(map(tensor_bytes, tensors)))
    return sorted(sizes, reverse=True)


def leaf_count(module: "torch.nn.Module") -> int:
    """How many layers leaf-level offloading copies in, one by one, per forward."""
    return sum(1 for size in _leaf_sizes(module) if size)


def largest_leaf_bytes(module: "torch.nn.Module") -> int:
    """Largest single layer leaf-level offloading moves."""
    return next(iter(_leaf_sizes(module)), 0)


def leaf_pair_bytes(module: "torch.nn.Module") -> int:
    """The most two layers can hold at once: the one running and the next one copied in (leaf level with
    streams, sequential offload). The two largest bound it; twice the largest would count a text encoder's
    vocabulary embedding (2.1 GB in UMT5-XXL, which runs once, first) twice."""
    return sum(_leaf_sizes(module)[:2])


RULES = (
    Rule(
        "group_offload.streams_need_cuda",
        lambda plan, target: target.device_type
        if plan.grouped and plan.group_settings.use_stream and target.device_type not in (None, "cuda", "xpu")
        else None,
        "Group offloading with use_stream needs CUDA streams; the script runs on {0}.",
        "Set use_stream to false.",
    ),
    Rule(
        "group_offload.streams_force_one_block",
        lambda plan, target: str(plan.group_settings.num_blocks_per_group)
        if plan.offload == "group_block" and plan.group_settings.use_stream and plan.group_settings.num_blocks_per_group > 1
        else None,
        "With use_stream, diffusers moves one block per group: num_blocks_per_group={0} is ignored.",
        "Set num_blocks_per_group to 1, or drop use_stream to move several blocks at once.",
        severity="warning",
    ),
    Rule(
        "group_offload.streams_keep_vae_dtype",
        lambda plan, target: "vae"
        if plan.grouped
        and plan.group_settings.use_stream
        and "vae" not in plan.group_settings.exclude
        and target.denoiser == "unet"
        else None,
        "With use_stream, group offloading onloads the {0}'s weights from copies pinned at setup, so a UNet "
        "pipeline's fp16 VAE that upcasts to float32 to decode fails ('Input type (float) and bias type "
        "(c10::Half) should be the same', measured with SDXL on the H100).",
        "Add \"{0}\" to group.exclude to keep it resident.",
        severity="warning",
    ),
    Rule(
        "group_offload.record_stream_needs_stream",
        lambda plan, target: "record_stream"
        if plan.grouped and plan.group_settings.record_stream and not plan.group_settings.use_stream
        else None,
        "record_stream without use_stream: diffusers' apply_group_offloading raises ValueError for it.",
        "Set use_stream to true, or drop record_stream.",
    ),
    Rule(
        "group_offload.low_cpu_mem_usage_needs_stream",
        lambda plan, target: "low_cpu_mem_usage"
        if plan.grouped and plan.group_settings.low_cpu_mem_usage and not plan.group_settings.use_stream
        else None,
        "low_cpu_mem_usage only matters with use_stream; without streams it changes nothing.",
        "Set use_stream to true or drop low_cpu_mem_usage.",
        severity="warning",
    ),
    Rule(
        "group_offload.torchao_low_cpu_mem_grows",
        lambda plan, target: plan.quantize.backend
        if torchao_pinned_on_the_fly(plan)
        else None,
        "{0} weights under group offloading with low_cpu_mem_usage piled up on the GPU (measured on the H200: "
        "Flux.1-dev at leaf level ran out of memory at 7.4 GiB allocated, 4.2 GiB predicted): the prediction "
        "does not hold for this combination.",
        "Drop low_cpu_mem_usage (copies pinned at setup), or keep the quantized components resident.",
        severity="warning",
    ),
)


def torchao_pinned_on_the_fly(plan: "Plan") -> bool:
    """torchao-quantized components group-offloaded with streams pinned on the fly (low_cpu_mem_usage)."""
    if not (plan.grouped and plan.quantize and plan.quantize.backend.startswith("torchao")):
        return False
    group = plan.group_settings
    moved = set(plan.quantize.components) - set(group.exclude)
    return group.use_stream and group.low_cpu_mem_usage and bool(moved)


def apply(plan: "Plan", site: "Site") -> Code:
    """``pipe.enable_group_offload``: every nn.Module component (transformers' ones too) except the
    excluded, which diffusers places on the device and keeps there."""
    group = plan.group_settings
    kwargs = [f"onload_device=torch.device({site.device})", f'offload_type="{GROUP_KINDS[plan.offload]}"']
    if plan.offload == "group_block":
        kwargs.append(f"num_blocks_per_group={1 if group.use_stream else group.num_blocks_per_group}")
    for name in ("use_stream", "record_stream", "low_cpu_mem_usage"):
        if getattr(group, name):
            kwargs.append(f"{name}=True")
    if group.exclude:
        kwargs.append("exclude_modules=[" + ", ".join(f'"{c}"' for c in group.exclude) + "]")
    if group.offload_to_disk:
        kwargs.append(f'offload_to_disk_path="{DISK_FOLDER}"')
    resident = f", {', '.join(group.exclude)} resident" if group.exclude else ""
    streams = " with CUDA streams" if group.use_stream else ""
    streams += f", weights in ./{DISK_FOLDER}" if group.offload_to_disk else ""
    return Code(
        (f"{site.pipe}.enable_group_offload({', '.join(kwargs)})",),
        ("import torch",),
        f"group offloading ({GROUP_KINDS[plan.offload]}{streams}{resident})",
    )


def resident(plan: "Plan", trace: "Trace", weights: "Weights") -> list[int]:
    """Weight bytes on the device during each call: the excluded components always, and the groups
    of the running component that are on the device at once.

    Block level moves ``num_blocks_per_group`` blocks (one with streams) plus the component's root
    group; with streams the next group is copied in while one runs, so two neighbouring groups are
    there; nested block modules keep their levels' roots (see :func:`block_level_peaks`). Leaf level
    moves one layer (two with streams). A CLIP or T5 encoder has no top-level block list, so block
    level moves it whole.

    With streams the copies are made on a side stream, from the caching allocator's pool for that stream,
    which the main stream's allocations cannot reuse: the side stream's largest moment so far stays
    reserved for the rest of the call (measured on the H200: Wan 2.1's UMT5 leaf-streamed left 2.0 GiB
    reserved above allocated through the VAE decode, against 0.9 without streams).
    """
    group = plan.group_settings
    kept = sum(weights.bytes.get(name, 0) for name in group.exclude)
    out, side_pool = [], 0
    for call in trace.calls:
        name = call.component
        own = moved = 0
        if name in group.exclude or name not in weights.bytes:
            pass
        elif plan.offload == "group_leaf":
            own = weights.measured.components[name].leaf_offload_root_bytes or 0
            moved = weights.leaf_pair(name) if group.use_stream else weights.largest_leaf(name)
        else:
            moved = weights.block_peak(name, _block_key(group))
        if group.use_stream:
            side_pool = moved = max(side_pool, moved)
        out.append(kept + own + moved)
    return out


def cache_emptied(plan: "Plan", trace: "Trace", weights: "Weights") -> frozenset[int]:
    """None: group offloading's hooks never empty the allocator's cache."""
    return frozenset()


def onloaded_tensors(plan: "Plan", trace: "Trace", weights: "Weights") -> dict[int, list[int]]:
    """The weight tensors each call brings into the main stream's allocator pool and frees when it is done
    (for strategies.allocator): block level without streams moves a component with no block list (a T5 or
    CLIP encoder) as one group, all its tensors at once, which stay cached once freed; a block list's group,
    its largest tensors up to one group's bytes. Leaf level moves one layer at a time (a few small blocks),
    and streams copy on a side stream whose pool the main stream does not use: neither is replayed."""
    group = plan.group_settings
    if plan.offload != "group_block" or group.use_stream:
        return {}
    moved: dict[str, list[int]] = {}
    for name in {call.component for call in trace.calls}:
        sizes = trace.weight_tensors.get(name)
        if name in group.exclude or name not in weights.bytes or not sizes:
            continue
        scale = weights.bytes[name] / max(sum(sizes), 1)  # quantized or cast: the same tensors, smaller
        budget, chosen = weights.block_peak(name, _block_key(group)), []
        for size in sorted(sizes, reverse=True):
            if budget <= 0:
                break
            chosen.append(int(size * scale))
            budget -= chosen[-1]
        moved[name] = chosen
    return {i: moved[call.component] for i, call in enumerate(trace.calls) if call.component in moved}


def _block_key(group) -> str:
    """Which measured block-level peak a group setting reads: one block per group plus the prefetched
    one with streams, else the blocks per group."""
    return "stream" if group.use_stream else str(group.num_blocks_per_group)


def transfer_seconds(plan: "Plan", trace: "Trace", weights: "Weights", rates: "Rates", steps: int, step_seconds: float) -> float:
    """Every forward moves the offloaded groups through the GPU, at the share of the host's copy rate each
    mechanism reaches: with streams from pinned copies, of the pinned rate, by level; pinned on the fly
    (low_cpu_mem_usage) or without streams, of the pageable rate. Each group copied also costs a fixed
    time (its copies launched, the streams synchronised): leaf level copies every layer on its own, so
    Wan's and SDXL's many small layers move slower than Flux's large ones. Both terms are fitted per
    mechanism (calibration.json ``transfer_efficiency``, ``copy_seconds``; bench/fit_gpu.py): on the H200's
    leaf streams of Flux, SDXL and Wan, about 0.27 ms per layer and a share of the pinned rate above 1,
    i.e. the side stream hides part of the bytes behind the compute."""
    from . import moved_per_step, per_step

    group = plan.group_settings
    kept = set(group.exclude)
    bytes_per_step, bytes_once = moved_per_step(trace, weights, kept)
    moved = steps * bytes_per_step + bytes_once
    eff, pageable, pinned = rates.efficiency, rates.pageable_bytes_per_s, rates.pinned_bytes_per_s
    if group.offload_to_disk:  # every group read back from its file each time it runs
        return moved / ASSUMED_DISK_BYTES_PER_S
    key = copy_mechanism(plan)
    copies_per_step, copies_once = per_step(trace, {n: _groups(plan, weights, n) for n in weights.bytes}, kept)
    fixed = (steps * copies_per_step + copies_once) * rates.copy_seconds.get(key, 0.0)
    pinned_at_setup = group.use_stream and not group.low_cpu_mem_usage
    return moved / (eff.get(key, 1.0) * (pinned if pinned_at_setup else pageable)) + fixed


def _groups(plan: "Plan", weights: "Weights", name: str) -> int:
    """How many groups of ``name`` are copied in per forward."""
    comp = weights.measured.components[name]
    if plan.offload == "group_leaf":
        return comp.leaf_count or 0
    return len(comp.block_offload_groups_bytes) or 1


def copy_mechanism(plan: "Plan") -> str:
    """The transfer-efficiency key of a group-offloading plan: how its copies are made (without streams;
    pinned on the fly; from copies pinned at setup, by level)."""
    group = plan.group_settings
    if not group.use_stream:
        return "group"
    if group.low_cpu_mem_usage:
        return "stream_low_cpu_mem"
    return "stream_leaf" if plan.offload == "group_leaf" else "stream_block"


def disk_note(plan: "Plan", weights: "Weights") -> str:
    """What a plan offloading to disk asks of the disk, said with its prediction."""
    from ..units import format_bytes

    offloaded = sum(weights.bytes[n] for n in _offloaded(plan, weights))
    return (f"Writes the offloaded weights to ./{DISK_FOLDER} ({format_bytes(offloaded)} of disk) and reads them back "
            f"every step; the time assumes {ASSUMED_DISK_BYTES_PER_S / 1e9:g} GB/s reads (not measured here).")  # fmt: skip


def mapped_setup_bytes(plan: "Plan", weights: "Weights", on_device: list[str]) -> float:
    """Of the setup's host RAM, the weight files' pages mapped while they are read once: a component's
    loaded weights stay mapped until its groups are all pinned or all written to disk, so the largest
    whole component counts, not its largest file. These are file pages, which the kernel drops under
    pressure (measured on the H200: Flux.1-dev leaf streams peaked at 70.1 GiB, the 46.9 GiB of pinned
    copies plus the 22.2 GiB transformer, whose weights span three files; writing its group files, RSS
    23.2 GiB with the transformer mapped, 0.6 GiB of it anonymous or shared). A component quantized or
    cast while loading is converted memory, not its files: then nothing counts as mapped."""
    from .loading import quantized_at_load

    largest = _mapped_whole(plan, weights, on_device)
    cast = plan.layerwise_casting.components if plan.layerwise_casting else []
    converted = {*quantized_at_load(plan, weights), *cast}
    return float(weights.bytes[largest]) if largest is not None and largest not in converted else 0.0


def _mapped_whole(plan: "Plan", weights: "Weights", on_device: list[str]) -> str | None:
    """The component whose weights the setup holds mapped at its peak: the largest it pins or writes."""
    from .loading import quantized_at_load

    group = plan.group_settings
    if not (group.offload_to_disk or (group.use_stream and not group.low_cpu_mem_usage)):
        return None
    # staged loading parked its quantized components in host RAM already (strategies.loading counts them)
    parked = set(quantized_at_load(plan, weights)) if plan.loading == "staged" and not group.offload_to_disk else set()
    candidates = [n for n in _offloaded(plan, weights) if n not in on_device and n not in parked]
    return max(candidates, key=lambda n: weights.bytes[n], default=None)


def _offloaded(plan: "Plan", weights: "Weights") -> list[str]:
    return [n for n in weights.bytes if n not in plan.group_settings.exclude]


def _pinned(plan: "Plan", weights: "Weights") -> float:
    """Pinned copies of the offloaded weights, each tensor's block a power of two (at the plan's sizes)."""
    comps = weights.measured.components
    return sum((comps[n].pinned_bytes or weights.bytes[n]) * weights.bytes[n] / max(comps[n].bytes or 1, 1)
               for n in _offloaded(plan, weights))  # fmt: skip


def host_bytes(plan: "Plan", weights: "Weights", copy_per_byte: dict[str, float]) -> float:
    """Host RAM above the process's own while the pipeline runs. With streams (and not low_cpu_mem_usage)
    every offloaded tensor has a pinned copy, rounded up to a power of two by the caching host allocator;
    otherwise the offloaded weights live in ordinary host memory, which each offload copies back into
    (without streams) or which is pinned group by group on the fly (low_cpu_mem_usage)."""
    group = plan.group_settings
    if group.offload_to_disk:  # a few groups in flight, read from their files and pinned
        return copy_per_byte["pinned"] * 3 * max((_largest_group(plan, weights, n) for n in _offloaded(plan, weights)), default=0)
    if group.use_stream and not group.low_cpu_mem_usage:
        return copy_per_byte["pinned"] * _pinned(plan, weights)
    return copy_per_byte[_host_term(group)] * sum(weights.bytes[n] for n in _offloaded(plan, weights))


def _host_term(group) -> str:
    """The host's per-byte term for offloaded weights held in ordinary memory."""
    return "group_low_cpu_mem" if group.use_stream else "group"


def _largest_group(plan: "Plan", weights: "Weights", name: str) -> int:
    if plan.offload == "group_leaf":
        return weights.largest_leaf(name)
    return weights.block_peak(name, _block_key(plan.group_settings))


def setup_host_bytes(plan: "Plan", weights: "Weights", copy_per_byte: dict[str, float], on_device: list[str]) -> float:
    """Host RAM when group offloading is applied: the pinned copies, made at once beside the weights they
    copy, read from their files, plus ``mapped_setup_bytes``. Without streams, components already on the
    GPU moved to host memory."""
    group = plan.group_settings
    whole = _mapped_whole(plan, weights, on_device)
    mapped = float(weights.bytes[whole]) if whole is not None else 0.0
    if group.offload_to_disk:
        return mapped
    if group.use_stream and not group.low_cpu_mem_usage:
        return copy_per_byte["pinned"] * _pinned(plan, weights) + mapped
    offloaded = _offloaded(plan, weights)
    return copy_per_byte[_host_term(group)] * sum(weights.bytes[n] for n in on_device if n in offloaded)
