"""Step caching of the denoiser with diffusers' own hooks (``enable_cache``): faster, and the image changes.

- ``taylorseer`` (TaylorSeerCacheConfig): a fixed schedule. Full passes for the first ``warmup`` steps,
  then one every ``interval``; between them each hooked module's output is extrapolated from its last
  full outputs by a Taylor series. Which modules are hooked is diffusers' own pattern list: by default
  the attention modules of ``transformer_blocks`` / ``single_transformer_blocks`` / ``blocks`` whose
  names end in ``attn`` (so Wan's ``attn1``/``attn2`` match nothing and nothing is cached); in lite mode
  every block is skipped and only ``proj_out`` is extrapolated. The schedule is the hook's own
  arithmetic, so the speed-up is derived: the hooked modules' FLOPs (from the dry run) on the steps
  that are extrapolated. The Taylor factors stay on the device: (order + 1) copies of each hooked
  module's output, per guidance pass.
- ``first_block`` (FirstBlockCacheConfig): the first block runs every step; the rest are skipped while
  its output changes less than ``threshold``. How many steps that is depends on the image, so pipefit
  predicts no speed-up for it (at most: every step after the first but the first block).
- ``mag`` (MagCacheConfig): every block is skipped (the last full step's residual added instead) while
  the error accumulated from the checkpoint's magnitude ratios stays under ``threshold``. The ratios are
  measured per checkpoint, not per image, so the schedule is the hook's arithmetic on them; diffusers
  ships Flux.1's (FLUX_MAG_RATIOS) and raises without ratios, so pipefit offers it for Flux.1 only.

Each guidance pass (``cache_context("cond")`` / ``"uncond"``) keeps its own state; the state is reset
when the pipeline call ends (``maybe_free_model_hooks``), after the VAE decode.

What this reads from diffusers (patterns, ratios, registered blocks, which classes support caching)
is kept per diffusers version (tools/facts.py): recommend asks for every plan without importing it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

from ..facts import library_fact
from ..plan import Rule
from . import Code

if TYPE_CHECKING:
    from ..dryrun import ModuleCost, Trace
    from ..plan import CacheSpec, MagSpec, Plan, TaylorSeerSpec, Target
    from . import Site

CONFIG_CLASS = {"taylorseer": "TaylorSeerCacheConfig", "first_block": "FirstBlockCacheConfig", "mag": "MagCacheConfig"}
# the magnitude ratios diffusers ships (diffusers.hooks.mag_cache), by the denoiser class they were measured on
MAG_RATIOS = {"FluxTransformer2DModel": "FLUX_MAG_RATIOS"}


# ---- what the hooks do --------------------------------------------------------------------------


def computed_steps(spec: "CacheSpec", steps: int, denoiser_class: str | None = None) -> list[bool] | None:
    """Per denoising step, whether the denoiser runs in full: TaylorSeerCacheHook._measure_should_compute's
    arithmetic, or MagCacheHeadHook's on the ratios diffusers ships for ``denoiser_class``; None where it
    depends on the image (first_block) or no ratios are known."""
    if spec.method == "taylorseer":
        return [s < spec.warmup or (s - spec.warmup - 1) % spec.interval == 0 for s in range(steps)]
    if spec.method == "mag" and (ratios := _mag_ratios(denoiser_class, spec.steps)) is not None:
        return _mag_schedule(spec, ratios, steps)
    return None


def _mag_ratios(denoiser_class: str | None, steps: int) -> tuple[float, ...] | None:
    """The shipped ratios stretched to ``steps`` as MagCacheConfig does (nearest_interp)."""
    name = MAG_RATIOS.get(denoiser_class or "")
    return tuple(_shipped_mag_ratios(name, steps)) if name is not None else None


@library_fact
def _shipped_mag_ratios(name: str, steps: int) -> list[float]:
    from diffusers.hooks import mag_cache

    ratios = getattr(mag_cache, name)
    if len(ratios) != steps:
        ratios = mag_cache.nearest_interp(ratios, steps)
    return [float(r) for r in ratios]


def _mag_schedule(spec: "MagSpec", ratios: tuple[float, ...], steps: int) -> list[bool]:
    """MagCacheHeadHook.new_forward's decision, step by step (one state per guidance pass, alike)."""
    retention_step = int(spec.retention * spec.steps + 0.5)
    ratio, skipped, error, has_residual = 1.0, 0, 0.0, False
    out = []
    for step in range(steps):
        compute = True
        if step >= retention_step:
            ratio *= ratios[step] if step < len(ratios) else 1.0
            skipped += 1
            error += abs(1.0 - ratio)
            if has_residual and error <= spec.threshold and skipped <= spec.max_skip:
                compute = False
            else:
                ratio, skipped, error = 1.0, 0, 0.0
        has_residual = has_residual or compute  # the tail block keeps the residual of a full step
        out.append(compute)
    return out


