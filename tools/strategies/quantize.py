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

from ..plan import Rule
from ..sizes import module_bytes, tensor_bytes
from . import Code

if TYPE_CHECKING:
    import torch

    from ..plan import QuantizeSpec, Target
    from . import Site

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


# Backends whose matmul reads a full-precision copy of the weight, made for the call and freed after it:
# bitsandbytes' 4-bit dequantizes the weight to the compute dtype; torchao's weight-only configs upcast it.
# LLM.int8 multiplies in int8 and torchao's fp8 dynamic activation in fp8 (their temporaries are the
# activation's, in the dry run's own allocations already).
_DEQUANTIZE_FOR_MATMUL = ("bnb_nf4", "torchao_int8wo", "torchao_fp8wo")


def dequantized_for_matmuls(plan: "Plan") -> frozenset[str]:
    """The components whose every matmul allocates a full-precision copy of its weight under the plan's
    quantization (strategies.allocator replays those copies)."""
    if plan.quantize is None or plan.quantize.backend not in _DEQUANTIZE_FOR_MATMUL:
        return frozenset()
    return frozenset(plan.quantize.components)


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


def largest_converted_bytes(model: "torch.nn.Module", library: Library, backend: str) -> int:
    """The largest weight ``backend`` converts, at the model's dtype: what one layer holds dequantized
    while it computes, or at full precision while it is quantized on load."""
    return max((tensor_bytes(linear.weight) for _, linear in converted_linears(model, library, backend)), default=0)


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


# ---- compatibility rules -------------------------------------------------------------------------


def _older_than(versions: dict[str, str | None] | None, package: str, minimum: str) -> bool:
    from packaging.version import Version

    found = (versions or {}).get(package)
    return found is not None and Version(found) < Version(minimum)


RULES = (
    Rule(
        "quantize.bnb_needs_gpu",
        lambda plan, target: plan.quantize.backend
        if plan.quantize and plan.quantize.backend.startswith("bnb") and target.device_type == "cpu"
        else None,
        "{0} quantizes on a GPU only (diffusers: 'No GPU found. A GPU is needed for quantization.').",
        "Use torchao_int8wo on a CPU, or run on a CUDA GPU.",
    ),
    Rule(
        "quantize.fp8_needs_sm89",
        lambda plan, target: f"{plan.quantize.backend} needs float8 compute (compute capability 8.9+: Ada, Hopper, "
        f"Blackwell); this GPU is sm {'.'.join(map(str, target.compute_capability))}"
        if plan.quantize
        and plan.quantize.backend in FP8_BACKENDS
        and target.compute_capability is not None
        and target.compute_capability < (8, 9)
        else None,
        "{0}.",
        "Use torchao_int8wo or bnb_int8.",
    ),
    Rule(
        "quantize.fp8_compute_needs_gpu",
        lambda plan, target: "torchao_fp8dq"
        if plan.quantize and plan.quantize.backend == "torchao_fp8dq" and target.device_type in ("cpu", "mps")
        else None,
        "{0} runs its matmuls in float8 with CUDA kernels (torch._scaled_mm); there are none on this device.",
        "Use torchao_int8wo here, or run on a CUDA GPU of compute capability 8.9+.",
    ),
    Rule(
        "quantize.not_with_layerwise_casting",
        lambda plan, target: ", ".join(sorted(set(plan.quantize.components) & set(plan.layerwise_casting.components)))
        or None
        if plan.quantize and plan.layerwise_casting
        else None,
        "{0} is both quantized and layerwise-cast: a component's weights are stored one way, not two.",
        "Choose one technique per component.",
    ),
    Rule(
        "quantize.bnb_int8_stays_resident",
        lambda plan, target: "bitsandbytes < 0.48 or transformers < 4.58"
        if plan.quantize
        and plan.quantize.backend == "bnb_int8"
        and plan.offload == "model"
        and (_older_than(target.versions, "bitsandbytes", "0.48") or _older_than(target.versions, "transformers", "4.58.1"))
        else None,
        "With {0}, model offload cannot move bnb int8 components: they stay on the GPU the whole time.",
        "Upgrade bitsandbytes and transformers, or budget the int8 components as resident.",
        severity="warning",
    ),
)


