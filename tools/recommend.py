"""recommend: every strategy for a pipeline, workload and machine, predicted, checked and ranked.

Candidates are built from the pipeline's own components (the denoiser, the text encoders over
1 GiB): full precision placed on the GPU, with model / sequential / group offloading (block level
with as many blocks per group as fit, leaf level, with and without CUDA streams, with the small
components kept resident, and to disk for hosts short of RAM), fp8 layerwise casting alone and with
offloading, then bnb nf4 / int8 and torchao int8 / fp8 weight-only alone and with model offload
(torchao int8 with group offloading too), each in every loading path its backend allows (on the
GPU, in host RAM, or one component at a time); VAE tiling where the decode is the peak, regional
compile; then, on the fastest plans that fit, speed variants: diffusers' step caches (TaylorSeer,
First Block Cache, MagCache: group "cached", the image changes) and the fastest attention backend measured on
the GPU. Each is checked against the compatibility rules (tools/strategies) and predicted by
tools/estimate.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, ValidationError, computed_field

from .errors import PipefitError, invalid_input
from .estimate import Estimate, Workload, denoiser_of, estimate, load_coefficients, signature, trace_for
from .gpus import GpuProfile, gpu_profile
from .measure import PipelineMeasurement, measure_components
from .model_card import card_call
from .model_source import resolve_pipeline
from .plan import FirstBlockSpec, MagSpec, Plan, TaylorSeerSpec, Target, check_plan, parse_plan
from .strategies import Weights, attention, cache, group_offload, loading
from .units import format_bytes, parse_size

if TYPE_CHECKING:
    from .dryrun import Trace

Preference = Literal["speed", "memory", "quality", "balanced"]
DEFAULT_STEPS = 28  # where neither the user nor the model card says
CODE_FOR = 5  # options that carry their code; every option's plan goes to patch_script as it is
SPEED_BASES = 6  # the fastest fitting plans that get the speed variants (step caches, attention backends)
BIG_ENCODER_BYTES = 2**30  # text encoders above this are worth quantizing
# How far each precision is from the checkpoint's, for the quality and balanced orders.
PREFERENCES = ("speed", "memory", "quality", "balanced")
QUALITY_COST = {None: 0, "fp8_cast": 1, "torchao_fp8wo": 1, "torchao_int8wo": 1, "torchao_fp8dq": 2, "bnb_int8": 2, "bnb_nf4": 3}


class Machine(BaseModel):
    """What the plans must fit in: given by the user, or detected."""

    gpu: str | None
    vram_bytes: int
    ram_bytes: int
    ram_is_container_limit: bool = False
    compute_capability: str | None = None
    pageable_bytes_per_s: float | None = None
    pinned_bytes_per_s: float | None = None
    source: Literal["given", "detected"]


class Predicted(BaseModel):
    vram_bytes: int
    ram_load_bytes: int = Field(description="RSS while loading, up to the first call")
    ram_load_mapped_bytes: int = Field(
        0, description="of ram_load_bytes, weight files mapped while read once (disk offload writing its group "
        "files, pinning for streams): file pages the kernel drops under pressure, so the machine need not hold them"
    )
    ram_run_bytes: int = Field(description="RSS while running")
    seconds: float = Field(description="one call at the workload, after the first")
    first_call_seconds: float = Field(description="the first call, compiling included")

    ram_load_held_bytes = Estimate.ram_load_held_bytes  # one definition: the same fields as the estimate's

    @computed_field(description="the RAM the machine must have: what is compared with its RAM")
    @property
    def ram_bytes(self) -> int:
        return max(self.ram_load_held_bytes, self.ram_run_bytes)


class Option(BaseModel):
    id: str
    group: Literal["full_precision", "quantized", "cached"] = Field(
        description="cached: a step cache makes it faster and changes the image (show these apart)"
    )
    plan: dict
    fits: bool
    predicted: Predicted
    peak_stage: str
    basis: Literal["measured", "derived"] = Field(
        description="measured: this family and kind of plan ran on a GPU; derived: from the pipeline's code and sizes"
    )
    reasons: list[str]
    code: str = Field(description="the pipeline loaded with the plan applied; for the five best fitting options")


class Recommendation(BaseModel):
    model: str
    pipeline_class: str
    hardware: Machine
    workload: Workload
    prefer: Preference
    margin_bytes: int = Field(description="kept free on the GPU: the largest under-prediction seen on a GPU")
    options: list[Option] = Field(description="every plan evaluated: fitting ones first, best first")
    gpu_profile: str = Field(description="whose context, allocator and compute figures the predictions use")
    guidance: str = Field(description="how the pipeline runs guidance at this workload, as its dry run showed")
    from_card: dict[str, int | float] = Field(
        default_factory=dict,
        description="workload fields not given and taken from the model card's example (README.md): how the "
        "model is meant to be called where the pipeline class's defaults differ (distilled models: no CFG, few steps)",
    )
    shortfall: str | None = Field(None, description="when nothing fits: what the machine lacks for the closest plans")
    warnings: list[str] = Field(default_factory=list)


def recommend(
    model: str | PipelineMeasurement,
    *,
    height: int = 1024,
    width: int = 1024,
    frames: int | None = None,
    steps: int | None = None,
    batch: int = 1,
    guidance_scale: float | None = None,
    vram: str | int | None = None,
    ram: str | int | None = None,
    prefer: Preference = "balanced",
    plan: str | dict | Plan | None = None,
    dtype: str = "bfloat16",
    gpu: str | None = None,
    calls: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Recommendation:
    """Every strategy for ``model`` at this workload (``height`` x ``width``, video ``frames``, ``steps``,
    ``batch`` per call, ``guidance_scale``) on this machine (or ``vram``/``ram`` given, e.g. "16GiB").
    ``steps`` and ``guidance_scale`` left None are the model card's example's where it shows them
    (``from_card`` says which), else 28 steps and the pipeline's own guidance.
    Returns, for each plan:
    predicted peak VRAM (what the driver sees), RAM while loading and while running, and seconds per
    call; whether each fits and why not; ranked by ``prefer``: speed, memory, quality (least precision
    lost), or balanced (time, +10% per precision step lost). Time is per call over ``calls`` calls in one
    process, the first one's compiling included: compile pays off only over several calls. Step-cached
    plans (group ``cached``: faster, the image changes) rank first only for ``prefer`` speed.

    Options come fitting first, best first; ``group`` separates full-precision offloading/casting
    plans from quantization plans, as they should be presented. ``plan`` evaluates one given plan
    (JSON text, a file, a dict) instead of searching. Each option carries its plan (the JSON
    patch_script and run_trial take) and the code that applies it. Predictions are derived from the
    pipeline's own code: a dry run of its ``__call__`` on the meta device at the workload (each
    encoder pass, each denoiser forward with the pipeline's own guidance, the VAE decode), the
    placement's residency per call, and the GPU's measured context, allocator and rates; ``basis``
    says whether this family and kind of plan also ran on a GPU. ``gpu`` plans for a card that is
    not here ("RTX 4090"; its memory is the VRAM unless ``vram`` is given). ``margin_bytes`` is kept
    free on the GPU. Next: patch_script with the chosen plan, then run_trial to prove it.
    """
    if prefer not in PREFERENCES:
        raise PipefitError(f"Unknown `prefer` {prefer!r}.", f"Use one of: {', '.join(PREFERENCES)}.")
    if not isinstance(calls, int) or not 1 <= calls <= 100_000:
        raise PipefitError(f"`calls` must be a whole number from 1 to 100000, not {calls!r}.", "Pass how many calls one process makes.")
    try:
        workload = Workload(height=height, width=width, frames=frames, batch=batch, guidance_scale=guidance_scale,
                            steps=DEFAULT_STEPS if steps is None else steps)  # fmt: skip
    except ValidationError as exc:
        raise invalid_input(exc) from None
    say = progress or (lambda message: None)
    machine = _machine(vram, ram, gpu)  # first: a mistyped size is an answer in milliseconds
    measured = model if isinstance(model, PipelineMeasurement) else measure_components(model, dtype, progress=say)
    given_workload = {"steps": steps, "guidance_scale": guidance_scale}
    from_card = {name: value for name, value in _card(measured.model).items() if given_workload.get(name) is None}
    try:  # validated as the user's own values are; a card's odd value is passed over, not obeyed
        workload = Workload.model_validate({**workload.model_dump(), **from_card})
    except ValidationError:
        from_card = {}
    profile = gpu_profile(machine.gpu)
    k = load_coefficients()
    target = _target(measured, machine)
    given = parse_plan(plan) if plan is not None else None
    # every plan of one answer runs with one allocator: the given plan's, else the plans' default where PyTorch
    # has expandable segments (not on Windows)
    allocator = given.allocator if given is not None else "default" if sys.platform == "win32" else "expandable_segments"
    margin = int(k.margin_for(allocator) * machine.vram_bytes)
    if given is not None and (errors := [f.message for f in check_plan(given, target) if f.severity == "error"]):
        raise PipefitError(f"The plan cannot run on {measured.pipeline_class}: " + " ".join(errors), "Nothing was evaluated.")
    say(f"Dry-running {measured.pipeline_class} at {workload.height}x{workload.width} on the meta device")
    trace = trace_for(measured, workload)
    context = _Context(measured, workload, machine, profile, trace, margin, calls)
    target = target.model_copy(update={"module_names": list(trace.module_costs.get(denoiser_of(measured), {}))})
    plans = [given] if given is not None else candidates(context)
    if given is None:
        plans += speed_variants(plans, context, target)
    if plan is None and sys.platform == "win32":  # PyTorch has no expandable segments there
        plans = [p.model_copy(update={"allocator": "default"}) for p in plans]
    say(f"Evaluating {len(plans)} plans")
    options = [_option(p, context, target) for p in plans]
    options.sort(key=lambda o: (not o.fits, _score(o, prefer, calls) if o.fits else _excess(o, machine)))
    for o in [o for o in options if o.fits][:CODE_FOR] if plan is None else options:
        o.code = plan_code(Plan.model_validate(o.plan), measured)  # rewriting a script costs ~20 ms: the best only
    return Recommendation(
        model=measured.model, pipeline_class=measured.pipeline_class, hardware=machine, workload=workload,
        prefer=prefer, margin_bytes=margin, options=options, gpu_profile=_describe(profile),
        guidance=_guidance(trace, denoiser_of(measured), from_card), from_card=from_card,
        shortfall=_shortfall(options, machine, margin, target),
        warnings=trace.warnings,
    )  # fmt: skip


def _shortfall(options: list["Option"], machine: Machine, margin: int, target: Target) -> str | None:
    """What is missing when no plan fits: the RAM the lightest plan within the VRAM needs, or the VRAM
    the lightest plan needs (and its RAM)."""
    if not options or any(o.fits for o in options):
        return None
    allowed = [o for o in options
               if not any(f.severity == "error" for f in check_plan(Plan.model_validate(o.plan), target))]  # fmt: skip
    if not allowed:
        return None

    def ram(o: "Option") -> int:
        return o.predicted.ram_bytes

    have = f"{format_bytes(machine.vram_bytes)} of VRAM and {format_bytes(machine.ram_bytes)} of RAM"
    within = [o for o in allowed if o.predicted.vram_bytes + margin <= machine.vram_bytes]
    if within:
        o = min(within, key=ram)
        return (f"Nothing fits {have}: RAM is short. The plan needing the least RAM within the VRAM, {o.id}, needs "
                f"{format_bytes(ram(o))} of RAM ({format_bytes(ram(o) - machine.ram_bytes)} more).")  # fmt: skip
    o = min(allowed, key=lambda o: (o.predicted.vram_bytes, ram(o)))
    return (f"Nothing fits {have}: VRAM is short. The plan needing the least, {o.id}, needs "
            f"{format_bytes(o.predicted.vram_bytes + margin)} of VRAM with the margin and {format_bytes(ram(o))} of RAM.")  # fmt: skip


@dataclass(frozen=True)
class _Context:
    """What every plan of one recommendation is predicted against."""

    m: PipelineMeasurement
    w: Workload
    machine: Machine
    profile: GpuProfile
    trace: "Trace"
    margin: int
    calls: int = 1
    _estimates: dict[str, Estimate] = field(default_factory=dict, compare=False, repr=False)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # estimate's per-trace work

    def estimate(self, plan: Plan) -> Estimate:
        """The plan's prediction, once per plan (the candidates and their options ask again)."""
        key = plan.model_dump_json()
        if key not in self._estimates:
            self._estimates[key] = estimate(
                plan, self.m, self.w, trace=self.trace, gpu=self.profile,
                pageable_bytes_per_s=self.machine.pageable_bytes_per_s, pinned_bytes_per_s=self.machine.pinned_bytes_per_s,
                memo=self._memo,
            )  # fmt: skip
        return self._estimates[key]

    def fits(self, plan: Plan) -> bool:
        """Whether the plan's prediction fits the machine (the rules are not checked)."""
        e = self.estimate(plan)
        return e.vram_bytes + self.margin <= self.machine.vram_bytes and e.ram_bytes <= self.machine.ram_bytes

    def per_call(self, e: Estimate) -> float:
        """Seconds per call over ``calls`` calls, the first one's compiling included."""
        return per_call_seconds(e.first_call_seconds, e.seconds, self.calls)


