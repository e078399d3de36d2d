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
    workload: dict[str, int | float] = Field(
        default_factory=dict,
        description="height, width, frames, steps, batch and guidance_scale found in the call or the script",
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
    stage: str | None = None  # where this error can only happen, when no frame says


# Most specific first: the first signature that matches a line wins for that line.
SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "cuda_oom", r"(?:CUDA|HIP) out of memory|CUDA (?:driver )?error: out of memory|Allocation on device",
        "The GPU ran out of memory.", "",
    ),  # fmt: skip
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
        r"|(?:^|[\s\"'(:>])Killed(?=$|[\s\"'.,;:!)])|paging file is too small|os error 1455"
        r"|session crashed after using all available RAM",
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
        "incompatible_strategy",
        r"Calling `(?:to|cuda)\(\)` is not supported for `[48]-bit`|`\.(?:to|cuda)` is not supported for `[48]-bit`",
        "A bitsandbytes-quantized model was moved between devices with an old bitsandbytes.",
        "Install bitsandbytes >= 0.48, or keep the quantized model on its device (offload the others).",
        stage="load",
    ),
    Signature(
        "incompatible_strategy", r"call `\.to\([^)]*\)` on a pipeline that has models quantized with `?bitsandbytes",
        "The whole pipeline was moved with .to() while some of its models are bitsandbytes-quantized, with an "
        "accelerate too old to move them.",
        "Upgrade accelerate (and bitsandbytes >= 0.48), or load the pipeline without .to(): bitsandbytes places "
        "the quantized models itself; offload the rest.",
        stage="load",
    ),  # fmt: skip
    Signature(
        "incompatible_strategy", r"activated sequential model offloading",
        "The pipeline was moved to the GPU after enable_sequential_cpu_offload.",
        "Remove the pipe.to('cuda') call: offloading moves weights itself.",
        stage="load",
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
# torch's messages of each era; "Allocation on device ... would exceed allowed memory" is the one the
# cudaMallocAsync backend and ComfyUI's summary print (Requested, Device limit, Free according to CUDA)
_CUDA_FIELDS = {
    "tried_to_allocate_bytes": rf"Tried to allocate {_NUMBER}|Requested\s*:\s*{_NUMBER}",
    "total_bytes": rf"total capac\w* of {_NUMBER}|{_NUMBER} total capacity|Device limit\s*:\s*{_NUMBER}",
    "free_bytes": rf"of which {_NUMBER} is free|{_NUMBER} free|Free \(according to CUDA\)\s*:\s*{_NUMBER}",
    "allocated_bytes": rf"{_NUMBER} is allocated by PyTorch|{_NUMBER} already allocated|Currently allocated\s*:\s*{_NUMBER}"
    rf"|Allocated memory: memory={_NUMBER}",
    "reserved_unallocated_bytes": rf"{_NUMBER} is reserved by PyTorch but unallocated",
    "reserved_bytes": rf"{_NUMBER} reserved in total by PyTorch|{_NUMBER} cached\)|Max reserved memory: max_reserved={_NUMBER}",
    "allowed_bytes": rf"{_NUMBER} allowed;",
}
# MPS's "other allocations" are this process's memory outside the MPS allocator, not other processes'
_MPS_FIELDS = {
    "allocated_bytes": rf"MPS allocated: {_NUMBER}",
    "total_bytes": rf"max allowed: {_NUMBER}",
    "tried_to_allocate_bytes": rf"Tried to allocate {_NUMBER}",
}
_HOST_FIELDS = {"tried_to_allocate_bytes": r"you tried to allocate (\d+) bytes"}
_ROUNDING = 32 * 2**20  # torch prints two decimals: differences below this are noise
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PREFIX = re.compile(r"^\s*(?:\[rank\d+\]:\s?|>\s?)+")  # torchrun's per-rank prefix, a quoted log


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
    lines = [_PREFIX.sub("", line) for line in _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    hits = _hits(lines)
    found = _find_error(hits)
    if found is None:
        return OomTriage(kind="none", advice=["No error in the text: nothing ran out of memory."])
    index, signature = found
    message = _message_at(lines, index)
    # torch's advice boilerplate after the numbers is ours to rephrase, not to repeat
    error = re.split(r"\s+(?:If reserved|See documentation|CUDA kernel errors might)", message.strip())[0]
    result = OomTriage(kind=signature.kind, error=error[:400])
    numbers = {"cuda_oom": _CUDA_FIELDS, "mps_oom": _MPS_FIELDS, "host_oom": _HOST_FIELDS}.get(signature.kind, {})
    # a log may print the numbers once (ComfyUI's summary) and the error again with its traceback
    messages = [message, *(_message_at(lines, i) for i, s in hits if s is signature and i != index)]
    for field, pattern in numbers.items():
        setattr(result, field, next((size for m in messages if (size := _read_size(pattern, m)) is not None), None))
    if signature.kind == "cuda_oom":
        _read_cuda_extras(result, message)
    frames = _frames_before(lines, index) or _frames_after(lines, index, [i for i, _ in hits])
    result.stage, result.component = _stage_and_component(frames)
    result.stage = result.stage or signature.stage or _stage_from_log(lines, index)
    result.model_id, result.workload = _model_and_workload(text, script, frames)
    if result.tried_to_allocate_bytes is not None and result.free_bytes is not None:
        result.shortfall_bytes = max(0, result.tried_to_allocate_bytes - result.free_bytes)
    result.recommend_args = _recommend_args(result)
    result.advice = _advice(result, signature)
    return result


def _hits(lines: list[str]) -> list[tuple[int, Signature]]:
    """Every line that shows an error, with the first (most specific) signature it matches."""
    hits: list[tuple[int, Signature]] = []
    for i, line in enumerate(lines):
        for signature in SIGNATURES:
            if re.search(signature.pattern, line, flags=re.M):
                hits.append((i, signature))
                break
    return hits


def _find_error(hits: list[tuple[int, Signature]]) -> tuple[int, Signature] | None:
    """The line and signature to triage: an OOM before what it caused, the last occurrence of it."""
    if not hits:
        return None
    rank = {kind: r for r, kind in enumerate(_OOM_KINDS)}
    best = min(rank.get(s.kind, len(rank)) for _, s in hits)
    return [h for h in hits if rank.get(h[1].kind, len(rank)) == best][-1]


def _message_at(lines: list[str], index: int) -> str:
    """The error message from its line on: torch's numbers may continue on wrapped lines, and a log
    pasted into markdown puts a blank line between each (two blank lines end it, as does a frame)."""
    message, blanks = [lines[index]], 0
    for line in lines[index + 1 : index + 16]:
        if line.lstrip().startswith(("File ", "Traceback", "During handling", "The above")):
            break
        blanks = blanks + 1 if not line.strip() else 0
        if blanks == 2:
            break
        message.append(line)
    return " ".join(part.strip() for part in message if part.strip())


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
_IPY_FRAME = re.compile(
    r"^\s*(?:File \[?(?P<path>[^\]\s]+?):\d+\]?(?:\([^)]*\))?(?:, in (?P<func>[\w.<>]+))?|Cell In\[\d+\], line \d+)"
)  # Jupyter's frames, also pasted as markdown links: File [~/x/hooks.py:166](http://...)
_IPY_CODE = re.compile(r"^\s*-+>\s*\d+\s+(?P<code>.*)")


def _frames_before(lines: list[str], index: int) -> list[Frame]:
    """The frames of the traceback that ends at ``index``, outermost first."""
    start = max((i for i in range(index) if "Traceback (most recent call last)" in lines[i]), default=0)
    return _frames_in(lines, start, index)


def _frames_in(lines: list[str], start: int, index: int) -> list[Frame]:
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


def _frames_after(lines: list[str], index: int, errors: list[int]) -> list[Frame]:
    """The traceback printed after the error line (ComfyUI's "!!! Exception during processing !!!"),
    up to the next line that shows an error (``errors``: those lines, in order)."""
    start = next((i for i in range(index + 1, min(len(lines), index + 40)) if "Traceback (most recent call last)" in lines[i]), index)
    end = next((i for i in errors if i > start), len(lines))
    return _frames_before(lines, end) if start > index else _frames_in(lines, index + 1, end)  # a pasted piece: no header


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
    (r"/transformers/models/(?!auto/)", r".", "text_encode"),
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


# Beyond diffusers: ComfyUI, A1111, Forge, SD.Next and the models' own repos name their files and
# functions after what they do. A frame's stage comes from the most specific of: diffusers' own paths
# above, these paths, its function's name, its line of code.
_ANY_VAE_PATH = r"(?i)(?:^|/)(?:\w*vae\w*|autoencoder\w*)(?:\.py$|/)|/autoencoders/|/ldm/models/autoencoder"
_ANY_TEXT_PATH = (
    r"(?i)/(?:text_encoders?|t5|umt5|clip|sd1_clip|sdxl_clip|llama|qwen\w*|gemma\w*|mistral|siglip|text_encoder\w*)"
    r"(?:\.py$|/)|/transformers/models/|/modeling_(?:t5|clip|umt5|llama|qwen\w*|gemma\w*)\.py$"
)
_ANY_DENOISER_PATH = (
    r"(?i)/(?:k_diffusion|samplers?|sampling|sd_samplers\w*|openaimodel|model_base|mmdit|\w*dit\w*|\w*unet\w*"
    r"|\w*transformer\w*)(?:\.py$|/)|/modules/models?\.py$"
)
_STAGE_BY_FUNCTION = (
    (r"(?i)^(?:decode\w*|\w*_decode|decode_first_stage|tiled_decode\w*)$", "vae_decode"),
    (r"(?i)^(?:encode_prompt|_encode_prompt\w*|encode_text\w*|get_learned_conditioning|encode_token_weights"
     r"|encode_from_tokens\w*|_get_\w*prompt_embeds|encode_with_transformers)$", "text_encode"),
    (r"(?i)^(?:encode_first_stage|tiled_encode\w*|vae_encode\w*|encode_image|\w*_encode_image)$", "vae_encode"),
    (r"(?i)^(?:sample\w*|\w*_sample|denoise\w*|sampling_function|calc_cond\w*|apply_model|p_sample\w*"
     r"|\w*ksampler)$", "denoise"),
    (r"^(?:from_pretrained|from_single_file|load\w*|_load\w*|to|cuda|_apply|convert|enable_\w*offload\w*"
     r"|model_load|__init__|dispatch_model)$", "load"),
)  # fmt: skip
_MORE_STAGE_BY_CODE = (
    (r"\bclip\.encode|encode_from_tokens|\.encode_token_weights|text_encoder\w*\(", "text_encode"),
    (r"\bvae_decode\(|\.decode\(\s*(?:latents?|samples?|z)\b", "vae_decode"),
    (r"\bvae_encode\(|\bvae\.encode\(", "vae_encode"),
)


_MOVES_WEIGHTS = re.compile(
    r"^(?:to|cuda|_apply|convert|pre_forward|new_forward|set_module_tensor_to_device|load_models_gpu|model_load"
    r"|onload_\w*|_onload\w*|dispatch_model|send_to_device)$"
)  # moving weights onto the GPU: inside a working stage (an offload hook, ComfyUI's lazy load) it is that stage


def _frame_stage(frame: Frame, chain: list[Frame]) -> str | None:
    """What one frame says about the stage (None: nothing); ``chain`` is the whole stack, for a VAE's
    direction (an encoder's layers are named like a decoder's)."""
    for path, function, stage in _STAGE_BY_PATH:
        if re.search(path, frame.path) and re.search(function, frame.function):
            return stage
    user_code = "site-packages" not in frame.path and "dist-packages" not in frame.path
    for pattern, stage in (_STAGE_BY_CODE if user_code else _STAGE_BY_CODE[:4]) + _MORE_STAGE_BY_CODE:
        if re.search(pattern, frame.code):
            return stage
    if "/diffusers/" in frame.path:
        return None  # diffusers' own files: the specific rules above said all there is
    if frame.function == "__init__" and re.search(r"/(?:models?|modules|text_encoders?|ldm)/", frame.path):
        return "load"  # a model built on the GPU allocates its weights as it is made
    if re.search(_STAGE_BY_FUNCTION[-1][0], frame.function) or _MOVES_WEIGHTS.search(frame.function):
        return "load"  # loading or moving a model, whichever file it is in
    if re.search(_ANY_VAE_PATH, frame.path):
        names = " ".join(f.function for f in chain)
        return "vae_encode" if re.search(r"(?i)encode", names) and not re.search(r"(?i)decode", names) else "vae_decode"
    if re.search(_ANY_TEXT_PATH, frame.path):
        return "text_encode"
    for pattern, stage in _STAGE_BY_FUNCTION:
        if re.search(pattern, frame.function):
            return stage
    if re.search(_ANY_DENOISER_PATH, frame.path) and frame.function in ("forward", "_forward", "__call__"):
        return "denoise"
    return None


def _stage_and_component(frames: list[Frame]) -> tuple[str | None, str | None]:
    """The stage: the innermost frame that names one; where that frame moves weights onto the GPU
    (accelerate's offload hooks, ComfyUI's lazy loading), the working stage around it, if any: that
    stage failed, and telling a user who already offloads to offload would not help. The component:
    the innermost call of one in a pipeline or the user's code, else the outermost model file."""
    verdicts = [_frame_stage(frame, frames) for frame in frames]
    stage = None
    for i in reversed(range(len(frames))):
        if verdicts[i] is None:
            continue
        stage = verdicts[i]
        if stage == "load" and _MOVES_WEIGHTS.search(frames[i].function):
            stage = next((v for v in reversed(verdicts[:i]) if v not in (None, "load")), "load")
        break
    component = None
    for frame in reversed(frames):
        in_a_model = re.search(r"/(?:diffusers|transformers)/models/", frame.path)  # a pipeline or the user's code
        if not in_a_model and (call := _COMPONENT_CALL.search(frame.code)):
            component = call.group(1)
            break
    if component is None:  # the outermost model: a UNet's attention blocks live in transformers/
        for frame in frames:
            component = next((c for p, c in _COMPONENT_BY_PATH if re.search(p, frame.path)), None)
            if component:
                break
    return stage, component


# what a log shows where no frame tells: ComfyUI's node, the last progress bar, the words around it
_STAGE_BY_NODE = (
    (r"(?i)\w*(?:VAE|Video)?Decode\w*", "vae_decode"),
    (r"(?i)\w*VAEEncode\w*|\w*(?:Image|Video)Encode\w*", "vae_encode"),
    (r"(?i)\w*(?:Text|CLIP|Wildcard|Prompt)\w*Encode\w*|\w*TextEncoder\w*", "text_encode"),
    (r"(?i)\w*Sampler\w*|\w*Sample\w*", "denoise"),
    (r"(?i)\w*Loader\w*|\w*Load\w*", "load"),
)
_NODE = re.compile(r"(?:Error occurred when executing|Node Type:\**|Prompt executed in|node)\s*\**\s*([A-Za-z][\w]+)")
_PROGRESS = re.compile(r"(?P<label>[^|%]*?)\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)")
_LOADING_BAR = re.compile(r"(?i)load|fetch|download|shard|writing|components")
_STAGE_BY_WORDS = (  # prose, not identifiers: `text_encoder=None` in a pasted script says nothing
    (r"(?i)(?<![\w.])(?:vae )?decod(?:e|ing|er)(?![\w(])|\bdecode_first_stage\b", "vae_decode"),
    (r"(?i)(?<![\w.])vae encod(?:e|ing|er)(?![\w(])", "vae_encode"),
    (r"(?i)(?<![\w.])(?:text encod(?:er|ing)|prompt encod\w*)(?![\w(])|\bencode_prompt\b", "text_encode"),
    (r"(?i)\b(?:while|when|during|at) (?:loading|load)\b|\bfrom_pretrained\(|\bpipe(?:line)?\s*=\s*pipe(?:line)?\.to\("
     r"|\bloading (?:the )?(?:model|checkpoint|pipeline|weights)", "load"),
    (r"(?i)(?<![\w.])(?:sampling|denois\w+)(?![\w(])", "denoise"),
)  # fmt: skip


def _stage_from_log(lines: list[str], index: int) -> str | None:
    """The stage where no traceback frame tells: the node ComfyUI names, the progress bar last drawn
    before the error (a denoising loop under way: denoise; finished: the decode after it; only loading
    bars: load), then the words of the log."""
    window = lines[max(0, index - 40) : index + 40]
    for line in window:
        if match := _NODE.search(line):
            for pattern, stage in _STAGE_BY_NODE:
                if re.fullmatch(pattern, match.group(1)):
                    return stage
    bars = [m for line in lines[max(0, index - 40) : index + 1] for m in _PROGRESS.finditer(line)]
    if bars:
        last = bars[-1]
        if not _LOADING_BAR.search(last.group("label")):
            return "vae_decode" if last.group("done") == last.group("total") != "0" else "denoise"
        if all(_LOADING_BAR.search(b.group("label")) for b in bars):
            return "load"
    said = [(abs(i - index), rank, stage) for i, line in enumerate(lines)
            for rank, (pattern, stage) in enumerate(_STAGE_BY_WORDS) if re.search(pattern, line)]  # fmt: skip
    return min(said)[2] if said else None  # the words nearest the error


_MODEL_IN_TEXT = (
    re.compile(r"from_pretrained\(\s*(?:pretrained_model_name_or_path\s*=\s*)?[\"']([^\"']+)[\"']"),
    re.compile(r"models--([\w.-]+)--([\w.-]+)"),
)
def _model_and_workload(text: str, script: str | None, frames: list[Frame]) -> tuple[str | None, dict[str, int | float]]:
    # libcst: imported when a script or frame is read, not at start-up
    from .script import WORKLOAD_KWARGS, workload_value

    model, workload = (_from_script(script) if script else (None, {}))
    for frame in frames:  # the call's own line in the traceback, when the script is not given
        for name, value in re.findall(rf"\b({'|'.join(WORKLOAD_KWARGS)})\s*=\s*(\d+(?:\.\d*)?)(?![\w.])", frame.code):
            if (number := workload_value(name, int(value) if value.isdigit() else float(value))) is not None:
                workload.setdefault(WORKLOAD_KWARGS[name], number)
    if model is None:
        for pattern in _MODEL_IN_TEXT:
            if match := pattern.search(text):
                model = "/".join(match.groups())
                break
    return model, workload


def _from_script(source: str) -> tuple[str | None, dict[str, int | float]]:
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
