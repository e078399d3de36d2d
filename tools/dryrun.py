"""Dry run: the pipeline's own ``__call__`` on the meta device, at the call's real shapes.

Every model component is built on the meta device from its config (no memory), the pipeline is
assembled from them with stand-in tokenizers, and called with the user's workload (its steps too:
a later step's call at the same shapes replays the first one's record instead of running again).
Whatever the pipeline does, it does: its encode_prompt (each encoder, and again for the negative
prompt where it runs CFG), its latent shapes (scale factors, packing, frames), its guidance (a batch
of two, or two passes, or none), its VAE decode. While it runs, two modes watch every operator:

- live bytes: each tensor the ops create is an allocation until its last reference dies, so the
  peak of live bytes inside a component's call is that stage's working memory (weights are built
  before and not counted). Attention is counted as the fused kernels' footprint (output and
  logsumexp), not the math path's S x S matrix;
- FLOPs: torch's own flop formulas (``torch.utils.flop_counter``) for matmuls and convolutions,
  and 4*B*H*Sq*Sk*D for attention.

An op run again at the same input layouts (each block of a transformer, each tile of a tiled
decode) gets new tensors of its first outputs' layouts instead of running its Python shape function
again, where its schema and its first run show that it makes only new tensors.

Data-dependent code (``mask.all()``, ``timesteps == t``, ``lengths.tolist()``) needs values, which
meta tensors lack: small tensors (ids, masks, timesteps, sigmas) are shadowed by real CPU copies
that every op also runs on, so ``.item()`` answers what the real run would.

The trace names each component call in order, which is what the offloading hooks react to
(model offload's chain, re-entry of an encoder called twice), and the VAE decode again with its
own tiled and sliced paths. It is cached per pipeline configs, workload and library versions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import time
import weakref
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .errors import PipefitError
from .model_source import PipelineSource, resolve_pipeline
from .sizes import module_bytes

_SCHEMA = 7
_MODULE_DEPTH = 3  # submodules recorded per looped component: blocks.N.attn deep (what step caches hook)
_SHADOW_NUMEL = 1 << 14  # tensors up to this size get a CPU twin (masks, ids, timesteps)
_STAND_IN_NUMEL = 1 << 24  # an op with a value-dependent shape runs on CPU stand-ins up to this size (text states)
# PyTorch's fused attention kernels on CUDA take head dims up to 256; larger ones (the 512-wide single
# head of the SD/Flux VAE's mid-block) run the math path, measured: Flux's 1024 px decode peaked 0.9 GiB
# above the fused footprint on the H200.
FUSED_MAX_HEAD_DIM = 256
_PROMPT = " ".join(["a detailed photo of a red fox in the snow at dawn"] * 6)  # ~60 tokens, a typical prompt
# what a user's prompt costs where a tokenizer pads to the longest, not to a fixed length


class ComponentCall(BaseModel):
    """One call of one component during the pipeline's run."""

    component: str
    method: str = Field(description="forward, decode or encode: the method the offloading hooks react to")
    step: int | None = Field(None, description="the denoising step it ran in; None outside the loop")
    held_bytes: int = Field(description="live tensors on the device when the call began (latents, embeddings)")
    peak_bytes: int = Field(description="live tensors at the call's peak, what it held on entry included")
    flops: float = Field(description="matmul and convolution FLOPs")
    conv_flops: float = Field(0.0, description="the convolutions' share of ``flops``")
    attention_flops: float
    convs: dict[str, list[tuple[int, int]]] = Field(
        default_factory=dict,
        description="by kind ('2d', '3d', '2d_float32' ...): (live bytes while a convolution runs, its input + output bytes) for "
        "the convolutions no other one exceeds in both: cuDNN's workspace beside them grows with the second",
    )
    inputs: dict[str, list[int]] = Field(default_factory=dict, description="shapes of the tensor arguments")
    largest_bytes: int = Field(0, description="the largest single tensor the call created")
    weight_bytes: int | None = Field(
        None, description="the component's weights when it ran: more than measured where the pipeline upcast it "
        "(SDXL's float16 VAE decodes in float32)",
    )
    events: tuple[int, int] | None = Field(
        None, description="the call's span [start, end) in the trace's allocation events (a replayed step: its outputs)"
    )


class ModuleCost(BaseModel):
    """One submodule of a component called in the denoising loop, on its first call: what a step cache
    saves by skipping it and holds by keeping its output."""

    flops: float
    attention_flops: float
    output_bytes: int


