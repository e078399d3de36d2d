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
from ..sizes import module_bytes
from . import Code

if TYPE_CHECKING:
    import torch

    from ..plan import Plan
    from . import Site

GROUP_KINDS = {"group_block": "block_level", "group_leaf": "leaf_level"}


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


def largest_leaf_bytes(module: "torch.nn.Module") -> int:
    """Largest single layer leaf-level offloading moves (Conv*/Linear/Embedding, own weights only)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    sizes = [module_bytes(m, recurse=False) for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)]
    return max(sizes, default=0)


def _grouped(plan: "Plan") -> bool:
    return plan.offload in GROUP_KINDS


RULES = (
    Rule(
        "group_offload.streams_need_cuda",
        lambda plan, target: target.device_type
        if _grouped(plan) and plan.group_settings.use_stream and target.device_type not in (None, "cuda", "xpu")
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
        if _grouped(plan)
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
        "group_offload.stream_options_need_stream",
        lambda plan, target: ", ".join(
            name for name in ("record_stream", "low_cpu_mem_usage") if getattr(plan.group_settings, name)
        )
        or None
        if _grouped(plan) and not plan.group_settings.use_stream
        else None,
        "{0} only matters with use_stream; without streams it changes nothing.",
        "Set use_stream to true or drop {0}.",
        severity="warning",
    ),
)


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
    resident = f", {', '.join(group.exclude)} resident" if group.exclude else ""
    streams = " with CUDA streams" if group.use_stream else ""
    return Code(
        (f"{site.pipe}.enable_group_offload({', '.join(kwargs)})",),
        ("import torch",),
        f"group offloading ({GROUP_KINDS[plan.offload]}{streams}{resident})",
    )
