"""Loading: how the quantized components get from their files to the GPU, and the memory each way takes.

``Plan.load`` (shared/design.md) chooses one of three paths for the components the plan quantizes:

- ``device``: the pipeline loads as the script wrote it and bitsandbytes quantizes each weight on the
  GPU as it streams in (with no ``device_map`` its quantizer maps the model to the current GPU).
  Little host RAM; the GPU holds every quantized component at once until the placement moves them.
  torchao has no such path (diffusers' torchao quantizer quantizes where the weights load: the CPU).
- ``host``: ``device_map="cpu"``: quantized in host RAM, nothing on the GPU until the placement runs.
  bitsandbytes int8 cannot: its CPU-loaded weights later fail on the GPU.
- ``staged``: each quantized component loaded on its own onto the GPU (``AutoModel.from_pretrained``
  with its subfolder), then parked in host RAM (``.to("cpu")``) before the next, and the pipeline
  assembled from them. The GPU holds one quantized component at a time.

Host RAM follows the files: safetensors are memory-mapped, so a weight counts in RSS once its pages
are read and stops counting when the last tensor of its file is gone; a component moved to the GPU
and back lives in anonymous memory from then on (the offloading modules say how much). The host's
own terms (the process before any weight, what its allocator keeps per byte copied) are measured
per host, like the GPU's (tools/calibration.json).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from ..plan import Rule
from . import Code

if TYPE_CHECKING:
    from ..measure import ComponentMeasurement
    from ..plan import Plan, QuantizeSpec, Target
    from . import Site, Weights

# The files each library writes when no size is given (save_pretrained's max_shard_size): without the
# real files, one component's largest file is at most this big.
DEFAULT_SHARD_BYTES = {"diffusers": 10 * 10**9, "transformers": 50 * 10**9}
# bitsandbytes quantizes on the GPU while loading; torchao where the weights are
QUANTIZES_ON_DEVICE = frozenset({"bnb_nf4", "bnb_int8"})
LOADS = ("device", "staged", "host")


def default_load(backend: str) -> str:
    """How a backend's components load when the plan does not say: bitsandbytes on the GPU as the
    weights stream in, torchao where they load (the host)."""
    return "device" if backend in QUANTIZES_ON_DEVICE else "host"


def worth_trying(backend: str, load: str, offload: str) -> bool:
    """Whether recommend predicts this loading path for a quantized plan: each one the backend allows
    (the rules below), staged only where a placement offloads (without one, every component ends on the
    GPU anyway, so it saves nothing over device)."""
    if load == "host":
        return backend != "bnb_int8"
    if load == "device":
        return backend in QUANTIZES_ON_DEVICE
    return offload != "none" or backend not in QUANTIZES_ON_DEVICE


RULES = (
    Rule(
        "load.int8_not_on_host",
        lambda plan, target: "bnb_int8" if plan.quantize and plan.quantize.backend == "bnb_int8" and plan.loading == "host" else None,
        "load 'host' with {0}: bitsandbytes int8 weights quantized on the CPU fail on the GPU later "
        "('Expected a cuda device, but got: cpu', measured on the H100: bench/results/patch-gpu-h100.txt).",
        "Use load 'device' or 'staged'.",
    ),
    Rule(
        "load.torchao_not_while_streaming",
        lambda plan, target: plan.quantize.backend
        if plan.quantize and plan.quantize.backend not in QUANTIZES_ON_DEVICE and plan.loading == "device"
        else None,
        "load 'device' with {0}: diffusers' torchao quantizer quantizes where the weights load (the CPU), so "
        "nothing is quantized on the GPU while the pipeline loads.",
        "Use load 'staged' (each component loaded and quantized on the GPU) or 'host'.",
    ),
    Rule(
        "load.needs_quantization",
        lambda plan, target: plan.load if plan.load is not None and not plan.quantize else None,
        "load '{0}' chooses how quantized components load, and the plan quantizes nothing.",
        "Leave load out, or add 'quantize'.",
        severity="warning",
    ),
)


# ---- applying it ----------------------------------------------------------------------------------

# from_pretrained arguments a component's own load repeats from the pipeline's
HUB_KWARGS = ("revision", "variant", "cache_dir", "token", "local_files_only", "use_safetensors")


def staged_loads(
    spec: "QuantizeSpec", components: list[str], source: str, hub_kwargs: dict[str, str], site: "Site",
    target: "Target", names: dict[str, str],
) -> Code:  # fmt: skip
    """Statements loading each of ``components`` on its own, quantized on the GPU, then parked in host RAM.

    ``source`` is the pipeline's repo expression, ``hub_kwargs`` the other ``from_pretrained`` arguments
    to repeat (revision, variant ...), ``names`` each component's variable.
    """
    from .quantize import model_config

    statements, imports = [], ["from diffusers import AutoModel"]
    extra = "".join(f", {key}={value}" for key, value in hub_kwargs.items())
    # torchao quantizes where the weights load: put them on the GPU
    device_map = "" if spec.backend in QUANTIZES_ON_DEVICE else f", device_map={site.device}"
    for component in components:
        config = model_config(spec.backend, target.library_of(component), site)
        imports += config.imports
        statements.append(
            f'{names[component]} = AutoModel.from_pretrained({source}, subfolder="{component}", '
            f"quantization_config={config.statements[0]}, torch_dtype={site.dtype}{extra}{device_map})"
        )
        statements.append(f'{names[component]}.to("cpu")')
    return Code(tuple(statements), tuple(dict.fromkeys(imports)),
                f"{', '.join(components)} loaded one at a time, quantized on {site.device} ({spec.backend}), parked in RAM")  # fmt: skip


# glibc's malloc serves allocations under its mmap threshold (raised to 32 MiB once a large block is
# freed) from its heaps and keeps them when freed: converting or parking weights in host RAM, then
# moving them on, left 1.7-3.1 GiB resident while the pipeline ran (measured on the H200 host).
# malloc_trim hands every free page back: Flux fp8dq then ran at 1.97 GiB RSS, as the plain plan.
# Other C libraries have no malloc_trim; the check skips them.
RELEASE = 'if platform.libc_ver()[0] == "glibc":\n    ctypes.CDLL("libc.so.6").malloc_trim(0)'


def frees_host_memory(plan: "Plan") -> bool:
    """Whether the plan's loading leaves freed weights in the host allocator once the placement ran:
    conversion in host RAM (load 'host', fp8 casting) or components parked there (load 'staged')."""
    return bool(plan.layerwise_casting) or bool(plan.quantize) and plan.loading in ("host", "staged")


@cache
def releases_here() -> bool:
    """Whether this host's C library is glibc, so that the release statement runs here."""
    import platform

    return platform.libc_ver()[0] == "glibc"


