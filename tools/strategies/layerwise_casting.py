"""Layerwise casting (``ModelMixin.enable_layerwise_casting``): weights stored in fp8, upcast per layer.

Only diffusers models: transformers' T5 casts activations to its own weights' dtype and fails on
fp8 weights at run time. The savings are less than half because diffusers skips, by ``re.search`` on
the module name, the patterns pos_embed, patch_embed, norm, ^proj_in$, ^proj_out$ and the class's
own ``_skip_layerwise_casting_patterns``: Flux's AdaLN linears (``norm1.linear``) stay bf16. The
size is taken by applying diffusers' own hook to a meta-device copy, so it follows the library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Rule
from ..sizes import module_bytes
from . import Code

if TYPE_CHECKING:
    import torch

    from ..measure import PipelineMeasurement
    from ..plan import LayerwiseCastingSpec, Plan
    from . import Site

SUPPORTED_LIBRARIES = frozenset({"diffusers"})


def layerwise_cast_bytes(model: "torch.nn.Module", compute_dtype: "torch.dtype", storage: str = "float8_e4m3fn") -> int:
    """Bytes of ``model`` after layerwise casting to ``storage``. Modifies ``model``: pass a meta copy."""
    import torch

    model.enable_layerwise_casting(storage_dtype=getattr(torch, storage), compute_dtype=compute_dtype)
    return module_bytes(model)


def kept_bytes(plan: "Plan", m: "PipelineMeasurement", per_byte: float) -> float:
    """Reserved above allocated that casting adds at the peak: each layer's upcast copy is freed after its
    forward, and the allocator keeps those blocks mapped, in proportion to the weights cast (``per_byte`` of
    the cast components at full precision, the GPU profile's ``cast_kept_per_byte``)."""
    if not plan.layerwise_casting:
        return 0.0
    return per_byte * sum(m.components[c].bytes or 0 for c in plan.layerwise_casting.components if c in m.components)


RULES = (
    Rule(
        "layerwise_casting.diffusers_models_only",
        lambda plan, target: ", ".join(
            c for c in plan.layerwise_casting.components if target.library_of(c) not in SUPPORTED_LIBRARIES
        )
        or None
        if plan.layerwise_casting
        else None,
        "Layerwise casting of {0} fails at run time: transformers' text encoders cast activations to their "
        "weights' dtype ('Promotion for Float8 Types is not supported').",
        "Cast only diffusers models (transformer, unet, vae); quantize text encoders instead.",
    ),
)


def apply(spec: "LayerwiseCastingSpec", components: list[str], site: "Site") -> Code:
    """Cast each component's weights to fp8 storage; must run before offloading is enabled."""
    statements = tuple(
        f"{site.pipe}.{c}.enable_layerwise_casting(storage_dtype=torch.{spec.storage_dtype}, compute_dtype={site.dtype})"
        for c in components
    )
    return Code(statements, ("import torch",), f"layerwise {spec.storage_dtype} casting of {', '.join(components)}")