class Trace(BaseModel):
    """What one call of the pipeline does at a workload, component by component."""

    pipeline_class: str
    dtype: str
    call_kwargs: dict[str, Any] = Field(description="what the pipeline was called with")
    steps_run: int
    calls: list[ComponentCall]
    decode_tiled: ComponentCall | None = Field(None, description="the decode again with vae.enable_tiling()")
    decode_sliced: ComponentCall | None = Field(None, description="with tiling and slicing (batches)")
    module_costs: dict[str, dict[str, ModuleCost]] = Field(
        default_factory=dict,
        description="component -> its submodules up to blocks.N.attn deep, on the component's first call in the loop",
    )
    offload_sequence: list[str] = Field(default_factory=list, description="the pipeline's model_cpu_offload_seq")
    allocations: list[int] = Field(
        default_factory=list,
        description="every device allocation of the run in order, up to the first decode's end: n > 0 allocates n "
        "bytes (the next id, from 0), n < 0 frees id -n - 1 (tools/strategies/allocator.py replays them)",
    )
    workspaces: list[tuple[int, str, int]] = Field(
        default_factory=list,
        description="(position in ``allocations``, kind, input + output bytes) of each convolution: cuDNN's "
        "workspace is allocated there and freed at once, its size per byte the GPU's",
    )
    weight_tensors: dict[str, list[int]] = Field(
        default_factory=dict, description="component -> the bytes of each parameter and buffer, as loaded"
    )
    weight_uses: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(position in ``allocations``, bytes) of each weight a matmul read: where a quantized layer "
        "is dequantized to a full-precision copy for that matmul and freed after it",
    )
    exclude_from_offload: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    seconds: float = 0.0
    from_cache: bool = False

    def denoiser_calls(self, denoiser: str) -> list[ComponentCall]:
        return [c for c in self.calls if c.component == denoiser]

    def per_step(self, component: str) -> float:
        """How often ``component`` runs per denoising step (2 with CFG as a second pass)."""
        return sum(1 for c in self.calls if c.component == component and c.step is not None) / self.steps_run


class _StopAfterDecode(Exception):
    """Raised after the first VAE decode: the rest (postprocessing to numpy) needs real data."""


def trace_pipeline(
    model: str | PipelineSource,
    *,
    height: int,
    width: int,
    frames: int | None = None,
    batch: int = 1,
    steps: int = 28,
    guidance_scale: float | None = None,
    dtype: str = "bfloat16",
    cache: bool = True,
) -> Trace:
    """Run the pipeline's own ``__call__`` on the meta device at this workload and trace every component call.

    ``guidance_scale`` None keeps the pipeline's own default. Results are cached under
    ``cache_dir()/trace`` by configs, workload, versions and this module's source.
    """
    from .measure import cache_dir

    source = model if isinstance(model, PipelineSource) else resolve_pipeline(model)
    workload = {"height": height, "width": width, "frames": frames, "batch": batch, "steps": steps,
                "guidance_scale": guidance_scale}  # fmt: skip
    key = _cache_key(source.root, dtype, workload)
    path = cache_dir() / "trace" / f"{key}.json"
    if cache and path.is_file():
        try:
            return Trace.model_validate_json(path.read_text()).model_copy(update={"from_cache": True})
        except ValueError:
            pass
    started = time.perf_counter()
    trace = _run(source, dtype, workload)
    trace.seconds = round(time.perf_counter() - started, 3)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(trace.model_dump_json())
    return trace


def _cache_key(root: Path, dtype: str, workload: dict) -> str:
    digest = hashlib.sha256(f"{_SCHEMA}|{dtype}|{json.dumps(workload, sort_keys=True)}".encode())
    for package in ("torch", "diffusers", "transformers"):
        digest.update(f"|{package}={importlib.metadata.version(package)}".encode())
    digest.update(Path(__file__).read_bytes())
    for path in sorted(root.rglob("*.json")):
        digest.update(f"|{path.relative_to(root)}|".encode() + path.read_bytes())
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------- the pipeline on meta