def release(plan: "Plan", site: "Site") -> Code:
    """The statement after the placement returning what loading freed to the OS (glibc's malloc_trim)."""
    if not frees_host_memory(plan):
        return Code()
    return Code((RELEASE,), ("import ctypes", "import platform"),
                "host memory freed while loading handed back to the OS (glibc malloc_trim)")  # fmt: skip


# ---- memory ---------------------------------------------------------------------------------------


def quantized_at_load(plan: "Plan", weights: "Weights") -> list[str]:
    """The components the plan quantizes while loading, among those measured."""
    return [n for n in (plan.quantize.components if plan.quantize else []) if n in weights.bytes]


def device_bytes_at_load(plan: "Plan", weights: "Weights") -> tuple[int, int]:
    """(weights on the GPU, working bytes) while the pipeline loads, before the placement runs:
    ``device`` holds every quantized component plus the layer being quantized at full precision,
    ``staged`` one component and its layer, ``host`` nothing."""
    names = quantized_at_load(plan, weights)
    if not names or plan.loading == "host":
        return 0, 0
    if plan.loading == "staged" or plan.quantize.backend not in QUANTIZES_ON_DEVICE:
        name = max(names, key=lambda n: weights.bytes[n])
        return weights.bytes[name], weights.converted_layer(plan, name)
    return sum(weights.bytes[n] for n in names), max(weights.converted_layer(plan, n) for n in names)


def largest_file_bytes(comp: "ComponentMeasurement") -> int:
    """The most of one component's files an mmap holds resident at once: its largest file, else the
    size its library shards at, else the component."""
    size = comp.bytes or 0
    if comp.checkpoint is not None and comp.checkpoint.largest_file_bytes:
        return comp.checkpoint.largest_file_bytes
    return min(size, DEFAULT_SHARD_BYTES.get(comp.library, size))