def per_call_seconds(first_call: float, later: float, calls: int) -> float:
    """Seconds per call over ``calls`` calls in one process: the first (compiling) and the ones after."""
    return (first_call + (calls - 1) * later) / calls


def _describe(profile: GpuProfile) -> str:
    if profile.source == "measured":
        return f"{profile.name}: context, allocator and compute rates measured there (bench/fit_gpu.py)"
    return (f"{profile.name}: compute from vendor figures scaled by the efficiency measured on {profile.measured_on}; "
            f"context and allocator as measured there")  # fmt: skip


def _card(model: str) -> dict[str, int | float]:
    """The model card's example call (tools/model_card.py) for a model pipefit can find the folder of."""
    try:
        root = resolve_pipeline(model).root
    except PipefitError:  # an in-memory pipeline, or a folder gone since it was measured: no card to read
        return {}
    return card_call(root)


def _guidance(trace: "Trace", denoiser: str, from_card: dict[str, int | float]) -> str:
    calls = trace.denoiser_calls(denoiser)
    if not calls:
        return "unknown: the dry run did not reach the denoiser"
    per_step = trace.per_step(denoiser)
    batch = next(iter(calls[0].inputs.values()), [1])[0]
    scale = trace.call_kwargs.get("guidance_scale", "the pipeline's default")
    if "guidance_scale" in from_card and "guidance_scale" in trace.call_kwargs:
        scale = f"{scale:g}, as the model card's example calls it"
    if per_step >= 2:
        return f"classifier-free guidance as a second pass ({per_step:g} denoiser calls per step; guidance_scale {scale})"
    if batch >= 2:
        return f"classifier-free guidance in one batch of {batch} (guidance_scale {scale})"
    return f"no classifier-free guidance: one denoiser call per step (guidance_scale {scale})"


