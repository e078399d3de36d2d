"""Read an out-of-memory traceback or log: what failed, where, and by how much.

Agents meet OOM as text. triage_oom classifies it with the signatures below (data, most specific
first), reads torch's numbers out of the message (every format from torch 1.x to 2.x, CUDA, ROCm
and MPS), finds the stage and component from the traceback's frames, and turns it into the next
call: the shortfall in bytes and the ``recommend`` arguments the failure implies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from .units import format_bytes

Kind = Literal["cuda_oom", "mps_oom", "host_oom", "alloc_failure", "incompatible_strategy", "none"]
Stage = Literal["load", "text_encode", "denoise", "vae_decode", "vae_encode"]


class OomTriage(BaseModel):
    """What the text says failed; sizes in bytes, null where the text does not tell."""

    kind: Kind
    error: str | None = Field(None, description="The error line the triage rests on")
    tried_to_allocate_bytes: int | None = None
    total_bytes: int | None = Field(None, description="The device's capacity (MPS: the allowed maximum)")
    free_bytes: int | None = None
    reserved_bytes: int | None = Field(None, description="Reserved by PyTorch's allocator")
    allocated_bytes: int | None = Field(None, description="Allocated by PyTorch (held by tensors)")
    reserved_unallocated_bytes: int | None = Field(None, description="Reserved but unallocated: fragmentation")
    allowed_bytes: int | None = Field(None, description="A per-process cap (set_per_process_memory_fraction)")
    gpu_index: int | None = None
    other_processes_bytes: int | None = Field(None, description="Device memory other processes hold")
    shortfall_bytes: int | None = Field(None, description="Tried to allocate minus free: the least to save")
    stage: Stage | None = None
    component: str | None = None
    model_id: str | None = None
    workload: dict[str, int] = Field(
        default_factory=dict, description="height, width, frames, steps, batch found in the call or the script"
    )
    advice: list[str] = Field(default_factory=list)
    recommend_args: dict | None = Field(None, description="Arguments for recommend, when the model is known")


@dataclass(frozen=True)
class Signature:
    """An error text that means one thing, and what to do about it."""

    kind: Kind
    pattern: str  # a regex searched in the log, case-sensitive unless it says (?i)
    meaning: str
    fix: str


# Most specific first: the first signature that matches a line wins for that line.
SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "cuda_oom", r"(?:CUDA|HIP) out of memory|CUDA (?:driver )?error: out of memory", "The GPU ran out of memory.", ""
    ),
    Signature("mps_oom", r"MPS backend out of memory", "Apple MPS ran out of unified memory.", ""),
    Signature(
        "alloc_failure", r"CUBLAS_STATUS_ALLOC_FAILED|CUFFT_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED",
        "A CUDA library could not allocate its workspace: the GPU was (nearly) full.",
        "Treat it as an out-of-memory error: free memory at this stage.",
    ),  # fmt: skip
    Signature(
        "alloc_failure",
        r"Unable to find a valid cuDNN algorithm|CUDNN_STATUS_NOT_SUPPORTED|CUDNN_STATUS_INTERNAL_ERROR"
        r"|CUDNN_STATUS_EXECUTION_FAILED",
        "cuDNN or the CUDA driver failed, which with a huge convolution (a VAE decoding a large image or "
        "video) means its workspace did not fit.",
        "Treat it as an out-of-memory error: tile the VAE (pipe.vae.enable_tiling()) or free memory first.",
    ),
    Signature(
        "host_oom",
        r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory)|std::bad_alloc|^MemoryError\b"
        r"|Cannot allocate memory|Out of memory: Kill(?:ed)? process|oom[-_]kill|Memory cgroup out of memory"
        r"|OOMKilled|exit(?:ed)?\s+(?:with\s+)?(?:code|status)\s*[:=]?\s*137\b|exit status -9\b|signal 9\b|SIGKILL"
        r"|^Killed\s*$",
        "The host ran out of RAM (or hit its container limit) and the process was stopped or refused.",
        "Load with less host memory: quantize while loading, avoid pinned copies (group offload with "
        "low_cpu_mem_usage=True), or raise the container's memory limit.",
    ),
    Signature(
        "incompatible_strategy", r"with group offloading enabled\. This is not supported",
        "Model or sequential CPU offload was enabled on a pipeline that already uses group offloading.",
        "Use one offloading method: drop enable_model_cpu_offload / enable_sequential_cpu_offload, or the "
        "group offloading.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"requires an onload device whose backend implements streams",
        "Group offloading with use_stream=True needs a CUDA device.",
        "Pass use_stream=False, or onload to a CUDA device.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"`enable_(?:model|sequential)_cpu_offload` requires accelerator",
        "CPU offloading needs a GPU (or other accelerator) to offload to.",
        "Run on a GPU machine, or drop the offloading call and run on the CPU.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"No GPU found\. A GPU is needed for quantization",
        "bitsandbytes quantization needs a CUDA GPU.",
        "Use torchao int8 weight-only on the CPU, or run on a GPU.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"Promotion for Float8 Types is not supported",
        "Layerwise fp8 casting on a transformers text encoder (T5 casts activations to its weights' dtype).",
        "Apply enable_layerwise_casting to diffusers models only (transformer, unet, vae); quantize the text "
        "encoder instead.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"_scaled_mm is only supported on CUDA devices with compute capability",
        "float8 compute needs a GPU of compute capability 8.9 or newer (Ada, Hopper).",
        "Use fp8 for storage only (layerwise casting) or int8 weight-only quantization on this GPU.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"`quantization_config` must be an instance of `PipelineQuantizationConfig`",
        "A model-level quantization config was passed to a pipeline.",
        "Wrap it: PipelineQuantizationConfig(quant_backend=..., quant_kwargs=..., components_to_quantize=[...]) "
        "or quant_mapping={component: config}.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"quant_type must be an AOBaseConfig instance",
        "TorchAoConfig was given a string; diffusers 0.42 takes a torchao config object.",
        "Write TorchAoConfig(Int8WeightOnlyConfig()) (from torchao.quantization import Int8WeightOnlyConfig).",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"Please provide a `quant_mapping` instead",
        "quant_backend with quant_kwargs works only for bitsandbytes with transformers 5.x.",
        "Use PipelineQuantizationConfig(quant_mapping={'transformer': diffusers.TorchAoConfig(...), "
        "'text_encoder_2': transformers.TorchAoConfig(...)}).",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"Both `quant_kwargs` and `quant_mapping` cannot be None",
        "PipelineQuantizationConfig got neither quant_kwargs nor quant_mapping.",
        "Pass quant_kwargs (e.g. {'load_in_4bit': True}) with quant_backend, or a quant_mapping.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"`_repeated_blocks` attribute is empty",
        "compile_repeated_blocks on a model that declares no repeated blocks.",
        "Compile the whole model (torch.compile(model)) or skip compiling it.",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"Calling `(?:to|cuda)\(\)` is not supported for `(?:4|8)-bit` quantized models",
        "A bitsandbytes-quantized model was moved between devices with an old bitsandbytes.",
        "Install bitsandbytes >= 0.48, or keep the quantized model on its device (offload the others).",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"activated sequential model offloading .* not compatible with offloading",
        "The pipeline was moved to the GPU after enable_sequential_cpu_offload.",
        "Remove the pipe.to('cuda') call: offloading moves weights itself.",
    ),  # fmt: skip
)

_OOM_KINDS = ("cuda_oom", "mps_oom", "alloc_failure", "host_oom")  # preferred over what they cause

_STAGE_FIX = {
    "load": "It failed while loading: the resident weights do not fit. Offload (model, group) or quantize the "
    "largest components so they never sit on the GPU at full precision together.",
    "text_encode": "It failed in the text encoder: offload it (model CPU offload) or quantize it; it is needed "
    "once per prompt, not per step.",
    "denoise": "It failed while denoising: quantize or fp8-cast the denoiser, group-offload it, or lower the "
    "resolution / frames / batch.",
    "vae_decode": "It failed decoding latents: enable pipe.vae.enable_tiling() (and enable_slicing() for batches).",
    "vae_encode": "It failed encoding the input image: enable pipe.vae.enable_tiling().",
}

_STAGE_WORDS = {
    "load": "loading",
    "text_encode": "encoding the prompt",
    "denoise": "denoising",
    "vae_decode": "decoding latents with the VAE",
    "vae_encode": "encoding the input with the VAE",
}
_NUMBER = r"([\d.]+)\s*(bytes|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)"
# torch prints sizes in powers of 1024, labelled KiB/MiB/GiB (CUDA) or KB/MB/GB (MPS)
_SCALE = {"bytes": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SCALE |= {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
_CUDA_FIELDS = {
    "tried_to_allocate_bytes": rf"Tried to allocate {_NUMBER}",
    "total_bytes": rf"total capac\w* of {_NUMBER}|{_NUMBER} total capacity",
    "free_bytes": rf"of which {_NUMBER} is free|{_NUMBER} free",
    "allocated_bytes": rf"{_NUMBER} is allocated by PyTorch|{_NUMBER} already allocated",
    "reserved_unallocated_bytes": rf"{_NUMBER} is reserved by PyTorch but unallocated",
    "reserved_bytes": rf"{_NUMBER} reserved in total by PyTorch|{_NUMBER} cached\)",
    "allowed_bytes": rf"{_NUMBER} allowed;",
}
_MPS_FIELDS = {
    "allocated_bytes": rf"MPS allocated: {_NUMBER}",
    "other_processes_bytes": rf"other allocations: {_NUMBER}",
    "total_bytes": rf"max allowed: {_NUMBER}",
    "tried_to_allocate_bytes": rf"Tried to allocate {_NUMBER}",
}
_HOST_FIELDS = {"tried_to_allocate_bytes": r"you tried to allocate (\d+) bytes"}
_ROUNDING = 32 * 2**20  # torch prints two decimals: differences below this are noise
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def triage_oom(text: str, script: str | None = None) -> OomTriage:
    """Read an OOM traceback or a whole log and say what failed, where, and by how much.

    ``text`` is a traceback, a log or a notebook's output (ANSI colours, progress bars, chained
    exceptions, Windows paths are fine); ``script`` is optionally the source of the script that
    failed, for the model id and the workload. Returns the kind (cuda_oom, mps_oom, host_oom,
    alloc_failure: a CUDA library's allocation failure under another name, incompatible_strategy:
    a combination diffusers or bitsandbytes refuses, or none), torch's numbers (tried to allocate,
    total, free, reserved, allocated, reserved-but-unallocated, GPU index, other processes), the
    shortfall, the stage (load, text_encode, denoise, vae_decode, vae_encode) and component from the
    frames, advice, and the ``recommend`` arguments it implies. Text with no error gives kind "none".
    Next step: ``detect_hardware``, then ``measure_components`` and ``recommend`` with recommend_args.
    """
    lines = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    found = _find_error(lines)
    if found is None:
        return OomTriage(kind="none", advice=["No error in the text: nothing ran out of memory."])
    index, signature = found
    message = _message_at(lines, index)
    # torch's advice boilerplate after the numbers is ours to rephrase, not to repeat
    error = re.split(r"\s+(?:If reserved|See documentation|CUDA kernel errors might)", message.strip())[0]
    result = OomTriage(kind=signature.kind, error=error[:400])
    numbers = {"cuda_oom": _CUDA_FIELDS, "mps_oom": _MPS_FIELDS, "host_oom": _HOST_FIELDS}.get(signature.kind, {})
    for field, pattern in numbers.items():
        setattr(result, field, _read_size(pattern, message))
    if signature.kind == "cuda_oom":
        _read_cuda_extras(result, message)
    frames = _frames_before(lines, index)
    result.stage, result.component = _stage_and_component(frames)
    result.model_id, result.workload = _model_and_workload(text, script, frames)
    if result.tried_to_allocate_bytes is not None and result.free_bytes is not None:
        result.shortfall_bytes = max(0, result.tried_to_allocate_bytes - result.free_bytes)
    result.recommend_args = _recommend_args(result)
    result.advice = _advice(result, signature)
    return result


def _find_error(lines: list[str]) -> tuple[int, Signature] | None:
    """The line and signature to triage: an OOM before what it caused, the last occurrence of it."""
    hits: list[tuple[int, Signature]] = []
    for i, line in enumerate(lines):
        for signature in SIGNATURES:
            if re.search(signature.pattern, line, flags=re.M):
                hits.append((i, signature))
                break
    if not hits:
        return None
    rank = {kind: r for r, kind in enumerate(_OOM_KINDS)}
    best = min(rank.get(s.kind, len(rank)) for _, s in hits)
    return [h for h in hits if rank.get(h[1].kind, len(rank)) == best][-1]


def _message_at(lines: list[str], index: int) -> str:
    """The error message from its line on: torch's numbers may continue on wrapped lines."""
    message = [lines[index]]
    for line in lines[index + 1 : index + 6]:
        if not line.strip() or line.lstrip().startswith(("File ", "Traceback", "During handling", "The above")):
            break
        message.append(line)
    return " ".join(part.strip() for part in message)