def reads_mapped(comp: "ComponentMeasurement") -> bool:
    """Whether loading reads the component's weights straight from their memory-mapped files: stored at
    the dtype it loads at (or no checkpoint read to say otherwise), its tensors are views of file pages,
    which the kernel drops under pressure and reads again. A checkpoint stored wider (float32 loaded as
    float16) is converted into memory the process holds."""
    stored = comp.checkpoint.stored_bytes if comp.checkpoint is not None else None
    return not stored or not comp.bytes or stored <= 1.05 * comp.bytes  # buffers may differ a little


def host_bytes_at_load(
    plan: "Plan", weights: "Weights", offloaded_after: float, copy_per_byte: dict[str, float], *, held: bool = False
) -> float:
    """Host RAM above the process's own while loading, up to the first call.

    ``offloaded_after`` is what the placement copies into host memory at setup (quantized components
    it moves off the GPU, pinned copies), as the placement module says. ``held``: count only what the
    machine must hold, leaving out weight files read once through their mmap (``reads_mapped``).

    - Weights placed on the GPU from their files pass through RSS one file at a time, as mapped file
      pages (measured on the H200: Flux.1-dev with nothing offloaded, RSS 10.3 GiB while loading, 0.6 GiB
      of it anonymous or shared).
    - ``host`` (and fp8 casting, done where the weights load) holds the converted components' files
      while it converts them (the host's ``host_quantize`` term per byte), with every other component
      loaded beside them in host RAM before the placement moves anything (measured on the H200: Wan 2.1
      fp8-cast held its 11.4 GB text encoder too, 15.5 GiB in all).
    - ``staged`` keeps the quantized components parked while the next one loads.
    """
    comps = weights.measured.components

    def files(names) -> int:
        return max((largest_file_bytes(comps[n]) for n in names if not (held and reads_mapped(comps[n]))), default=0)

    names = quantized_at_load(plan, weights)
    in_ram = converted_in_host_ram(plan, weights)
    if in_ram:
        converted = sum(comps[n].bytes or 0 for n in in_ram)
        beside = sum(size for n, size in weights.bytes.items() if n not in in_ram)
        return copy_per_byte["host_quantize"] * converted + beside + offloaded_after
    if plan.loading == "staged" and names:  # in the plan's order: each one's files beside the ones parked before it
        parked = [sum(weights.bytes[n] for n in names[:i]) for i in range(len(names))]
        loading = max(p + files([n]) for p, n in zip(parked, names))
        return max(loading, sum(weights.bytes[n] for n in names) + offloaded_after)
    if plan.offload == "none":
        return files(weights.bytes)  # each component's files, read as it moves to the GPU
    return max(files(names), offloaded_after)  # the placement copies once loading is done


def converted_in_host_ram(plan: "Plan", weights: "Weights") -> list[str]:
    """Components converted where their weights load, on the CPU: quantized with load 'host', and
    fp8-cast ones (the cast runs before the placement)."""
    names = quantized_at_load(plan, weights) if plan.loading == "host" else []
    cast = plan.layerwise_casting.components if plan.layerwise_casting else []
    return sorted({n for n in (*names, *cast) if n in weights.bytes})


def on_device_after_load(plan: "Plan", weights: "Weights") -> list[str]:
    """Components on the GPU when loading is done, before the placement: the ones quantized on the GPU
    by load 'device' (load 'staged' parked them in host RAM)."""
    if plan.loading != "device" or not plan.quantize or plan.quantize.backend not in QUANTIZES_ON_DEVICE:
        return []
    return quantized_at_load(plan, weights)


def host_leftover_bytes(plan: "Plan", weights: "Weights", copy_per_byte: dict[str, float]) -> float:
    """What converting in host RAM leaves resident once the weights moved on: nothing where the patch's
    release runs (glibc), else what the host allocator kept per converted byte (measured on Linux
    before the release existed; other C libraries' allocators are not measured)."""
    if frees_host_memory(plan) and releases_here():
        return 0.0
    comps = weights.measured.components
    return copy_per_byte["host_leftover"] * sum(comps[n].bytes or 0 for n in converted_in_host_ram(plan, weights))