def candidates(context: _Context) -> list[Plan]:
    """The plans worth predicting for this pipeline (before the rules and the fit are checked)."""
    m, w = context.m, context.w
    comps = {n: c for n, c in m.components.items() if c.bytes}
    denoiser = denoiser_of(m)
    big_encoders = [n for n, c in comps.items() if n.startswith("text_encoder") and c.bytes > BIG_ENCODER_BYTES]
    small = sorted(n for n, c in comps.items() if n != denoiser and c.bytes <= BIG_ENCODER_BYTES)
    stream_exclude = ["vae"] if "vae" in comps else []

    placements: list[dict] = [{}, {"offload": "model"}, {"offload": "sequential"}]
    for exclude in ([], small):
        placements.append({"offload": "group_block", "group": {"num_blocks_per_group": 1, "exclude": exclude}})
        placements.append({"offload": "group_leaf", "group": {"exclude": exclude}})
    # with streams, the small components offloaded too (least VRAM) or kept resident (fewer transfers)
    for exclude in dict.fromkeys((tuple(stream_exclude), tuple(sorted({*stream_exclude, *small})))):
        for low_cpu in (False, True):
            stream = {"use_stream": True, "low_cpu_mem_usage": low_cpu, "exclude": list(exclude)}
            placements.append({"offload": "group_block", "group": {"num_blocks_per_group": 1, **stream}})
            placements.append({"offload": "group_leaf", "group": stream})
    # only the big text encoders offloaded (they run once per call): the denoiser stays on the GPU
    encoders_only = {"offload": "group_leaf", "group": {"use_stream": True, "exclude": sorted({denoiser, *small, *stream_exclude})}}
    if big_encoders:
        placements.append(encoders_only)
    # when host RAM is short: the groups on disk, read back as they run
    disk = {"offload_to_disk": True, "exclude": sorted({*stream_exclude, *small})}
    placements.append({"offload": "group_block", "group": {"num_blocks_per_group": 1, "use_stream": True, **disk}})
    placements.append({"offload": "group_leaf", "group": disk})

    cast = {"layerwise_casting": {"components": [denoiser]}}
    quants = [
        (backend, components)
        for backend in ("bnb_nf4", "bnb_int8", "torchao_int8wo", "torchao_fp8wo", "torchao_fp8dq")
        for components in ([denoiser], [denoiser, *big_encoders])
        if backend != "bnb_int8" or components == [denoiser]  # int8 matmul is slow: the denoiser only
    ]
    raw: list[dict] = list(placements)
    raw += [{**cast, **p} for p in ({}, {"offload": "model"}, placements[3])]
    # torchao's tensors move under group offloading (diffusers swaps their inner tensors); bitsandbytes' do not
    grouped = [p for p in placements if p.get("offload", "").startswith("group") and not p["group"].get("offload_to_disk")]
    for backend, components in dict.fromkeys((b, tuple(c)) for b, c in quants):
        resident_only = [encoders_only] if big_encoders and components == (denoiser,) else []  # nothing quantized moves
        for p in ({}, {"offload": "model"}, *(grouped if backend == "torchao_int8wo" else resident_only)):
            for load in loading.LOADS:
                if loading.worth_trying(backend, load, p.get("offload", "none")):
                    raw.append({"quantize": {"backend": backend, "components": list(components)}, "load": load, **p})
    plans = [Plan.model_validate(p) for p in raw]
    # measured to pile up on the GPU (the rule group_offload.torchao_low_cpu_mem_grows): not offered
    plans = [p for p in plans if not group_offload.torchao_pinned_on_the_fly(p)]
    plans = [_fill_groups(p, context) for p in plans]

    # VAE tiling where the decode is the peak; compile and an attention backend as speed variants
    tiled = [Plan.model_validate({**p.model_dump(), "vae": {"tiling": True, "slicing": w.batch > 1}}) for p in plans]
    for p, t in zip(list(plans), tiled):
        plain = context.estimate(p)
        if plain.peak_stage == "vae" and context.estimate(t).vram_bytes < 0.95 * plain.vram_bytes:
            plans.append(t)
    if comps[denoiser].repeated_blocks:
        # compile works with what keeps the graph whole between hooks: no offload, model offload, group streams
        plans += [p.model_copy(update={"compile": "regional"}) for p in plans
                  if p.offload in ("none", "model") or (p.grouped and p.group_settings.use_stream)]  # fmt: skip
    unique = {p.model_dump_json(): p for p in plans}
    return list(unique.values())