def _read_size(pattern: str, message: str) -> int | None:
    match = re.search(pattern, message)
    if match is None:
        return None
    groups = [g for g in match.groups() if g is not None]
    value, unit = (groups[0], groups[1]) if len(groups) > 1 else (groups[0], "bytes")
    return int(float(value) * _SCALE[unit])


def _read_cuda_extras(result: OomTriage, message: str) -> None:
    gpu = re.search(r"\(GPU (\d+);|GPU (\d+) has a total", message)
    if gpu:
        result.gpu_index = int(gpu.group(1) or gpu.group(2))
    processes = [int(float(v) * _SCALE[u]) for v, u in re.findall(rf"Process \d+ has {_NUMBER} memory in use", message)]
    this = _read_size(rf"this process has {_NUMBER} memory in use", message)
    if result.reserved_bytes is None and result.allocated_bytes is not None:
        result.reserved_bytes = result.allocated_bytes + (result.reserved_unallocated_bytes or 0)
    if processes:
        # NVML lists every process, this one included and unmarked: this one holds at least what PyTorch
        # reserved, so take the closest such entry as ours and the rest as others.
        reserved = result.reserved_bytes or 0
        ours = min((p for p in processes if p >= reserved), default=max(processes), key=lambda p: p - reserved)
        result.other_processes_bytes = sum(processes) - ours
    elif this is not None and result.total_bytes is not None and result.free_bytes is not None:
        others = result.total_bytes - result.free_bytes - this
        result.other_processes_bytes = others if others > _ROUNDING else 0


