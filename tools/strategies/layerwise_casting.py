"""Layerwise casting (``ModelMixin.enable_layerwise_casting``): weights stored in fp8, upcast per layer.

Only diffusers models: transformers' T5 casts activations to its own weights' dtype and fails on
fp8 weights at run time. The savings are less than half because diffusers skips, by ``re.search`` on
the module name, the patterns pos_embed, patch_embed, norm, ^proj_in$, ^proj_out$ and the class's
own ``_skip_layerwise_casting_patterns``: Flux's AdaLN linears (``norm1.linear``) stay bf16. The
size is taken by applying diffusers' own hook to a meta-device copy, so it follows the library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..sizes import module_bytes

if TYPE_CHECKING:
    import torch

SUPPORTED_LIBRARIES = frozenset({"diffusers"})


def layerwise_cast_bytes(model: "torch.nn.Module", compute_dtype: "torch.dtype", storage: str = "float8_e4m3fn") -> int:
    """Bytes of ``model`` after layerwise casting to ``storage``. Modifies ``model``: pass a meta copy."""
    import torch

    model.enable_layerwise_casting(storage_dtype=getattr(torch, storage), compute_dtype=compute_dtype)
    return module_bytes(model)
