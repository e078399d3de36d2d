"""measure_components: exact sizes of every component of a diffusers pipeline, without its weights.

Each model component is built on the meta device from its config (shapes and dtypes, no memory),
given the dtypes loading would give it, and measured: total bytes, repeated blocks, the groups
diffusers' group offloading makes, the largest leaf layer, and its size after fp8 layerwise casting
and after each quantization backend. Where weights exist, their safetensors headers are read (not
the tensors) to report what is on disk and to check the config against the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import PipefitError
from .model_source import ComponentSource, resolve_pipeline
from .sizes import module_bytes, param_count, pinned_bytes
from .strategies import group_offload, layerwise_casting, quantize

if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "float16", "float32")
_CACHE_SCHEMA = 4  # bump when the measurement's meaning changes
# The code whose rules the figures come from: editing it (a fixed skip rule, say) invalidates the cache.
_RULE_SOURCES = ("measure.py", "sizes.py", "strategies")
_MODEL_LIBRARIES = ("diffusers", "transformers")


class BlockList(BaseModel):
    """A direct ModuleList/Sequential child: what block-level group offloading moves one at a time."""

    attr: str
    count: int
    bytes_each: int = Field(description="The largest block of the list")


class RepeatedBlock(BaseModel):
    """A class named in ``_repeated_blocks``: what regional torch.compile compiles once and reuses."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    class_name: str = Field(alias="class")
    count: int
    bytes_each: int


class Checkpoint(BaseModel):
    """What the safetensors headers in the component's folder say (weights are never read)."""

    files: list[str]
    params: int
    stored_bytes: int
    dtypes: list[str]
    largest_file_bytes: int | None = Field(None, description="the biggest of the files: what one mmap can hold resident")