def _patterns(spec: "TaylorSeerSpec") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(extrapolated, skipped) module name patterns, as apply_taylorseer_cache resolves them."""
    active, inactive = _taylorseer_patterns(spec.lite)
    return tuple(active), tuple(inactive)


@library_fact
def _taylorseer_patterns(lite: bool) -> tuple[list[str], list[str]]:
    from diffusers.hooks import taylorseer_cache as ts

    if lite:
        return list(ts._PROJ_OUT_IDENTIFIERS), list(ts._BLOCK_IDENTIFIERS)
    return list(ts._TRANSFORMER_BLOCK_IDENTIFIERS), []


def hooked(spec: "TaylorSeerSpec", costs: dict[str, "ModuleCost"]) -> tuple[list[str], list[str]]:
    """(extrapolated, skipped) modules of a denoiser whose submodules cost ``costs``: the outermost that
    match diffusers' patterns (a module inside a hooked one is not called on a cached step)."""
    return _hooked(*_patterns(spec), tuple(costs))


@lru_cache(maxsize=64)  # recommend asks for each plan of one pipeline
def _hooked(active: tuple[str, ...], inactive: tuple[str, ...], names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    chosen: dict[str, bool] = {}
    for name in names:
        if any(name.startswith(f"{outer}.") for outer in chosen):
            continue
        is_inactive = any(re.fullmatch(p, name) for p in inactive)
        if is_inactive or any(re.fullmatch(p, name) for p in active):
            chosen[name] = is_inactive
    return [n for n, skip in chosen.items() if not skip], [n for n, skip in chosen.items() if skip]


def _blocks(costs: dict[str, "ModuleCost"]) -> list[str]:
    """The blocks of the denoiser's block lists, as MagCache finds them (apply_mag_cache)."""
    lists = "|".join(map(re.escape, _block_list_names()))
    return [n for n in costs if re.fullmatch(rf"({lists})\.\d+", n)]


@library_fact
def _block_list_names() -> list[str]:
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return list(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)


def saved_per_cached_call(plan: "Plan", trace: "Trace", denoiser: str) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) one denoiser call does not run on a cached step."""
    costs = trace.module_costs.get(denoiser, {})
    if plan.cache is None or plan.cache.method == "first_block" or not costs:
        return 0.0, 0.0
    names = _blocks(costs) if plan.cache.method == "mag" else [n for group in hooked(plan.cache, costs) for n in group]
    return sum(costs[n].flops for n in names), sum(costs[n].attention_flops for n in names)


def held_bytes(plan: "Plan", trace: "Trace", denoiser: str) -> int:
    """Device bytes the cache keeps from the first denoiser call to the end of the pipeline call."""
    costs = trace.module_costs.get(denoiser, {})
    if plan.cache is None or not costs:
        return 0
    passes = max(1, round(trace.per_step(denoiser)))  # one state per guidance pass
    if plan.cache.method == "taylorseer":
        active, _ = hooked(plan.cache, costs)
        # the factors are stored in bfloat16 (taylor_factors_dtype's default): 2 bytes per element of each output
        per_element = 2 / _itemsize(trace.dtype)
        return int(passes * (plan.cache.order + 1) * per_element * sum(costs[n].output_bytes for n in active))
    # first_block: the first block's output and residual, and the rest's residuals (hidden and encoder states);
    # mag: the head block's input and the last full step's residual
    first = next((n for n in costs if re.fullmatch(r"[^.]*blocks\.0", n)), None)
    return passes * (2 if plan.cache.method == "mag" else 3) * (costs[first].output_bytes if first else 0)


def _itemsize(dtype: str) -> int:
    return 4 if dtype in ("float32", "float") else 8 if dtype == "float64" else 2


def cached_fraction(plan: "Plan", steps: int, denoiser_class: str | None = None) -> float:
    """The share of steps whose hooked modules do not run (0 where it depends on the image)."""
    schedule = computed_steps(plan.cache, steps, denoiser_class) if plan.cache else None
    return 0.0 if not schedule else schedule.count(False) / len(schedule)


def how_the_image_changes(plan: "Plan", trace: "Trace", denoiser: str, steps: int, denoiser_class: str | None = None) -> str:
    """What a user should expect of the output, in words."""
    spec = plan.cache
    if spec is None:
        return ""
    if spec.method == "mag":
        schedule = computed_steps(spec, steps, denoiser_class) or []
        return (f"The image changes: the denoiser runs in full on {schedule.count(True)} of {steps} steps; on the other "
                f"{schedule.count(False)} MagCache skips every block and adds the last full step's residual, as the "
                f"checkpoint's magnitude ratios allow (threshold {spec.threshold:g}). Compare with a fixed seed.")  # fmt: skip
    if spec.method == "first_block":
        return (f"The image changes: after the first block, the denoiser's other blocks are skipped on steps where the first "
                f"block's output moved less than {spec.threshold:g} (more skipped at a higher threshold, and with softer "
                f"detail); how many depends on the image, so no speed-up is predicted. Compare with a fixed seed.")  # fmt: skip
    schedule = computed_steps(spec, steps) or []
    active, inactive = hooked(spec, trace.module_costs.get(denoiser, {}))
    what = ("its output (every block skipped)" if spec.lite
            else f"the output of {len(active)} attention modules (the rest of each block still runs)")  # fmt: skip
    return (f"The image changes: the denoiser runs in full on {schedule.count(True)} of {steps} steps; on the other "
            f"{schedule.count(False)} TaylorSeer extrapolates {what} from the last full steps (order {spec.order}). "
            f"Expect small differences in fine detail against the uncached image; compare with a fixed seed.")  # fmt: skip


# ---- compatibility rules ------------------------------------------------------------------------


def _denoiser_class(target: "Target") -> str:
    return (target.component_classes or {}).get(target.denoiser or "transformer", "")


@library_fact
def _has_cache_mixin(class_name: str) -> bool | None:
    """Whether diffusers' class ``class_name`` is built on CacheMixin; None: diffusers has no such class."""
    import diffusers
    from diffusers.models.cache_utils import CacheMixin

    cls = getattr(diffusers, class_name, None) if class_name else None
    return issubclass(cls, CacheMixin) if isinstance(cls, type) else None


