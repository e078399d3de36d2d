"""The plan: one strategy choice for a whole pipeline, the same data everywhere.

recommend produces plans, patch_script applies them to a script, run_trial proves them. A plan
is checked against compatibility rules before anything uses it. Rules are data: each strategy
module in ``tools/strategies/`` declares the ``Rule``s of its own technique, and ``check_plan``
runs them all against what is known about the target (the device a script uses, the GPU's
compute capability, which library each component comes from). A rule whose inputs are unknown
is not applied: patching a script need not know the GPU, recommend does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PipefitError

QuantBackendName = Literal["bnb_nf4", "bnb_int8", "torchao_int8wo", "torchao_fp8wo", "torchao_fp8dq"]
OffloadKind = Literal["none", "model", "sequential", "group_block", "group_leaf"]
Library = Literal["diffusers", "transformers"]


class _Strict(BaseModel):
    # a misspelt field in a hand-written plan must be an error, not a silently ignored setting
    model_config = ConfigDict(extra="forbid")


class QuantizeSpec(_Strict):
    backend: QuantBackendName
    components: list[str] = Field(min_length=1)


class LayerwiseCastingSpec(_Strict):
    components: list[str] = Field(min_length=1)
    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2"] = "float8_e4m3fn"


class GroupSpec(_Strict):
    num_blocks_per_group: int = Field(1, ge=1)
    use_stream: bool = False
    low_cpu_mem_usage: bool = False
    record_stream: bool = False
    exclude: list[str] = Field(default_factory=list, description="components kept resident on the GPU")
    offload_to_disk: bool = Field(
        False, description="groups written to safetensors files (offload_to_disk_path) and read back as they run: "
        "almost no host RAM, disk space for the offloaded weights, slower",
    )


class VaeSpec(_Strict):
    tiling: bool = False
    slicing: bool = False


class TaylorSeerSpec(_Strict):
    """diffusers' TaylorSeerCacheConfig: a fixed schedule of full denoiser passes, the steps between them
    extrapolated from the last ones by a Taylor series."""

    method: Literal["taylorseer"]
    interval: int = Field(5, ge=1, description="cache_interval: a full pass every this many steps")
    warmup: int = Field(3, ge=0, description="disable_cache_before_step: full passes before caching starts")
    order: int = Field(1, ge=0, le=4, description="max_order of the Taylor series")
    lite: bool = Field(False, description="use_lite_mode: skip whole blocks and extrapolate only the output "
                       "(least memory, most speed); otherwise every attention module's output is extrapolated")


class FirstBlockSpec(_Strict):
    """diffusers' FirstBlockCacheConfig: the first block always runs; the rest are skipped while its output
    changes less than ``threshold`` (how often depends on the image)."""

    method: Literal["first_block"]
    threshold: float = Field(0.05, gt=0, le=1)


class MagSpec(_Strict):
    """diffusers' MagCacheConfig: the whole block stack is skipped while the error its magnitude ratios
    accumulate stays under ``threshold`` (at most ``max_skip`` steps in a row, none in the first
    ``retention`` of the steps). The ratios are the checkpoint's own; diffusers ships Flux.1's, so the
    schedule is fixed and known before the call."""

    method: Literal["mag"]
    threshold: float = Field(0.06, gt=0, le=1)
    max_skip: int = Field(3, ge=0, description="max_skip_steps: steps skipped in a row at most")
    retention: float = Field(0.2, ge=0, le=1, description="retention_ratio: the share of first steps never skipped")
    steps: int = Field(28, ge=1, le=1000, description="num_inference_steps: the steps the script runs (the ratios "
                       "are stretched to them)")


CacheSpec = Annotated[TaylorSeerSpec | FirstBlockSpec | MagSpec, Field(discriminator="method")]


class Plan(_Strict):
    """How a pipeline is loaded and placed, and how fast it runs: quantization, fp8 casting, offloading,
    VAE, step caching, compile, attention."""

    quantize: QuantizeSpec | None = None
    load: Literal["device", "host", "staged"] | None = Field(
        None,
        description="how quantized components load: device (quantized on the GPU as the weights stream in), "
        "host (device_map='cpu', quantized in host RAM), staged (one component at a time on the GPU, parked in RAM); "
        "unset: the backend's own way (bitsandbytes device, torchao host)",
    )
    layerwise_casting: LayerwiseCastingSpec | None = None
    offload: OffloadKind = "none"
    group: GroupSpec | None = None
    vae: VaeSpec = Field(default_factory=VaeSpec)
    cache: CacheSpec | None = Field(None, description="step caching of the denoiser: faster, and the image changes")
    compile: Literal["none", "regional", "full"] = "none"
    attention_backend: str | None = None
    allocator: Literal["expandable_segments", "default"] = Field(
        "expandable_segments",
        description="expandable_segments: the patched script sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
        "(unless the user set it), which keeps reserved memory near allocated; default: the allocator as it is",
    )

    @property
    def group_settings(self) -> GroupSpec:
        return self.group or GroupSpec()

    @cached_property
    def converted(self) -> set[str]:
        """Components whose weights the plan quantizes or stores in fp8."""
        return {*(self.quantize.components if self.quantize else []),
                *(self.layerwise_casting.components if self.layerwise_casting else [])}  # fmt: skip

    @property
    def loading(self) -> Literal["device", "host", "staged"]:
        """How the quantized components load: ``load``, else the backend's own way (bitsandbytes quantizes
        on the GPU as the weights stream in, torchao where they load: the CPU)."""
        if self.load is not None or not self.quantize:
            return self.load or "device"
        from .strategies.loading import default_load

        return default_load(self.quantize.backend)

    @property
    def sets(self) -> frozenset[str]:
        """The script settings this plan decides (what patch replaces; the rest of the user's stay): the
        placement always; vae_tiling, vae_slicing, compile, attention, cache when set; weights:COMPONENT for
        each component it quantizes or casts (how its weights are stored is then the plan's)."""
        chosen = {"vae_tiling": self.vae.tiling, "vae_slicing": self.vae.slicing, "compile": self.compile != "none",
                  "attention": self.attention_backend is not None, "cache": self.cache is not None}  # fmt: skip
        return frozenset({"placement", *(name for name, on in chosen.items() if on), *(f"weights:{c}" for c in self.converted)})

    @property
    def named_components(self) -> set[str]:
        """Every component the plan names: quantized, cast, or kept resident by group offloading."""
        return self.converted | set(self.group_settings.exclude)

    @property
    def grouped(self) -> bool:
        """Whether the plan uses diffusers' group offloading (block or leaf level)."""
        return self.offload in ("group_block", "group_leaf")

    def placement_module(self):
        """The strategy module that places this plan's weights: group_offload, or offload for the rest."""
        from .strategies import group_offload, offload

        return group_offload if self.grouped else offload


class Target(BaseModel):
    """What is known about where a plan will run; ``None`` means unknown, and rules needing it are skipped."""

    device_type: str | None = Field(None, description="cuda, cpu, mps, xpu ... as the script or machine says")
    compute_capability: tuple[int, int] | None = None
    component_libraries: dict[str, Library] | None = Field(
        None, description="which library each component's class comes from"
    )
    component_classes: dict[str, str] | None = None
    components: list[str] | None = Field(None, description="every component of the pipeline, where all are known")
    denoiser: Literal["unet", "transformer"] | None = None
    pipeline_class: str | None = None
    repeated_blocks: dict[str, list[str]] | None = Field(
        None, description="the block classes each model declares for regional compile (measure_components)"
    )
    versions: dict[str, str | None] | None = Field(None, description="installed package versions")
    module_names: list[str] | None = Field(None, description="the denoiser's submodules, blocks.N.attn deep (the dry run)")

    def library_of(self, component: str) -> Library:
        """The library of ``component``'s class: known, or by diffusers' naming (text/image encoders
        come from transformers in every diffusers pipeline; the rest are diffusers models)."""
        if self.component_libraries and component in self.component_libraries:
            return self.component_libraries[component]
        return "transformers" if component.startswith(("text_encoder", "image_encoder")) else "diffusers"


@dataclass(frozen=True)
class Rule:
    """One thing a plan must not do (``error``) or should know (``warning``), with the message a user sees.

    ``breaks`` returns the offending detail (a component name, a setting) or ``None`` when the plan is
    fine or the target lacks what the rule needs; ``message`` and ``fix`` are formatted with it as ``{0}``.
    """

    id: str
    breaks: Callable[[Plan, Target], str | None]
    message: str
    fix: str
    severity: Literal["error", "warning"] = "error"


class Finding(BaseModel):
    rule: str
    severity: Literal["error", "warning"]
    message: str


RULES = (
    Rule(
        "plan.unknown_component",
        lambda plan, target: ", ".join(sorted(plan.named_components - set(target.components))) or None
        if target.components is not None
        else None,
        "The plan names {0}, which this pipeline does not have.",
        "Name its own components (measure_components lists them).",
    ),
)


def all_rules() -> tuple[Rule, ...]:
    """The plan's own rules and every strategy module's, in a stable order."""
    import sys

    from .strategies import attention, cache, group_offload, layerwise_casting, loading, offload, quantize, torch_compile, vae

    modules = (sys.modules[__name__], quantize, loading, layerwise_casting, offload, group_offload, vae, torch_compile,
               attention, cache)  # fmt: skip
    return tuple(rule for module in modules for rule in module.RULES)


def check_plan(plan: Plan, target: Target | None = None) -> list[Finding]:
    """Apply every compatibility rule to ``plan`` on ``target``; errors first."""
    target = target or Target()
    findings = []
    for rule in all_rules():
        detail = rule.breaks(plan, target)
        if detail is not None:
            text = f"{rule.message.format(detail)} {rule.fix.format(detail)}".strip()
            findings.append(Finding(rule=rule.id, severity=rule.severity, message=text))
    return sorted(findings, key=lambda f: f.severity != "error")


def parse_plan(plan: str | dict | Plan) -> Plan:
    """A plan from a model, a dict, inline JSON or the path of a JSON file; a clear error otherwise."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        text = plan.strip()
        if not text.startswith("{"):
            path = Path(text).expanduser()
            if not path.is_file():
                raise PipefitError(
                    f"The plan {plan!r} is neither inline JSON nor an existing file.",
                    'Pass JSON such as \'{"offload": "model"}\' or the path of a .json file.',
                )
            text = path.read_text(encoding="utf-8")
        try:
            plan = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PipefitError(f"The plan is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.")
    if not isinstance(plan, dict):
        raise PipefitError("A plan must be a JSON object.", 'For example {"offload": "model"}.')
    try:
        return Plan.model_validate(plan)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}" for e in exc.errors())
        raise PipefitError(f"The plan is not valid: {problems}.", "See the plan schema in README.md.")
