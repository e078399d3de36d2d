"""VAE tiling and slicing: decode (and encode) in spatial tiles or one image at a time.

Tiling bounds the decode's working memory by the tile size, so it changes nothing for images at or
below the VAE's own tile size (1024 px for SDXL's). Slicing only helps with batches. Since diffusers
0.40 only the VAE's own methods exist (``pipe.vae.enable_tiling()``); the pipeline-level
``enable_vae_tiling`` is gone. Some VAEs support neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Rule
from . import Code

if TYPE_CHECKING:
    from ..plan import Plan
    from . import Site

# diffusers 0.42 VAE classes without enable_tiling / enable_slicing (tests check the list)
NO_TILING = frozenset({"AsymmetricAutoencoderKL", "AutoencoderKLTemporalDecoder", "VQModel"})
# Tile edge in pixels where the class fixes it rather than its config (diffusers 0.42 defaults)
_FIXED_TILE = {"AutoencoderKLWan": 256, "AutoencoderKLHunyuanVideo": 256, "AutoencoderKLLTXVideo": 512}


def tile_size(class_name: str, config: dict) -> int | None:
    """Edge of the tiles a VAE decodes in once tiling is on (its ``sample_size`` for image VAEs)."""
    if class_name in NO_TILING:
        return None
    if class_name in _FIXED_TILE:
        return _FIXED_TILE[class_name]
    size = config.get("sample_size") or 512
    return size[0] if isinstance(size, (list, tuple)) else int(size)

RULES = (
    Rule(
        "vae.no_tiling",
        lambda plan, target: (target.component_classes or {}).get("vae")
        if (plan.vae.tiling or plan.vae.slicing) and (target.component_classes or {}).get("vae") in NO_TILING
        else None,
        "{0} supports neither tiling nor slicing.",
        "Set vae.tiling and vae.slicing to false; lower the resolution or offload instead.",
    ),
)


def apply(plan: "Plan", site: "Site") -> Code:
    """``pipe.vae.enable_tiling()`` / ``enable_slicing()`` as the plan says."""
    chosen = [name for name, on in (("tiling", plan.vae.tiling), ("slicing", plan.vae.slicing)) if on]
    statements = tuple(f"{site.pipe}.vae.enable_{name}()" for name in chosen)
    return Code(statements, (), f"VAE {' and '.join(chosen)}" if chosen else "")