@dataclass(frozen=True)
class Frame:
    path: str
    function: str
    code: str


_PY_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line \d+, in (?P<func>\S+)')
_IPY_FRAME = re.compile(r"^\s*(?:File (?P<path>.+?):\d+, in (?P<func>[\w.<>]+)|Cell In\[\d+\], line \d+)")
_IPY_CODE = re.compile(r"^\s*-+>\s*\d+\s+(?P<code>.*)")


def _frames_before(lines: list[str], index: int) -> list[Frame]:
    """The frames of the traceback that ends at ``index``, outermost first."""
    start = max((i for i in range(index) if "Traceback (most recent call last)" in lines[i]), default=0)
    frames: list[Frame] = []
    for i in range(start, index):
        match = _PY_FRAME.match(lines[i]) or _IPY_FRAME.match(lines[i])
        if match is None:
            continue
        path = (match.group("path") or "<cell>").replace("\\", "/")
        code = ""
        if match.re is _PY_FRAME:
            following = lines[i + 1] if i + 1 < index else ""
            code = "" if _PY_FRAME.match(following) else following.strip()
        else:  # IPython marks the running line with an arrow among its context lines
            for line in lines[i + 1 : index]:
                if _IPY_FRAME.match(line):
                    break
                if arrow := _IPY_CODE.match(line):
                    code = arrow.group("code").strip()
        frames.append(Frame(path, (match.group("func") or "<cell>").rsplit(".", 1)[-1], code))
    return frames


