"""torch.compile of the denoiser: regional (each repeated block class compiled once) or whole.

Regional compilation (``compile_repeated_blocks``) compiles in seconds what whole-model compilation
takes minutes for, at nearly the same speed, but only models that list ``_repeated_blocks`` support
it (Flux, Wan, QwenImage, UNet2DConditionModel ...; not SD3, CogVideoX, Sana, PixArt). The applied
code checks that at run time and falls back to compiling the whole model. Offloading hooks cause
graph breaks, so ``fullgraph=True`` is asked for only when nothing is offloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Rule
from . import Code

if TYPE_CHECKING:
    from ..plan import Plan, Target
    from . import Site


def _lacks_repeated_blocks(plan: "Plan", target: "Target") -> str | None:
    if plan.compile != "regional":
        return None
    if target.repeated_blocks is not None:  # measured: no import needed
        return next((name for name in ("transformer", "unet") if target.repeated_blocks.get(name) == []), None)
    if not target.component_classes:
        return None
    import diffusers

    for name in ("transformer", "unet"):
        cls = getattr(diffusers, target.component_classes.get(name, ""), None)
        if cls is not None and not getattr(cls, "_repeated_blocks", None):
            return cls.__name__
    return None


RULES = (
    Rule(
        "compile.regional_needs_repeated_blocks",
        _lacks_repeated_blocks,
        "{0} declares no _repeated_blocks, so regional compilation cannot apply "
        "(diffusers: '`_repeated_blocks` attribute is empty').",
        "Use compile 'full'.",
    ),
)


def first_call_seconds(plan: "Plan", denoiser, per_block: float) -> float:
    """What compiling adds to the first call: ``per_block`` seconds for each block class regional compilation
    compiles once (Dynamo recompiles nothing for the other blocks of a class), or for each block of the
    model compiled whole. ``denoiser``: the denoiser's measurement."""
    if plan.compile == "none" or denoiser is None:
        return 0.0
    blocks = denoiser.repeated_blocks
    if plan.compile == "regional" and blocks:
        return per_block * len(blocks)
    return per_block * max(sum(b.count for b in blocks), 1)


def apply(plan: "Plan", site: "Site") -> Code:
    """Compile the denoiser after it is placed (compilation is lazy: it happens on the first call)."""
    if plan.compile == "none":
        return Code()
    model = f"{site.pipe}.{site.denoiser}"
    fullgraph = "fullgraph=True" if plan.offload == "none" else ""
    if plan.compile == "full":
        return Code((f"{model}.compile({fullgraph})",), (), f"torch.compile of {site.denoiser}")
    guarded = (
        f'if getattr({model}, "_repeated_blocks", None):\n'
        f"    {model}.compile_repeated_blocks({fullgraph})\n"
        f"else:  # this model declares no repeated blocks: compile it whole\n"
        f"    {model}.compile({fullgraph})"
    )
    return Code((guarded,), (), f"regional torch.compile of {site.denoiser}")