def speed_variants(plans: list[Plan], context: _Context, target: Target) -> list[Plan]:
    """The fastest fitting plans again with each step cache, with the GPU's fastest attention backend, and
    with both: these change the speed (a cache also holds some memory), not where the weights live, so
    only the best placements are worth them. Variants that break a rule are left out."""
    fitting = [p for p in plans if p.cache is None and context.fits(p)]
    bases = sorted(fitting, key=lambda p: context.per_call(context.estimate(p)))[:SPEED_BASES]
    caches = [TaylorSeerSpec(method="taylorseer", lite=True), TaylorSeerSpec(method="taylorseer"),
              FirstBlockSpec(method="first_block"), MagSpec(method="mag", steps=context.w.steps)]  # fmt: skip
    backend = attention.fastest_backend(context.profile, target)
    variants = []
    for base in bases:
        for spec in caches:
            variants.append(base.model_copy(update={"cache": spec}))
        if backend and base.attention_backend is None:
            faster = base.model_copy(update={"attention_backend": backend})
            variants += [faster, faster.model_copy(update={"cache": caches[0]})]
    # the cache's own rules ask diffusers about the pipeline; the others were checked with the bases
    return [v for v in variants if not any(f.severity == "error" for f in check_plan(v, target))]


def _fill_groups(plan: Plan, context: _Context) -> Plan:
    """Block-level groups without streams: as many blocks per group as still fit, fewer moves."""
    if plan.offload != "group_block" or plan.group_settings.use_stream:
        return plan
    best = plan
    for n in (2, 4, 8, 16):
        bigger = plan.model_copy(update={"group": plan.group_settings.model_copy(update={"num_blocks_per_group": n})})
        if context.estimate(bigger).vram_bytes + context.margin > context.machine.vram_bytes:
            break
        best = bigger
    return best