_VAE_PATH = r"/diffusers/models/(?:autoencoders/|autoencoder_\w+\.py|vae\.py)"  # and diffusers < 0.25's flat layout
_DENOISER_PATH = r"/diffusers/models/(?:transformers/|unets/|controlnets?/|(?:unet|transformer|controlnet)_\w+\.py)"
_COMPONENT_CALL = re.compile(
    r"\bself\.(transformer(?:_2)?|unet|vae|text_encoder(?:_\d)?|image_encoder|controlnet|prior|decoder)\b"
)
_STAGE_BY_PATH = (
    # a model built on the GPU (with torch.device("cuda"): from_config) allocates its weights in __init__
    (r"/(?:diffusers|transformers)/models/", r"^__init__$", "load"),
    (_VAE_PATH, r"(?i)decode|decoder|upsample", "vae_decode"),
    (_VAE_PATH, r"(?i)encode|encoder", "vae_encode"),
    (_DENOISER_PATH, r".", "denoise"),
    (r"/transformers/models/", r".", "text_encode"),
    (r"/diffusers/pipelines/", r"^(?:encode_prompt|_encode_prompt\w*|_get_\w*prompt_embeds|encode_image)$",
     "text_encode"),
    # not accelerate's hooks: offloading moves weights with them while a component runs
    (r"/(?:diffusers|transformers)/.*(?:pipeline_utils|modeling_utils|loading_utils)\.py$|/safetensors/",
     r"^(?:from_pretrained|load\w*|_load\w*|to|cuda|enable_\w*offload\w*)$", "load"),
)  # fmt: skip
_STAGE_BY_CODE = (
    (r"\bvae\.decode\(|\bvae\.tiled_decode\(", "vae_decode"),
    (r"\bvae\.encode\(|retrieve_latents\(", "vae_encode"),
    (r"\bself\.(?:transformer(?:_2)?|unet|controlnet|prior)\(", "denoise"),
    (r"\bself\.text_encoder\w*\(|encode_prompt\(", "text_encode"),
    (r"\.from_pretrained\(|\.to\(\s*[\"'](?:cuda|mps)|\.to\(\s*device\s*\)|\.cuda\(\)", "load"),
)
_COMPONENT_BY_PATH = (
    (_VAE_PATH, "vae"),
    (r"/diffusers/models/(?:unets/|unet_)", "unet"),
    (r"/diffusers/models/controlnet", "controlnet"),
    (r"/diffusers/models/(?:transformers/|transformer_)", "transformer"),
    (r"/transformers/models/", "text_encoder"),
)