def _lacks_cache_mixin(plan: "Plan", target: "Target") -> str | None:
    if plan.cache is None or not target.component_classes:
        return None
    name = _denoiser_class(target)
    return name if _has_cache_mixin(name) is False else None


def _no_cache_context(plan: "Plan", target: "Target") -> str | None:
    if plan.cache is None or not target.pipeline_class:
        return None
    return target.pipeline_class if _enters_cache_context(target.pipeline_class) is False else None


@library_fact
def _enters_cache_context(pipeline_class: str) -> bool | None:
    """Whether the pipeline's ``__call__`` wraps its denoiser calls in ``cache_context``; None: unknown."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    try:
        return "cache_context(" in inspect.getsource(cls.__call__) if cls is not None else None
    except (OSError, TypeError):
        return None


def _unregistered_blocks(plan: "Plan", target: "Target") -> str | None:
    if plan.cache is None or plan.cache.method not in ("first_block", "mag") or not target.repeated_blocks:
        return None
    known = set(_registered_blocks())
    blocks = target.repeated_blocks.get(target.denoiser or "transformer") or []
    missing = [b for b in blocks if b not in known]
    return ", ".join(missing) or None


@library_fact
def _registered_blocks() -> list[str]:
    """The block classes diffusers' TransformerBlockRegistry knows (First Block Cache and MagCache need them)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()
    return sorted(cls.__name__ for cls in TransformerBlockRegistry._registry)