def _option(plan: Plan, context: _Context, target: Target) -> Option:
    e: Estimate = context.estimate(plan)
    machine, margin = context.machine, context.margin
    findings = check_plan(plan, target)
    reasons = [f.message for f in findings]
    broken = any(f.severity == "error" for f in findings)
    need = e.vram_bytes + margin
    if need > machine.vram_bytes:
        reasons.append(
            f"Needs {format_bytes(e.vram_bytes)} of VRAM at its peak (stage: {e.peak_stage}) plus the "
            f"{format_bytes(margin)} margin; {format_bytes(machine.vram_bytes)} available."
        )
    ram_need = e.ram_bytes
    if ram_need > machine.ram_bytes:
        limit = "the container's memory limit" if machine.ram_is_container_limit else "available RAM"
        when = "while loading" if e.ram_load_held_bytes >= e.ram_run_bytes else "while running"
        why = (
            " (quantizing or casting on the CPU passes every component through host RAM at full precision)"
            if when == "while loading" and (plan.quantize or plan.layerwise_casting) else ""
        )  # fmt: skip
        reasons.append(f"Needs {format_bytes(ram_need)} of host RAM {when}{why}; {limit} is {format_bytes(machine.ram_bytes)}.")
    fits = not broken and need <= machine.vram_bytes and ram_need <= machine.ram_bytes
    if fits:
        reasons.insert(0, f"Fits: {format_bytes(e.vram_bytes)} VRAM at its peak ({e.peak_stage}), "
                          f"{format_bytes(ram_need)} RAM, {e.seconds:.1f} s per call.")  # fmt: skip
    if e.ram_load_mapped_bytes and e.ram_load_bytes > machine.ram_bytes:
        reasons.append(
            f"Its RSS while loading reaches {format_bytes(e.ram_load_bytes)}, {format_bytes(e.ram_load_mapped_bytes)} "
            "of it file pages (weight files mapped while they are read once, the libraries' code); the kernel drops "
            "those pages when memory is short, "
            "so they are not counted against the RAM (loading may read them from disk again)."
        )
    if plan.compile != "none":
        reasons.append(f"The first call compiles ({e.first_call_seconds:.0f} s with compiling, predicted); later calls "
                       f"{e.seconds:.1f} s. Worth it over several calls in one process (`calls`).")  # fmt: skip
    if plan.cache is not None:
        denoiser = denoiser_of(context.m)
        reasons.append(cache.how_the_image_changes(plan, context.trace, denoiser, context.w.steps,
                                                   context.m.components[denoiser].class_name))  # fmt: skip
        held = cache.held_bytes(plan, context.trace, denoiser)
        if held:
            reasons.append(f"The cache keeps {format_bytes(held)} on the GPU while the pipeline runs (counted in the peak).")
    if plan.grouped and plan.group_settings.use_stream:
        reasons.append(group_offload.STREAM_CAVEAT)
    if plan.grouped and plan.group_settings.offload_to_disk:
        reasons.append(group_offload.disk_note(plan, Weights.of(plan, context.m)))
    if plan.allocator == "default":
        reasons.append("Predicted for PyTorch's default caching allocator, which keeps freed blocks of every size "
                       "it saw; with expandable segments (Linux CUDA) the peak would be lower.")  # fmt: skip
    if e.basis == "derived":
        reasons.append("Derived from the pipeline's code and sizes; no GPU run of this family and kind of plan backs it.")
    return Option(
        id=signature(plan) + _components_suffix(plan),
        group="cached" if plan.cache else "quantized" if plan.quantize else "full_precision",
        plan=plan.model_dump(exclude_defaults=True), fits=fits,
        predicted=Predicted(vram_bytes=e.vram_bytes, ram_load_bytes=e.ram_load_bytes, ram_run_bytes=e.ram_run_bytes,
                            ram_load_mapped_bytes=e.ram_load_mapped_bytes, seconds=e.seconds,
                            first_call_seconds=e.first_call_seconds),
        peak_stage=e.peak_stage, basis=e.basis, reasons=reasons, code="",
    )  # fmt: skip


