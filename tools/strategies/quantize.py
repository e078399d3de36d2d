"""Weight quantization backends: which layers each converts and what a converted layer occupies.

Sizes are computed, not assumed: a backend converts only some layers (``nn.Linear`` weights outside
the model's skip lists); everything else keeps its dtype, and the quantization state stays on the
device with the weights. The skip rules differ by library and backend; they are restated below from
diffusers 0.42 and transformers 5.x (tests/test_strategies.py checks them against the originals):

- diffusers skips ``_keep_in_fp32_modules``; bitsandbytes matches module names, torchao parameter
  names, both as substrings (``key + "."``).
- transformers skips ``_keep_in_fp32_modules``, tied weights, the output embedding and the module
  holding the last parameter. bitsandbytes converts exactly ``nn.Linear`` and matches module names;
  torchao converts any ``nn.Linear`` and matches *parameter* names, so a suffix pattern such as T5's
  ``wo`` never matches ``...wo.weight``: under torchao a T5 ``wo`` is quantized, under bnb it is not.
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
NF4_CODE_BYTES = 16 * 4  # and, per weight, its own float32 table of the 16 nf4 levels


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
    return math.ceil(numel / 2) + math.ceil(numel / NF4_BLOCKSIZE) * 4 + NF4_CODE_BYTES


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

    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    torchao = backend.startswith("torchao")
    if library == "transformers":
        skip = transformers_keys_to_not_convert(model) + keep_fp32
        exact_linear = not torchao  # transformers' bnb checks `type(m) is nn.Linear`

        def converts(name: str, module: torch.nn.Module) -> bool:
            is_linear = type(module) is torch.nn.Linear if exact_linear else isinstance(module, torch.nn.Linear)
            return is_linear and _transformers_should_convert(f"{name}.weight" if torchao else name, skip)

    else:

        def converts(name: str, module: torch.nn.Module) -> bool:
            if not isinstance(module, torch.nn.Linear):
                return False
            key_name = f"{name}.weight" if torchao else name
            if not torchao and name.rsplit(".", 1)[-1] in keep_fp32:
                return False
            return not any(key + "." in key_name or key == key_name for key in keep_fp32)

    return [(name, m) for name, m in model.named_modules() if converts(name, m)]


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
