"""Weight quantization backends: which layers each converts and what a converted layer occupies.

Sizes are computed, not assumed: a backend converts only some layers (``nn.Linear`` weights outside
the model's skip lists); everything else keeps its dtype, and the quantization state stays on the
device with the weights. diffusers models and transformers models follow different skip rules, both
written out below from the code of diffusers 0.42 / transformers 5.x:

- diffusers: skips ``_keep_in_fp32_modules`` (kept in float32 even when loading bf16);
- transformers: skips ``_keep_in_fp32_modules`` (T5's ``wo``), tied weights, the output embedding
  and the module holding the last parameter; bitsandbytes converts exactly ``nn.Linear`` (and
  ``Conv1D``), torchao any ``nn.Linear``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..sizes import module_bytes, tensor_bytes

if TYPE_CHECKING:
    import torch

Library = Literal["diffusers", "transformers"]

NF4_BLOCKSIZE = 64  # bitsandbytes keeps one float32 absmax per 64 weights (no double quantization)


@dataclass(frozen=True)
class QuantBackend:
    """One weight-quantization method as pipefit plans it."""

    name: str
    package: str  # the pip distribution that must be installed
    needs_cuda: bool
    # bytes on the device of one converted Linear weight of shape (out, in), quantization state included;
    # the bias keeps its dtype
    weight_bytes: Callable[[int, int], int]


def _nf4(out_features: int, in_features: int) -> int:
    numel = out_features * in_features
    return math.ceil(numel / 2) + math.ceil(numel / NF4_BLOCKSIZE) * 4


def _llm_int8(out_features: int, in_features: int) -> int:
    return out_features * in_features + out_features * 4  # int8 weight + float32 row scales (SCB)


def _torchao_int8_weight_only(out_features: int, in_features: int) -> int:
    # torchao 0.18 Int8Tensor: int8 data, float32 per-row scale, int8 per-row zero point
    return out_features * in_features + out_features * 4 + out_features


BACKENDS: dict[str, QuantBackend] = {
    b.name: b
    for b in (
        QuantBackend("bnb_nf4", "bitsandbytes", needs_cuda=True, weight_bytes=_nf4),
        QuantBackend("bnb_int8", "bitsandbytes", needs_cuda=True, weight_bytes=_llm_int8),
        QuantBackend("torchao_int8wo", "torchao", needs_cuda=False, weight_bytes=_torchao_int8_weight_only),
    )
}


def converted_linears(model: "torch.nn.Module", library: Library, backend: str) -> list[tuple[str, "torch.nn.Linear"]]:
    """The (name, module) pairs of the layers ``backend`` replaces when loading ``model``."""
    import torch

    if library == "transformers":
        skip = transformers_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
        exact_linear = backend.startswith("bnb_")  # transformers' bnb checks `type(m) is nn.Linear`
        return [
            (name, m)
            for name, m in model.named_modules()
            if (type(m) is torch.nn.Linear if exact_linear else isinstance(m, torch.nn.Linear))
            and _transformers_should_convert(name, skip)
        ]

    skip = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and name.rsplit(".", 1)[-1] not in skip
        and not any(key + "." in name or key == name for key in skip)
    ]


def quantized_bytes(model: "torch.nn.Module", library: Library, backend: str) -> int:
    """Device bytes of ``model`` (already at its load dtypes) after ``backend`` converts its layers."""
    spec = BACKENDS[backend]
    total = module_bytes(model)
    for _, linear in converted_linears(model, library, backend):
        total += spec.weight_bytes(linear.out_features, linear.in_features) - tensor_bytes(linear.weight)
    return total


# The two functions below restate transformers 5.x's `quantizers.base.get_keys_to_not_convert` and
# `quantizers.quantizers_utils.should_convert_module`: importing `transformers.quantizers` imports every
# quantization backend (5 s here). tests/test_strategies.py compares them with the originals.


def transformers_keys_to_not_convert(model: "torch.nn.Module") -> list[str]:
    """Tied weights, the output embedding and the module holding the last parameter stay unconverted."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied.values()) | set(tied.keys())
    named = list(model.named_parameters())
    if named:
        keys.add(named[-1][0])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        keys |= {name for name, m in model.named_modules() if m is output}
    return sorted({k.removesuffix(".weight") for k in keys})


def _transformers_should_convert(full_name: str, patterns: list[str]) -> bool:
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", full_name) or full_name.endswith(key) for key in patterns)