class ComponentMeasurement(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    class_name: str = Field(alias="class")
    library: str
    params: int | None = None
    bytes: int | None = Field(None, description="On the device at the target dtype, buffers included")
    layerwise_fp8_bytes: int | None = Field(None, description="After fp8 layerwise casting; null where unsupported")
    quantized_bytes: dict[str, int] | None = Field(None, description="After each backend, quantization state included")
    largest_quantized_layer_bytes: dict[str, int] | None = Field(
        None, description="each backend's largest converted weight at the load dtype (dequantized while it computes)"
    )
    largest_leaf_bytes: int | None = None
    leaf_pair_bytes: int | None = Field(None, description="the two largest layers: what a layer-by-layer stream holds at once")
    leaf_count: int | None = Field(None, description="the layers leaf-level offloading copies one by one")
    pinned_bytes: int | None = Field(None, description="a pinned host copy of every tensor, each rounded up to a power of two")
    leaf_offload_root_bytes: int | None = Field(
        None, description="kept on the device by leaf-level offloading for the whole forward: norms, position tables"
    )
    blocks: list[BlockList] = Field(default_factory=list)
    repeated_blocks: list[RepeatedBlock] = Field(default_factory=list)
    block_offload_groups_bytes: list[int] = Field(default_factory=list)
    block_offload_peak_bytes: dict[str, int] = Field(
        default_factory=dict,
        description="the most bytes block-level group offloading holds at once, by blocks per group and 'stream'",
    )
    checkpoint: Checkpoint | None = None
    config: dict[str, Any] = Field(
        default_factory=dict, description="The architecture's numbers recommend's models use (hidden sizes, channels)"
    )


class PipelineMeasurement(BaseModel):
    model: str
    pipeline_class: str
    dtype: str
    total_bytes: int = Field(description="Sum of the model components' bytes")
    components: dict[str, ComponentMeasurement]
    warnings: list[str] = Field(default_factory=list)
    seconds: float
    from_cache: bool = False


def measure_components(
    model: Any,
    dtype: str = "bfloat16",
    progress: Callable[[str], None] | None = None,
    cache: bool = True,
) -> PipelineMeasurement:
    """Exact memory figures for each component of a diffusers pipeline, computed without loading weights.

    ``model`` is a hub id (configs fetched, never weights; offline it must already be cached), a local
    diffusers folder (configs alone are enough), a hub cache entry, ``builtin:NAME`` for a shipped
    full-size example (flux1-dev, sdxl-base, wan2.1-t2v-1.3b), or an in-memory DiffusionPipeline.

    For each model component: class, parameters, bytes at ``dtype``; repeated block lists and their
    per-block bytes; the groups block-level group offloading makes (a T5/CLIP text encoder is ONE
    group); the largest leaf layer; bytes after fp8 layerwise casting (diffusers models only); and
    bytes after bnb_nf4, bnb_int8 and torchao_int8wo from the layers each backend really converts,
    quantization state included. Tokenizers and schedulers are listed without sizes.
    Results are cached per model folder and library versions (``cache=False`` measures afresh).
    Next step: ``recommend`` with these figures and the hardware from ``detect_hardware``.
    """
    if dtype not in DTYPES:
        raise PipefitError(f"Unsupported dtype {dtype!r}.", f"Use one of: {', '.join(DTYPES)}.")
    start = time.perf_counter()
    say = progress or (lambda message: None)
    cache_file = None
    if isinstance(model, (str, Path)):
        source = resolve_pipeline(str(model), progress)
        cache_file = _cache_file(source.root, dtype) if cache else None
        if cache_file is not None and cache_file.is_file():
            try:
                cached = PipelineMeasurement.model_validate_json(cache_file.read_text())
                seconds = round(time.perf_counter() - start, 3)
                return cached.model_copy(update={"model": source.model, "seconds": seconds, "from_cache": True})
            except ValueError:
                pass  # written by another pipefit version: measure again
        name, pipeline_class = source.model, source.pipeline_class
        entries = [(c.name, c.library, c.class_name, c) for c in source.components]
    else:
        name, pipeline_class, entries = _entries_of_pipeline_object(model)

    import torch

    target = getattr(torch, dtype)
    warnings: list[str] = []
    components: dict[str, ComponentMeasurement] = {}

    for comp_name, library, class_name, origin in entries:
        if class_name is None:
            continue  # an optional component the pipeline was saved without, e.g. [null, null]
        say(f"Measuring {comp_name} ({class_name})")
        cls = _component_class(comp_name, library, class_name)
        if cls is None or not issubclass(cls, torch.nn.Module):
            components[comp_name] = ComponentMeasurement(class_name=class_name, library=library or "unknown")
            continue
        if isinstance(origin, ComponentSource):
            meta = _build_on_meta(cls, library, origin)
            checkpoint = _read_checkpoint(origin.folder)
        else:  # a live module: rebuild its architecture on meta from its own config
            meta = _build_on_meta(cls, library, origin.config)
            checkpoint = None
            live = param_count(origin)
            if live != param_count(meta):
                warnings.append(f"{comp_name}: the loaded module has {live} parameters, its config builds "
                                f"{param_count(meta)} (LoRA, quantization or a modified model?).")
        _set_load_dtypes(meta, library, target)
        measured = _measure_module(meta, class_name, library, target)
        measured.checkpoint = checkpoint
        if checkpoint is not None and checkpoint.params != measured.params:
            warnings.append(
                f"{comp_name}: the checkpoint holds {checkpoint.params} parameters but its config builds "
                f"{measured.params}; sizes follow the config."
            )
        components[comp_name] = measured

    result = PipelineMeasurement(
        model=name,
        pipeline_class=pipeline_class,
        dtype=dtype,
        total_bytes=sum(c.bytes or 0 for c in components.values()),
        components=components,
        warnings=warnings,
        seconds=round(time.perf_counter() - start, 3),
    )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(result.model_dump_json())
    return result


def cache_dir() -> Path:
    """Where measurements are kept: $PIPEFIT_CACHE_DIR, else ~/.cache/pipefit."""
    return Path(os.environ.get("PIPEFIT_CACHE_DIR") or Path.home() / ".cache" / "pipefit")


def _cache_file(root: Path, dtype: str) -> Path:
    """A file named by everything the measurement depends on: configs, weight files, versions, pipefit's rules.

    Computing it needs no torch import, so a repeated measurement answers in milliseconds.
    """
    digest = hashlib.sha256(f"{_CACHE_SCHEMA}|{dtype}".encode())
    for package in ("torch", "diffusers", "transformers"):
        digest.update(f"|{package}={importlib.metadata.version(package)}".encode())
    here = Path(__file__).parent
    for source in _RULE_SOURCES:
        for path in sorted((here / source).rglob("*.py")) if (here / source).is_dir() else [here / source]:
            digest.update(path.read_bytes())
    for path in sorted(root.rglob("*")):
        if path.suffix == ".json":
            digest.update(f"|{path.relative_to(root)}|".encode() + path.read_bytes())
        elif path.suffix == ".safetensors":
            stat = path.stat()
            digest.update(f"|{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return cache_dir() / "measure" / f"{digest.hexdigest()[:32]}.json"


def _entries_of_pipeline_object(pipe: Any) -> tuple[str, str, list[tuple[str, str | None, str | None, Any]]]:
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise PipefitError(
            f"Cannot measure a {type(pipe).__name__}.",
            "Pass a DiffusionPipeline, a model folder, a hub id or builtin:NAME.",
        )
    entries = []
    for comp_name, module in components.items():
        if module is None:
            continue
        library = type(module).__module__.split(".")[0]
        entries.append((comp_name, library, type(module).__name__, module))
    name = str(getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__)
    return name, type(pipe).__name__, entries


def _component_class(comp_name: str, library: str | None, class_name: str) -> type | None:
    if library not in _MODEL_LIBRARIES:
        if library is None:
            return None
        raise PipefitError(
            f"Component {comp_name!r} is a {library}.{class_name}: pipefit measures diffusers and transformers "
            f"components only.",
            "Remove the custom component from model_index.json, or load the pipeline and pass it in memory.",
        )

    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        import diffusers
        import transformers

        installed = {"diffusers": diffusers.__version__, "transformers": transformers.__version__}[library]
        raise PipefitError(
            f"Unknown component class {library}.{class_name} for {comp_name!r} ({library} {installed} has none).",
            f"Upgrade it (pip install -U {library}) or fix the class name in model_index.json.",
        )
    return cls


def _build_on_meta(cls: type, library: str, origin: ComponentSource | Any) -> "torch.nn.Module":
    """Instantiate the architecture on the meta device: no memory, exact shapes."""
    import torch

    if isinstance(origin, ComponentSource) and not origin.folder.is_dir():
        raise PipefitError(
            f"The pipeline lists {origin.name!r} ({cls.__name__}) but {origin.folder} does not exist.",
            "Download the component's folder (its config.json is enough).",
        )
    try:
        if library == "diffusers":
            config = cls.load_config(origin.folder) if isinstance(origin, ComponentSource) else dict(origin)
            with torch.device("meta"):
                model = cls.from_config(config)
        else:
            config = (
                cls.config_class.from_pretrained(origin.folder) if isinstance(origin, ComponentSource) else origin
            )
            with torch.device("meta"):
                model = cls(config)
    except PipefitError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        where = origin.folder if isinstance(origin, ComponentSource) else cls.__name__
        raise PipefitError(f"Cannot build {cls.__name__} from the config in {where}: {exc}", "Check the config file.")
    return model.eval()


def _set_load_dtypes(model: "torch.nn.Module", library: str, dtype: "torch.dtype") -> None:
    """Give every floating tensor the dtype ``from_pretrained(dtype=...)`` would give it."""
    import torch

    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or []) if library == "diffusers" else set()
    if library == "transformers":
        if dtype == torch.float16:
            keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
        if dtype in (torch.float16, torch.bfloat16):
            keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point():
            wanted = torch.float32 if keep_fp32 & set(name.split(".")) else dtype
            if tensor.dtype != wanted:
                tensor.data = tensor.data.to(wanted)


def _measure_module(model: "torch.nn.Module", class_name: str, library: str, dtype: "torch.dtype") -> ComponentMeasurement:
    import torch

    blocks = [
        BlockList(attr=name, count=len(child), bytes_each=max(module_bytes(b) for b in child))
        for name, child in model.named_children()
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and len(child) > 0
    ]
    repeated = []
    for block_class in getattr(model, "_repeated_blocks", None) or []:
        found = [m for m in model.modules() if type(m).__name__ == block_class]
        if found:
            repeated.append(
                RepeatedBlock(class_name=block_class, count=len(found), bytes_each=max(map(module_bytes, found)))
            )
    measured = ComponentMeasurement(
        class_name=class_name,
        library=library,
        params=param_count(model),
        bytes=module_bytes(model),
        quantized_bytes={name: quantize.quantized_bytes(model, library, name) for name in quantize.BACKENDS},
        largest_quantized_layer_bytes={name: quantize.largest_converted_bytes(model, library, name) for name in quantize.BACKENDS},
        largest_leaf_bytes=group_offload.largest_leaf_bytes(model),
        leaf_pair_bytes=group_offload.leaf_pair_bytes(model),
        leaf_count=group_offload.leaf_count(model),
        pinned_bytes=pinned_bytes(model),
        leaf_offload_root_bytes=group_offload.leaf_level_root_bytes(model),
        blocks=blocks,
        repeated_blocks=repeated,
        block_offload_groups_bytes=group_offload.block_level_groups(model),
        block_offload_peak_bytes=group_offload.block_level_peaks(model),
        config=_architecture_numbers(model),
    )
    if library in layerwise_casting.SUPPORTED_LIBRARIES:
        # last: it changes the meta model's dtypes
        measured.layerwise_fp8_bytes = layerwise_casting.layerwise_cast_bytes(model, dtype)
    return measured


def _architecture_numbers(model: "torch.nn.Module") -> dict[str, Any]:
    """The plain numbers and flags of a model's config (diffusers) or its hidden size (transformers)."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if isinstance(config, dict):  # diffusers' FrozenDict
        return {
            k: v for k, v in config.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, list, tuple)) and not isinstance(v, dict)
        }  # fmt: skip
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    return {"hidden_size": hidden} if hidden else {}


def _read_checkpoint(folder: Path) -> Checkpoint | None:
    """Parameter count and stored bytes from safetensors headers; None for a configs-only folder."""
    by_variant: dict[str, list[Path]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        # "model.fp16-00001-of-00002.safetensors" -> variant "fp16"; no variant -> ""
        stem = re.sub(r"-\d+-of-\d+$", "", file.name.removesuffix(".safetensors"))
        by_variant.setdefault(stem.partition(".")[2], []).append(file)
    if not by_variant:
        return None
    files = by_variant.get("") or by_variant[min(by_variant)]
    from safetensors import safe_open

    params = stored = 0
    dtypes: set[str] = set()
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    info = handle.get_slice(key)
                    numel = 1
                    for dim in info.get_shape():
                        numel *= dim
                    dtype = info.get_dtype()
                    params += numel
                    stored += numel * _SAFETENSORS_DTYPE_BYTES.get(dtype, 0)
                    dtypes.add(dtype)
        except Exception as exc:  # a truncated download or a git-lfs pointer in place of the file
            raise PipefitError(f"Cannot read the safetensors header of {file}: {exc}", "Download the file again.")
    return Checkpoint(files=[f.name for f in files], params=params, stored_bytes=stored, dtypes=sorted(dtypes),
                      largest_file_bytes=max(f.stat().st_size for f in files))  # fmt: skip


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