def _run(source: PipelineSource, dtype: str, workload: dict) -> Trace:
    import diffusers
    import torch

    pipeline_cls = getattr(diffusers, source.pipeline_class, None)
    if workload["frames"] is not None and pipeline_cls is not None and not _takes_frames(pipeline_cls):
        raise PipefitError(
            f"`frames` is for video pipelines, and {source.pipeline_class} makes images (its call takes no num_frames).",
            "Leave `frames` out.",
        )  # before building anything: the answer takes milliseconds
    pipe = _meta_pipeline(source, dtype)
    warnings: list[str] = []
    kwargs = _call_kwargs(pipe, workload)
    recorder = _Recorder()
    pipe.progress_bar = recorder.loop.bar
    vae = getattr(pipe, "vae", None)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for method in ("decode", "encode") if module is vae else ("forward",):
                recorder.wrap(name, module, method, stop=(method == "decode"))
            if module is not vae:
                recorder.watch_submodules(name, module)
    try:
        with torch.no_grad(), _FusedAttention() as attention, _LiveBytes() as live:
            recorder.live, recorder.attention = live, attention
            pipe(**kwargs)
    except _StopAfterDecode:
        pass
    except Exception as exc:  # a pipeline doing something meta tensors cannot: keep what ran, say what did not
        ran = ", ".join(dict.fromkeys(c.component for c in recorder.calls)) or "nothing"
        warnings.append(f"The dry run stopped in {type(exc).__name__}: {str(exc)[:200]} (ran: {ran}).")
    finally:
        recorder.unwrap()
    end = max((c.events[1] for c in recorder.calls if c.events), default=0)  # what ran after is not the run's
    trace = Trace(
        pipeline_class=type(pipe).__name__, dtype=dtype, call_kwargs={k: v for k, v in kwargs.items() if k != "prompt"},
        steps_run=workload["steps"], calls=recorder.calls, warnings=warnings, module_costs=recorder.module_costs,
        offload_sequence=[n for n in (pipe.model_cpu_offload_seq or "").split("->") if n],
        exclude_from_offload=list(getattr(pipe, "_exclude_from_cpu_offload", []) or []),
        allocations=live.events[:end], workspaces=[w for w in live.workspaces if w[0] <= end],
        weight_uses=[w for w in live.weight_uses if w[0] <= end],
        weight_tensors={name: [t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers())]
                        for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)},
    )  # fmt: skip
    decode = next((c for c in recorder.calls if c.method == "decode"), None)
    if vae is not None and decode is not None and "latents" in decode.inputs:
        trace.decode_tiled = _decode_again(vae, decode.inputs["latents"], dtype, slicing=False)
        if workload["batch"] > 1:  # slicing splits the batch: nothing to split at one
            trace.decode_sliced = _decode_again(vae, decode.inputs["latents"], dtype, slicing=True)
    return trace


def _meta_pipeline(source: PipelineSource, dtype: str):
    """The pipeline of ``source`` with every model on the meta device and stand-in tokenizers."""
    import diffusers
    import torch

    from .measure import _build_on_meta, _component_class, _set_load_dtypes

    target = getattr(torch, dtype)
    components: dict[str, Any] = {}
    for comp in source.components:
        if comp.class_name is None:
            components[comp.name] = None
        elif comp.name.startswith("tokenizer") or "Tokenizer" in comp.class_name:
            components[comp.name] = _stand_in_tokenizer(source, comp.name)
        else:
            cls = _component_class(comp.name, comp.library, comp.class_name)
            if cls is not None and not issubclass(cls, torch.nn.Module) and hasattr(cls, "load_config"):
                # schedulers, guiders: plain configured objects, built as the pipeline would
                has_config = comp.folder.is_dir() and any(comp.folder.glob("*.json"))
                components[comp.name] = cls.from_config(cls.load_config(comp.folder)) if has_config else cls()
                continue
            if cls is None or not issubclass(cls, torch.nn.Module):
                components[comp.name] = None  # feature extractors and processors: image inputs are not traced
                continue
            model = _build_on_meta(cls, comp.library, comp)
            _set_load_dtypes(model, comp.library, target)
            components[comp.name] = model
    pipeline_cls = getattr(diffusers, source.pipeline_class, None)
    if pipeline_cls is None:
        raise PipefitError(
            f"diffusers {diffusers.__version__} has no pipeline class {source.pipeline_class}.",
            "Upgrade diffusers, or fix _class_name in model_index.json.",
        )
    accepted = inspect.signature(pipeline_cls.__init__).parameters
    # plain options saved in model_index.json (Wan 2.2's boundary_ratio, expand_timesteps, ...)
    index = json.loads((source.root / "model_index.json").read_text())
    options = {k: v for k, v in index.items() if k in accepted and not k.startswith("_") and not isinstance(v, list)}
    return pipeline_cls(**{k: v for k, v in components.items() if k in accepted}, **options)