# ---- applying it ----------------------------------------------------------------------------------

# the keyword arguments of each bitsandbytes backend, as source; {dtype} is the script's compute dtype
_BNB_KWARGS = {
    "bnb_nf4": {"load_in_4bit": "True", "bnb_4bit_quant_type": '"nf4"', "bnb_4bit_compute_dtype": "{dtype}"},
    "bnb_int8": {"load_in_8bit": "True"},
}
_BNB_PIPELINE_BACKEND = {"bnb_nf4": "bitsandbytes_4bit", "bnb_int8": "bitsandbytes_8bit"}
_TORCHAO_CONFIG = {
    "torchao_int8wo": "Int8WeightOnlyConfig", "torchao_fp8wo": "Float8WeightOnlyConfig",
    # fp8 weights and activations: the matmuls themselves run in float8 (faster), not only the storage
    "torchao_fp8dq": "Float8DynamicActivationFloat8WeightConfig",
}  # fmt: skip
FP8_BACKENDS = ("torchao_fp8wo", "torchao_fp8dq")
_CONFIG_IMPORT = {
    "diffusers": ("from diffusers import {name}", "{name}"),
    # both libraries name their configs alike; the transformers one is imported under a distinct name
    "transformers": ("from transformers import {name} as Transformers{name}", "Transformers{name}"),
}


def _config_class(library: Library, name: str) -> tuple[str, str]:
    statement, local = _CONFIG_IMPORT[library]
    return statement.format(name=name), local.format(name=name)


def _bnb_kwargs(backend: str, site: "Site") -> dict[str, str]:
    return {key: value.format(dtype=site.dtype) for key, value in _BNB_KWARGS[backend].items()}


def _torch_import(source: str) -> tuple[str, ...]:
    return ("import torch",) if "torch." in source else ()


def pipeline_config(spec: "QuantizeSpec", components: list[str], site: "Site", target: "Target") -> Code:
    """A ``PipelineQuantizationConfig`` expression quantizing ``components`` while the pipeline loads.

    bitsandbytes goes through ``quant_backend``/``quant_kwargs``; torchao must use ``quant_mapping``
    with each library's own ``TorchAoConfig`` (diffusers 0.42 with transformers 5 refuses
    ``quant_backend="torchao"``).
    """
    imports = ["from diffusers import PipelineQuantizationConfig"]
    if spec.backend in _BNB_KWARGS:
        kwargs = ", ".join(f'"{key}": {value}' for key, value in _bnb_kwargs(spec.backend, site).items())
        names = ", ".join(f'"{c}"' for c in components)
        expr = (
            f'PipelineQuantizationConfig(quant_backend="{_BNB_PIPELINE_BACKEND[spec.backend]}", '
            f"quant_kwargs={{{kwargs}}}, components_to_quantize=[{names}])"
        )
        imports += _torch_import(kwargs)
    else:
        ao = _TORCHAO_CONFIG[spec.backend]
        imports.append(f"from torchao.quantization import {ao}")
        entries = []
        for component in components:
            statement, local = _config_class(target.library_of(component), "TorchAoConfig")
            imports.append(statement)
            entries.append(f'"{component}": {local}({ao}())')
        expr = "PipelineQuantizationConfig(quant_mapping={" + ", ".join(entries) + "})"
    return Code(statements=(expr,), imports=tuple(dict.fromkeys(imports)), edit=f"{spec.backend} on {', '.join(components)}")


def model_config(backend: str, library: Library, site: "Site") -> Code:
    """The ``quantization_config=`` expression for one model loaded on its own (``X.from_pretrained``)."""
    if backend in _BNB_KWARGS:
        statement, local = _config_class(library, "BitsAndBytesConfig")
        kwargs = ", ".join(f"{key}={value}" for key, value in _bnb_kwargs(backend, site).items())
        return Code(statements=(f"{local}({kwargs})",), imports=(statement, *_torch_import(kwargs)), edit=backend)
    ao = _TORCHAO_CONFIG[backend]
    statement, local = _config_class(library, "TorchAoConfig")
    return Code(
        statements=(f"{local}({ao}())",), imports=(statement, f"from torchao.quantization import {ao}"), edit=backend
    )