def _stage_and_component(frames: list[Frame]) -> tuple[str | None, str | None]:
    """Innermost frame that tells first: a model's own file, a pipeline step, then the code line."""
    stage = component = None
    for frame in reversed(frames):
        if stage is None:
            stage = next(
                (s for p, f, s in _STAGE_BY_PATH if re.search(p, frame.path) and re.search(f, frame.function)), None
            )
            if stage is None and "site-packages" not in frame.path and "dist-packages" not in frame.path:
                stage = next((s for p, s in _STAGE_BY_CODE if re.search(p, frame.code)), None)
            elif stage is None:
                stage = next((s for p, s in _STAGE_BY_CODE[:4] if re.search(p, frame.code)), None)
        in_a_model = re.search(r"/(?:diffusers|transformers)/models/", frame.path)  # a pipeline or the user's code
        if component is None and not in_a_model and (call := _COMPONENT_CALL.search(frame.code)):
            component = call.group(1)
        if stage and component:
            break
    if component is None:  # the outermost model: a UNet's attention blocks live in transformers/
        for frame in frames:
            component = next((c for p, c in _COMPONENT_BY_PATH if re.search(p, frame.path)), None)
            if component:
                break
    return stage, component


_MODEL_IN_TEXT = (
    re.compile(r"from_pretrained\(\s*(?:pretrained_model_name_or_path\s*=\s*)?[\"']([^\"']+)[\"']"),
    re.compile(r"models--([\w.-]+)--([\w.-]+)"),
)
def _model_and_workload(text: str, script: str | None, frames: list[Frame]) -> tuple[str | None, dict[str, int]]:
    from .script import WORKLOAD_KWARGS  # libcst: imported when a script or frame is read, not at start-up

    model, workload = (_from_script(script) if script else (None, {}))
    for frame in frames:  # the call's own line in the traceback, when the script is not given
        for name, size in re.findall(rf"\b({'|'.join(WORKLOAD_KWARGS)})\s*=\s*(\d+)\b", frame.code):
            workload.setdefault(WORKLOAD_KWARGS[name], int(size))
    if model is None:
        for pattern in _MODEL_IN_TEXT:
            if match := pattern.search(text):
                model = "/".join(match.groups())
                break
    return model, workload