def _stand_in_tokenizer(source: PipelineSource, name: str):
    """A word-level tokenizer that pads and truncates as the real one would (its model_max_length from
    the tokenizer's own config, else the paired encoder's position limit)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    length = None
    config = source.root / name / "tokenizer_config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("model_max_length")
    if not isinstance(length, int) or length > 1 << 20:
        encoder = source.root / name.replace("tokenizer", "text_encoder") / "config.json"
        numbers = json.loads(encoder.read_text()) if encoder.is_file() else {}
        numbers = numbers.get("text_config", numbers)
        # CLIP's 77 positions are its tokenizer's length; a decoder LM's context (Qwen's 128k) is not a
        # padding length: pipelines pass max_length themselves, and 512 bounds what they do not
        length = min(numbers.get("max_position_embeddings") or 512, 512)
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    stand_in = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=length, pad_token="<pad>", unk_token="<unk>",
        eos_token="</s>", bos_token="<s>",
    )  # fmt: skip
    stand_in.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return stand_in


def _takes_frames(pipeline_cls) -> bool:
    return "num_frames" in inspect.signature(pipeline_cls.__call__).parameters


def _call_kwargs(pipe, workload: dict) -> dict:
    """The call a user makes at this workload, in the pipeline's own parameter names."""
    params = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {"prompt": _PROMPT, "height": workload["height"], "width": workload["width"]}
    kwargs["num_inference_steps"] = workload["steps"]
    if workload["frames"] is not None and "num_frames" in params:
        kwargs["num_frames"] = workload["frames"]
    if workload["guidance_scale"] is not None and "guidance_scale" in params:
        kwargs["guidance_scale"] = workload["guidance_scale"]
    for name in ("num_images_per_prompt", "num_videos_per_prompt"):
        if name in params and workload["batch"] > 1:
            kwargs[name] = workload["batch"]
    if "output_type" in params:
        kwargs["output_type"] = "pt"
    return {k: v for k, v in kwargs.items() if k in params or k == "prompt"}


class _Loop:
    """Stands in for the pipeline's progress bar: it marks the denoising loop and counts its steps."""

    def __init__(self):
        self.step: int | None = None

    def bar(self, iterable=None, total=None):
        loop = self

        class Bar:
            def __enter__(self):
                loop.step = 0
                return self

            def __exit__(self, *exc):
                loop.step = None

            def update(self, n: int = 1):
                loop.step += n

            def __iter__(self):  # pipelines that iterate the bar itself
                loop.step = 0
                for item in iterable:
                    yield item
                    loop.step += 1
                loop.step = None

        return Bar()