def _no_mag_ratios(plan: "Plan", target: "Target") -> str | None:
    if plan.cache is None or plan.cache.method != "mag" or not target.component_classes:
        return None
    name = (target.component_classes or {}).get(target.denoiser or "transformer", "")
    return name if name not in MAG_RATIOS else None


def _nothing_hooked(plan: "Plan", target: "Target") -> str | None:
    name = _denoiser_class(target) if plan.cache is not None and target.component_classes else ""
    if not name or _has_cache_mixin(name) is None or plan.cache.method != "taylorseer" or plan.cache.lite \
            or not target.module_names:  # fmt: skip
        return None
    active, inactive = hooked(plan.cache, dict.fromkeys(target.module_names, None))
    return name if not active and not inactive else None


RULES = (
    Rule(
        "cache.needs_cache_mixin",
        _lacks_cache_mixin,
        "{0} has no enable_cache: step caching needs a denoiser built on diffusers' CacheMixin.",
        "Leave cache unset for this pipeline.",
    ),
    Rule(
        "cache.needs_cache_context",
        _no_cache_context,
        "{0} does not enter the denoiser's cache_context, so the cache hooks fail "
        "(diffusers: 'No cache context is set').",
        "Leave cache unset for this pipeline.",
    ),
    Rule(
        "cache.needs_registered_blocks",
        _unregistered_blocks,
        "First Block Cache and MagCache do not know the blocks {0} (diffusers: 'Module class ... not registered').",
        "Use the taylorseer cache.",
    ),
    Rule(
        "cache.mag_needs_ratios",
        _no_mag_ratios,
        "MagCache needs the checkpoint's magnitude ratios, and diffusers ships them for Flux.1 only: {0} has none "
        "(diffusers: '`mag_ratios` must be provided').",
        "Use the taylorseer cache, or calibrate ratios with MagCacheConfig(calibrate=True) and set them yourself.",
    ),
    Rule(
        "cache.taylorseer_hooks_nothing",
        _nothing_hooked,
        "TaylorSeer's default patterns match no module of {0}: nothing would be cached.",
        'Use its lite mode ("lite": true), which skips whole blocks.',
    ),
)


def steps_mismatch(plan: "Plan", script_steps: int | None) -> str | None:
    """What to say when MagCache's ratios are stretched to other steps than the script runs (diffusers
    says nothing: past the ratios' end it simply stops skipping)."""
    spec = plan.cache
    if spec is None or spec.method != "mag" or script_steps is None or script_steps == spec.steps:
        return None
    return (f"MagCache's ratios are stretched to {spec.steps} steps and the script runs {script_steps}: "
            f"set cache.steps to {script_steps}.")


def apply(plan: "Plan", site: "Site") -> Code:
    """``pipe.<denoiser>.enable_cache(<config>)`` once the pipeline is placed."""
    spec = plan.cache
    if spec is None:
        return Code()
    cls = CONFIG_CLASS[spec.method]
    imports = [f"from diffusers import {cls}"]
    if spec.method == "taylorseer":
        args = f"cache_interval={spec.interval}, disable_cache_before_step={spec.warmup}, max_order={spec.order}"
        args += ", use_lite_mode=True" if spec.lite else ""
    elif spec.method == "mag":
        args = (f"threshold={spec.threshold}, max_skip_steps={spec.max_skip}, retention_ratio={spec.retention}, "
                f"num_inference_steps={spec.steps}, mag_ratios={MAG_RATIOS['FluxTransformer2DModel']}")  # fmt: skip
        imports.append(f"from diffusers.hooks.mag_cache import {MAG_RATIOS['FluxTransformer2DModel']}")
    else:
        args = f"threshold={spec.threshold}"
    return Code(
        (f"{site.pipe}.{site.denoiser}.enable_cache({cls}({args}))",),
        tuple(imports),
        f"{spec.method} step cache on {site.denoiser}",
    )
