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
    from ..plan import Plan
    from . import Site

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
        lambda plan, target: plan.offload if plan.group is not None and not plan.offload.startswith("group") else None,
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