def _components_suffix(plan: Plan) -> str:
    """What the signature leaves out and options differ by: the quantized components, the blocks per
    group, the components group offloading keeps resident (so every option's id is its own)."""
    suffix = f"({','.join(plan.quantize.components)})" if plan.quantize else ""
    if plan.offload == "group_block" and plan.group_settings.num_blocks_per_group > 1:
        suffix += f"[{plan.group_settings.num_blocks_per_group} blocks]"
    if plan.grouped and plan.group_settings.exclude:
        suffix += f"[resident: {','.join(plan.group_settings.exclude)}]"
    return suffix


def _score(o: Option, prefer: Preference, calls: int = 1) -> tuple:
    plan = Plan.model_validate(o.plan)
    cost = QUALITY_COST[plan.quantize.backend if plan.quantize else ("fp8_cast" if plan.layerwise_casting else None)]
    p = o.predicted
    s = round(per_call_seconds(p.first_call_seconds, p.seconds, calls), 3)
    # equally fast plans (loading paths differ in memory, not in speed): the one with more room left first
    room = (p.vram_bytes, p.ram_bytes)
    if prefer == "speed":
        return (s, *room)
    cached = plan.cache is not None  # it changes the image: first only when speed is what was asked for
    if prefer == "memory":
        return (cached, p.vram_bytes, s)
    if prefer == "quality":
        return (cached, cost, s, *room)
    # balanced: a precision step is worth 10% of the time
    return (cached, round(s * (1 + 0.1 * cost), 2), *room)