class _Recorder:
    """Wraps each component's hooked method to record what the call held, peaked at and computed."""

    def __init__(self):
        self.calls: list[ComponentCall] = []
        self.live: _LiveBytes | None = None
        self.attention: _FusedAttention | None = None
        self.loop = _Loop()
        self.depth = 0
        self.originals: list[tuple[Any, str]] = []
        self.seen: dict[tuple, tuple[ComponentCall, Any]] = {}  # a call's first record and its output's shapes
        self.module_costs: dict[str, dict[str, ModuleCost]] = {}
        self.handles: list[Any] = []

    def watch_submodules(self, name: str, module) -> None:
        """Record each submodule's FLOPs and output bytes the first time its component runs in the loop."""
        recorder = self

        def before(submodule, args):
            if recorder.live is not None and recorder.loop.step is not None:
                submodule._pipefit_start = (recorder.live.flops, recorder.attention.flops)

        def after(submodule, args, out):
            start = submodule.__dict__.pop("_pipefit_start", None)
            costs = recorder.module_costs.setdefault(name, {})
            if start is None or submodule._pipefit_name in costs:
                return
            from torch.utils._pytree import tree_leaves

            size = sum(x.numel() * x.element_size() for x in tree_leaves(out) if hasattr(x, "element_size"))
            costs[submodule._pipefit_name] = ModuleCost(
                flops=recorder.live.flops - start[0], attention_flops=recorder.attention.flops - start[1], output_bytes=size
            )

        for sub_name, submodule in module.named_modules():
            if sub_name and sub_name.count(".") < _MODULE_DEPTH:
                submodule._pipefit_name = sub_name
                self.handles += [submodule.register_forward_pre_hook(before), submodule.register_forward_hook(after)]

    def wrap(self, name: str, module, method: str, stop: bool) -> None:
        original = getattr(module, method)
        recorder = self
        self.originals.append((module, method))

        def traced(*args, **kwargs):
            if recorder.live is None or recorder.depth:  # outside the run, or nested (encode inside decode)
                return original(*args, **kwargs)
            live, attention = recorder.live, recorder.attention
            held, flops, conv_flops, attn = live.current, live.flops, live.conv_flops, attention.flops
            outer_convs, live.convs = live.convs, {}
            shapes = _shapes(args, kwargs, original)
            key = (name, method, json.dumps(shapes, sort_keys=True))
            if recorder.loop.step is not None and key in recorder.seen:
                # the same call at the same shapes, a later step: its record again, without running it
                first, skeleton = recorder.seen[key]
                shift = held - first.held_bytes
                start = len(live.events)
                out = _rebuild(skeleton)
                recorder.calls.append(first.model_copy(update={
                    "step": recorder.loop.step, "held_bytes": held, "peak_bytes": first.peak_bytes + shift,
                    "convs": {k: [(l + shift, n) for l, n in v] for k, v in first.convs.items()},
                    "events": (start, len(live.events)),
                }))  # fmt: skip
                live.convs = outer_convs
                return out
            live.peak, outer_largest, live.largest = held, live.largest, 0
            start = len(live.events)
            recorder.depth += 1
            try:
                out = original(*args, **kwargs)
            finally:
                recorder.depth -= 1
            call = ComponentCall(
                component=name, method=method, step=recorder.loop.step, held_bytes=held, peak_bytes=live.peak,
                weight_bytes=module_bytes(module),
                flops=live.flops - flops, conv_flops=live.conv_flops - conv_flops, attention_flops=attention.flops - attn,
                convs=live.convs, inputs=shapes, largest_bytes=live.largest, events=(start, len(live.events)),
            )  # fmt: skip
            live.largest = max(outer_largest, live.largest)
            for kind, points in call.convs.items():
                for point in points:
                    _frontier(outer_convs.setdefault(kind, []), point)
            live.convs = outer_convs
            recorder.calls.append(call)
            if recorder.loop.step is not None:
                recorder.seen[key] = (call, _skeleton(out))
            if stop:
                raise _StopAfterDecode
            return out

        setattr(module, method, traced)

    def unwrap(self) -> None:
        for module, method in self.originals:
            module.__dict__.pop(method, None)
        self.originals.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _skeleton(out):
    """``out`` with its tensors replaced by (shape, dtype): what a replayed call must return, holding no memory."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(out)
    return spec, [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves]


def _rebuild(skeleton):
    import torch
    from torch.utils._pytree import tree_unflatten

    spec, leaves = skeleton
    fresh = [torch.empty(x[0], dtype=x[1], device="meta") if isinstance(x, tuple) and len(x) == 2
             and isinstance(x[1], torch.dtype) else x for x in leaves]  # fmt: skip
    return tree_unflatten(fresh, spec)


def _shapes(args, kwargs, fn) -> dict[str, list[int]]:
    import torch

    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    shapes = {}
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            shapes[names[index] if index < len(names) else f"arg{index}"] = list(value.shape)
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            shapes[key] = list(value.shape)
    if "z" in shapes and "latents" not in shapes:
        shapes["latents"] = shapes.pop("z")
    return shapes


def _decode_again(vae, shape: list[int], dtype: str, *, slicing: bool) -> ComponentCall | None:
    """The decode once more on the VAE's own tiled (and sliced) path; None where it has none.

    A video latent ``[B, C, T, H, W]`` decodes frame chunk by frame chunk, so the tiled path (many
    small tiles per frame, slow on meta) runs at 2 and 3 latent frames and is carried on linearly to T.
    """
    if not hasattr(vae, "enable_tiling"):
        return None
    if len(shape) == 5 and shape[2] > 3:
        one, two = (_decode_once(vae, [*shape[:2], t, *shape[3:]], dtype, slicing) for t in (2, 3))
        if one is None or two is None:
            return None
        more = shape[2] - 3
        grown = more * max(0, two.peak_bytes - one.peak_bytes)
        return two.model_copy(update={
            "peak_bytes": two.peak_bytes + grown,
            "convs": {kind: [(live + grown, size) for live, size in points] for kind, points in two.convs.items()},
            "flops": two.flops + more * (two.flops - one.flops),
            "conv_flops": two.conv_flops + more * (two.conv_flops - one.conv_flops),
            "attention_flops": two.attention_flops + more * (two.attention_flops - one.attention_flops),
            "inputs": {"latents": shape},
        })  # fmt: skip
    return _decode_once(vae, shape, dtype, slicing)


def _decode_once(vae, shape: list[int], dtype: str, slicing: bool) -> ComponentCall | None:
    import torch

    vae.enable_tiling()
    if slicing and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    recorder = _Recorder()
    recorder.wrap("vae", vae, "decode", stop=False)
    try:
        with torch.no_grad(), _FusedAttention() as attention, _LiveBytes() as live:
            recorder.live, recorder.attention = live, attention
            vae.decode(torch.empty(shape, device="meta", dtype=getattr(torch, dtype)))
    except Exception:
        return None
    finally:
        recorder.unwrap()
        vae.disable_tiling()
        if hasattr(vae, "disable_slicing"):
            vae.disable_slicing()
    return recorder.calls[-1] if recorder.calls else None


# ---------------------------------------------------------------- the two modes


class _FusedAttention:
    """``F.scaled_dot_product_attention`` as the fused kernels run it: the output, and a float32
    logsumexp for the moment of the call; FLOPs 4*B*H*Sq*Sk*D."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                import torch

                kwargs = kwargs or {}
                if func is not torch.nn.functional.scaled_dot_product_attention:
                    return func(*args, **kwargs)
                q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(("query", "key", "value")))
                out = q.new_empty((*q.shape[:-1], v.shape[-1]))
                if q.shape[-1] <= FUSED_MAX_HEAD_DIM:  # flash, cuDNN and memory-efficient kernels: O(S) memory
                    scratch = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # logsumexp
                else:  # PyTorch falls back to the math path: the scores and their softmax, S x S each
                    scratch = q.new_empty((2, *q.shape[:-1], k.shape[-2]))
                del scratch
                outer.flops += 4.0 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
                return out

        self.flops = 0.0
        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class _LiveBytes:
    """Counts device bytes alive: every tensor an op creates on the meta device, until its storage's
    last tensor is gone; with FLOPs by torch's formulas and CPU shadows of small tensors."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        self.current = 0
        self.peak = 0
        self.largest = 0  # the largest single tensor created (per call: reset by the recorder)
        self.flops = 0.0
        self.conv_flops = 0.0
        self.convs: dict[str, list[tuple[int, int]]] = {}  # (live, input + output bytes) by kind: a frontier
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self.events: list[int] = []  # Trace.allocations
        self.workspaces: list[tuple[int, str, int]] = []  # Trace.workspaces
        self.weight_uses: list[tuple[int, int]] = []  # Trace.weight_uses
        self._ids: dict[int, int] = {}  # storage -> its allocation's id
        self._allocated = 0
        self._shadows: weakref.WeakKeyDictionary | None = None
        self._outputs: dict[tuple, tuple] = {}  # an op's key (_op_key) -> its outputs' layouts
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return outer._dispatch(func, args, kwargs or {}, flop_registry)

        self._mode = Mode()

    def __enter__(self):
        from torch.utils.weak import WeakTensorKeyDictionary

        self._shadows = WeakTensorKeyDictionary()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    # -- one operator
    def _dispatch(self, func, args, kwargs, flop_registry):
        import torch
        from torch.utils._pytree import tree_map

        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                shadow = self._shadows.get(first)
                if shadow is None:
                    raise PipefitError(f"the pipeline reads a value of a {list(first.shape)} tensor")
                return shadow.item()
            if func is torch.ops.aten._to_copy.default and kwargs.get("device") not in (None, torch.device("meta")):
                # back to the host (schedulers keep sigmas there, postprocessing): the twin, or zeros
                shadow = self._shadows.get(first)
                host = shadow if shadow is not None else torch.zeros(first.shape, dtype=first.dtype)
                return host.to(dtype=kwargs.get("dtype") or first.dtype)
        key = _op_key(func, args, kwargs)
        known = self._outputs.get(key) if key is not None else False
        if known:  # this op ran at these shapes before: new tensors of its outputs' layouts
            out = _fresh(known)
        else:
            try:
                out = func(*args, **kwargs)
            except (NotImplementedError, RuntimeError):
                # an output shape that depends on values (nonzero, masked_select): from the CPU twins
                out = self._from_shadows(func, args, kwargs)
                if out is None:
                    raise
            else:
                if known is None:
                    self._outputs[key] = _layout(out, args, kwargs)
        packet = func._overloadpacket
        conv = packet is torch.ops.aten.convolution and isinstance(out, torch.Tensor)
        if packet in flop_registry:
            counted = flop_registry[packet](*args, **kwargs, out_val=out)
            self.flops += counted
            self.conv_flops += counted if conv else 0
        flat_in = _tensors((args, kwargs))
        inputs = {t.untyped_storage()._cdata for t in flat_in if t.is_meta}
        if packet in _matmul_packets():  # a weight the run did not create: a parameter (quantized ones dequantize here)
            for t in flat_in:
                if t.is_meta and t.untyped_storage()._cdata not in self._sizes:
                    self.weight_uses.append((len(self.events), t.untyped_storage().nbytes()))
        flat_out = _tensors(out)
        for t in flat_out:
            if t.is_meta:
                self._track(t, inputs)
        if conv:  # its output counted: what is live while it runs
            size = args[0].numel() * args[0].element_size() + out.numel() * out.element_size()
            # cuDNN picks other algorithms (and workspaces) for float32 than for half precision
            kind = f"{args[1].dim() - 2}d" + ("_float32" if args[0].dtype == torch.float32 else "")
            _frontier(self.convs.setdefault(kind, []), (self.current, size))
            self.workspaces.append((len(self.events), kind, size))
        self._shadow(func, args, kwargs, flat_in, flat_out, out, tree_map)
        return out

    def _from_shadows(self, func, args, kwargs):
        """Run ``func`` on the inputs' CPU twins and answer meta tensors of the result's shapes."""
        import torch
        from torch.utils._pytree import tree_flatten, tree_map

        metas = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_meta]
        if any(t not in self._shadows and t.numel() > _STAND_IN_NUMEL for t in metas):
            return None

        def to_cpu(x):
            if isinstance(x, torch.Tensor) and x.is_meta:
                # no twin: zeros stand in (an indexed tensor's values do not change the result's shape)
                return self._shadows.get(x) if x in self._shadows else torch.zeros(x.shape, dtype=x.dtype)
            return x

        with torch.utils._python_dispatch._disable_current_modes():
            result = func(*tree_map(to_cpu, args), **tree_map(to_cpu, kwargs))
            meta = tree_map(lambda r: torch.empty_like(r, device="meta") if isinstance(r, torch.Tensor) else r, result)
        for m, r in zip(tree_flatten(meta)[0], tree_flatten(result)[0]):
            if isinstance(m, torch.Tensor):
                self._shadows[m] = r
        return meta

    def _track(self, tensor, inputs: set[int]) -> None:
        key = tensor.untyped_storage()._cdata
        if key in self._sizes:
            self._refs[key] += 1
        elif key in inputs:
            return  # a view or in-place result of a tensor not created here (a weight, an input)
        else:
            size = tensor.untyped_storage().nbytes()
            self._sizes[key], self._refs[key] = size, 1
            if size:  # an empty tensor allocates nothing
                self._ids[key] = self._allocated
                self._allocated += 1
                self.events.append(size)
            self.current += size
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, size)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            self.current -= self._sizes.pop(key)
            del self._refs[key]
            if key in self._ids:
                self.events.append(-self._ids.pop(key) - 1)

    def _shadow(self, func, args, kwargs, flat_in, flat_out, out, tree_map) -> None:
        """Run the op on CPU twins when every meta input is small and has one."""
        import torch

        metas = [t for t in flat_in if t.is_meta]
        outs = [t for t in flat_out if t.is_meta]
        # factories and ops on twins keep twins up to the stand-in size: a large all-zero image embedding
        # is still read as "all zero" (HunyuanVideo 1.5's text-to-video switch)
        limit = _STAND_IN_NUMEL if metas or _is_factory(func) else _SHADOW_NUMEL
        if not outs or any(t.numel() > limit for t in outs):
            return
        if any(t not in self._shadows for t in metas):
            return
        if not metas and not _is_factory(func):
            return

        def to_cpu(x):
            if isinstance(x, torch.Tensor) and x.is_meta:
                return self._shadows[x]
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return x

        cpu_kwargs = {k: to_cpu(v) for k, v in kwargs.items()}
        if "device" in cpu_kwargs and cpu_kwargs["device"] is not None:
            cpu_kwargs["device"] = torch.device("cpu")
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                result = func(*tree_map(to_cpu, args), **cpu_kwargs)
        except Exception:
            return
        results = [r for r in torch.utils._pytree.tree_flatten(result)[0] if isinstance(r, torch.Tensor)]
        for meta, shadow in zip(outs, results):
            if shadow.shape == meta.shape:
                self._shadows[meta] = shadow


# ---------------------------------------------------------------- repeated ops
#
# A pipeline runs the same ops at the same shapes many times (each block of a transformer, each tile of a
# tiled decode), and on the meta device most of an op's time is its Python shape function. An op whose
# outputs are always new tensors (its schema declares no view and no in-place write, and its first run made
# only tensors of their own) has outputs whose shapes, strides and dtypes follow from its arguments' alone,
# so the next time it runs at the same ones they are made directly.

_SCALARS = (bool, int, float, str, type(None))


@functools.cache
def _new_outputs_only(func) -> bool:
    """Whether ``func`` writes none of its inputs and returns only new tensors (not views of its inputs)."""
    schema = func._schema
    return (not schema.is_mutable and bool(schema.returns)
            and all(a.alias_info is None for a in schema.arguments)
            and all(r.alias_info is None and str(r.type) == "Tensor" for r in schema.returns))  # fmt: skip


def _op_key(func, args, kwargs) -> tuple | None:
    """What ``func``'s outputs' layouts depend on: its inputs' shapes, strides and dtypes and its other
    arguments (with their types: ``x * 2`` and ``x * 2.0`` differ); None where an output may alias an input
    or an argument is not a meta tensor or a plain value."""
    import torch

    if not _new_outputs_only(func):
        return None
    parts: list = [func]

    def add(x) -> bool:
        if isinstance(x, torch.Tensor):
            if not x.is_meta:
                return False
            parts.append((x.shape, x.stride(), x.storage_offset(), x.dtype))
        elif isinstance(x, (list, tuple)):
            parts.append(len(x))
            return all(add(y) for y in x)
        elif isinstance(x, (*_SCALARS, torch.dtype, torch.device, torch.layout, torch.memory_format)):
            parts.append((type(x), x))
        else:
            return False
        return True

    if not all(add(x) for x in args):
        return None
    for name in sorted(kwargs):
        parts.append(name)
        if not add(kwargs[name]):
            return None
    return tuple(parts)


def _tensors(x) -> list:
    """The tensors in an operator's arguments or outputs (tensors, and tuples, lists and dicts of them):
    torch's pytree flattening, without its generality (it is most of an op's bookkeeping time)."""
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


def _layout(out, args, kwargs) -> tuple | bool:
    """``out``'s tensors as (shape, stride, dtype), after whether there are several; False where one is
    not a new meta tensor that owns exactly its own extent (what ``empty_strided`` would make). Some ops
    alias an input without saying so in their schema (``_unsafe_view``)."""
    import torch

    outs = out if isinstance(out, tuple) else (out,)
    inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
    for t in outs:
        if not (isinstance(t, torch.Tensor) and t.is_meta and t.storage_offset() == 0):
            return False
        if t.untyped_storage()._cdata in inputs:
            return False
        extent = 0 if not t.numel() else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if t.untyped_storage().nbytes() != extent * t.element_size():
            return False
    return (isinstance(out, tuple), *((t.shape, t.stride(), t.dtype) for t in outs))


def _fresh(layout: tuple):
    import torch

    several, *outs = layout
    made = tuple(torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in outs)
    return made if several else made[0]


@functools.cache
def _matmul_packets() -> frozenset:
    """The matmul operators whose weight operand a quantized layer dequantizes (built once torch is imported)."""
    import torch

    return frozenset({torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm})


def _frontier(points: list, point: tuple[int, int], keep: int = 16) -> None:
    """Add ``point`` (live, size) to ``points`` unless one is at least as large in both; drop those it exceeds."""
    live, size = point
    if any(other_live >= live and other_size >= size for other_live, other_size in points):
        return
    points[:] = [(l, n) for l, n in points if not (live >= l and size >= n)] + [(live, size)]
    if len(points) > keep:  # the largest matter
        points.sort(key=lambda p: -(p[0] + p[1]))
        del points[keep:]


def _is_factory(func) -> bool:
    """Ops that make a tensor from no tensor (or copy one from the host): their small outputs get twins."""
    name = func._overloadpacket.__name__
    return name in {"empty", "zeros", "ones", "full", "arange", "linspace", "randn", "rand", "scalar_tensor",
                    "empty_strided", "_to_copy", "lift_fresh", "zeros_like", "ones_like", "full_like"}  # fmt: skip