def _from_script(source: str) -> tuple[str | None, dict[str, int]]:
    """The pipeline's model id and the call's sizes, as tools/script.py reads the script (constants,
    argparse defaults); from its text where it does not parse or builds no pipeline."""
    from .errors import PipefitError
    from .script import analyze, call_workload, parse

    try:
        info = analyze(parse(source))
    except PipefitError:
        match = _MODEL_IN_TEXT[0].search(source)
        return (match.group(1) if match else None), {}
    model = next((c.model_id for c in info.creations if c.model_id), None)
    return model, call_workload(info)


def _recommend_args(result: OomTriage) -> dict | None:
    """recommend's own arguments (its names and units: ``vram`` as a size it parses), for recommend(**args)."""
    if result.model_id is None or result.kind in ("none", "incompatible_strategy"):
        return None
    args: dict = {"model": result.model_id, **result.workload}
    if result.kind in ("cuda_oom", "alloc_failure", "mps_oom") and result.total_bytes is not None:
        usable = (result.allowed_bytes or result.total_bytes) - (result.other_processes_bytes or 0)
        args["vram"] = f"{math.floor(usable / 2**30 * 100 + 1e-6) / 100:.2f}GiB"  # rounded down: never more than there is
    return args


def _advice(result: OomTriage, signature: Signature) -> list[str]:
    where = f" while {_STAGE_WORDS[result.stage]}" if result.stage else ""
    where += f" ({result.component})" if result.component else ""
    advice = [f"{signature.meaning.rstrip('.')}{where}."]
    if result.tried_to_allocate_bytes is not None and result.free_bytes is not None:
        advice.append(
            f"It tried to allocate {format_bytes(result.tried_to_allocate_bytes)} with "
            f"{format_bytes(result.free_bytes)} free"
            + (f" of {format_bytes(result.total_bytes)}" if result.total_bytes else "")
            + f": at least {format_bytes(result.shortfall_bytes)} short at that moment (the peak needs more)."
        )
    fragmented = result.reserved_unallocated_bytes or 0
    if fragmented and (
        fragmented >= (result.tried_to_allocate_bytes or 0) or fragmented > 0.05 * (result.total_bytes or 1)
    ):
        advice.append(
            f"{format_bytes(fragmented)} is reserved by PyTorch but unallocated (fragmentation): set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting Python."
        )
    if (result.other_processes_bytes or 0) > _ROUNDING:
        advice.append(
            f"Other processes hold {format_bytes(result.other_processes_bytes)} of this GPU: stop them "
            "(nvidia-smi lists them) or use another GPU."
        )
    if signature.fix:
        advice.append(signature.fix)
    if result.stage in _STAGE_FIX and result.kind in ("cuda_oom", "mps_oom", "alloc_failure"):
        advice.append(_STAGE_FIX[result.stage])
    if result.kind in _OOM_KINDS:
        args = result.recommend_args or {"model": "MODEL", **result.workload}
        flags = "".join(f" --{k} {args[k]}" for k in ("height", "width", "frames", "steps", "batch", "vram") if k in args)
        missing = "" if result.recommend_args else " with your model id (pass --script to find it) and image size"
        advice.append(f"Next: pipefit recommend {args['model']}{flags}{missing}: it lists every plan that fits.")
    return advice