def _excess(o: Option, machine: Machine) -> tuple:
    over = o.predicted.vram_bytes / machine.vram_bytes
    return (over, o.predicted.seconds)


def plan_code(plan: Plan, m: PipelineMeasurement) -> str:
    """The lines that load the pipeline and apply ``plan`` (what patch_script would write)."""
    return _patched(plan.model_dump_json(), m.pipeline_class, _repo(m), m.dtype)


@functools.lru_cache(maxsize=512)
def _patched(plan_json: str, pipeline_class: str, repo: str, dtype: str) -> str:
    # a pure function of its arguments; recommendations for other budgets show many of the same plans
    from .patch import patch_source

    source = (
        f"import torch\nfrom diffusers import {pipeline_class}\n\n"
        f"pipe = {pipeline_class}.from_pretrained({repo!r}, torch_dtype=torch.{dtype})\npipe.to(\"cuda\")\n"
    )
    return patch_source(source, Plan.model_validate_json(plan_json), filename="pipeline.py").source


def _repo(m: PipelineMeasurement) -> str:
    """What the code should load: a built-in's Hub repository, else the model as given."""
    from .model_source import builtin_hub_id

    return builtin_hub_id(m.model) or m.model.removeprefix("builtin:")


def _machine(vram: str | int | None, ram: str | int | None, gpu: str | None = None) -> Machine:
    given_vram = parse_size(vram, "vram") if vram is not None else None
    given_ram = parse_size(ram, "ram") if ram is not None else None
    if gpu is not None and given_vram is None:  # a card that is not here: its own memory
        given_vram = gpu_profile(gpu).memory_bytes
    if given_vram is not None and given_ram is not None:
        return Machine(gpu=gpu, vram_bytes=given_vram, ram_bytes=given_ram, source="given")
    from .hardware import detect_hardware

    hw = detect_hardware()
    here = hw.gpus[0] if hw.gpus else None
    if given_vram is None and here is None:
        raise PipefitError(
            "No GPU was detected, so there is no VRAM to plan for.",
            "Pass `vram` (e.g. 16GiB) or `gpu` (e.g. 'RTX 4090') to plan for a GPU you will run on.",
        )
    return Machine(
        gpu=gpu or (here.name if here else None),
        vram_bytes=given_vram if given_vram is not None else here.free_bytes,
        ram_bytes=given_ram if given_ram is not None else hw.ram.effective_bytes,
        ram_is_container_limit=given_ram is None and hw.ram.container_limit_bytes is not None
        and hw.ram.container_limit_bytes <= hw.ram.available_bytes,
        compute_capability=here.compute_capability if here and given_vram is None and gpu is None else None,
        source="detected" if given_vram is None and given_ram is None else "given",
    )  # fmt: skip


def _target(m: PipelineMeasurement, machine: Machine) -> Target:
    from .hardware import installed_versions

    cc = tuple(int(x) for x in machine.compute_capability.split(".")) if machine.compute_capability else None
    return Target(
        device_type="cuda", compute_capability=cc,
        component_libraries={n: c.library for n, c in m.components.items() if c.library in ("diffusers", "transformers")},
        component_classes={n: c.class_name for n, c in m.components.items()}, components=list(m.components),
        denoiser="unet" if denoiser_of(m) == "unet" else "transformer", versions=installed_versions(),
        repeated_blocks={n: [b.class_name for b in c.repeated_blocks] for n, c in m.components.items() if c.bytes},
    )  # fmt: skip
