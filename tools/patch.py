"""patch_script: apply a plan to the user's own script, as a reviewable change.

The script is rewritten on its concrete syntax tree (libcst), so comments, blank lines and
formatting survive. For each pipeline the script builds, the statements the plan governs
(``pipe.to("cuda")``, offloading, casting, VAE tiling, compile, attention; see ``tools.script``)
are replaced by the plan's own, at the place where the script first placed or configured the
pipeline; load-time choices (quantization, ``device_map``) go into the ``from_pretrained`` call.
The code each strategy adds comes from its module in ``tools/strategies/``. Applying the same
plan twice changes nothing the second time.

Nothing is written unless an output path is given, and an existing file is replaced only when asked
(the script itself keeps a backup).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import libcst as cst
from pydantic import BaseModel, Field

from .errors import PipefitError
from .files import read_user_text
from .plan import LayerwiseCastingSpec, Plan, Target, VaeSpec, check_plan, parse_plan
from .script import (
    SETTING_OF_METHOD, Creation, ScriptInfo, analyze, call_workload, called_name, denoiser_of, device_type, keyword_arg,
    nodes_of, parse, placement_device, prequantized, quantized_repo, unmask, value_of,
)  # fmt: skip
from .strategies import Code, Site, allocator, attention, cache, layerwise_casting, loading, quantize, torch_compile, vae

MARKER = "# pipefit:"
LINE_LIMIT = 100  # longer generated calls get one argument per line
_SETTING_WORDS = {"placement": "the placement", "vae_tiling": "VAE tiling", "vae_slicing": "VAE slicing",
                  "compile": "compile", "attention": "the attention backend"}  # fmt: skip
_QUANT_CONFIG = re.compile(r"QuantizationConfig|BitsAndBytesConfig|TorchAoConfig|GGUF")


class PatchResult(BaseModel):
    """The patched script and how it differs from the original."""

    changed: bool
    source: str = Field(description="the whole patched script")
    diff: str = Field(description="unified diff from the original")
    edits: list[str] = Field(description="each change in words, with the original line")
    warnings: list[str]
    output_path: str | None = Field(None, description="where the patched script was written, if anywhere")


def patch_script(
    script: str | Path, plan: str | dict | Plan, output: str | Path | None = None, overwrite: bool = False,
    replace: bool = False,
) -> PatchResult:
    """Rewrite the script at ``script`` so it applies ``plan``; write it to ``output`` if given.

    ``plan`` is a Plan, a dict, inline JSON or a JSON file path. Additive: the script's own memory
    and speed settings that the plan leaves unset stay (VAE tiling and slicing, fp8 casting, compile,
    attention, step cache); a field the plan sets replaces the script's matching setting; the placement (.to,
    offloading) is always the plan's. ``replace`` makes the plan complete: every such setting of the
    script goes, as the plan has it. Every removal is named in the edits. Returns the new source, a
    unified diff and the edits in words. Refuses (PipefitError, nothing written) when the script does not
    parse, builds no pipeline, or the plan breaks a compatibility rule. A relative ``output`` is
    resolved against the script's folder. An existing ``output`` is replaced only with ``overwrite``;
    replacing the script itself keeps a copy of it first (``NAME.py.bak``, numbered if taken). The
    file is written whole or not at all (a temporary file, then renamed).
    """
    path = Path(script).expanduser()
    source = read_user_text(path, "script")
    result = patch_source(source, plan, filename=path.name, replace=replace)
    if output is not None:
        result.output_path = str(_write(path, Path(output).expanduser(), result.source, overwrite))
    return result


def _write(script: Path, output: Path, text: str, overwrite: bool) -> Path:
    """Write ``text`` to ``output`` (relative: beside the script) atomically, as patch_script promises."""
    import os
    import tempfile

    out = (output if output.is_absolute() else script.resolve().parent / output).resolve()
    if out.is_dir():
        raise PipefitError(f"The output {str(output)!r} is a folder.", "Give a file path, e.g. script_fit.py.")
    if not out.parent.is_dir():
        raise PipefitError(f"The output's folder {str(out.parent)!r} does not exist.", "Create it, or write elsewhere.")
    if out.exists() and not overwrite:
        raise PipefitError(
            f"{str(out)!r} exists; nothing was written.",
            "Choose a new file, or pass `overwrite` to replace it"
            + (" (a backup of the script is kept)." if out == script.resolve() else "."),
        )
    if out.exists() and out == script.resolve():
        backup = next(p for n in range(1000) if not (p := out.with_name(out.name + (".bak" if not n else f".bak{n}"))).exists())
        backup.write_bytes(out.read_bytes())
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


def patch_source(source: str, plan: str | dict | Plan, filename: str = "script.py", replace: bool = False) -> PatchResult:
    """``patch_script`` on source text; writes nothing."""
    plan = parse_plan(plan)
    module, info = _analyzed(source, filename)
    taken = {key: found for key, found in info.managed.items() if replace or _plan_takes(info.settings[key], plan.sets)}
    edits: list[str] = []
    warnings: list[str] = []
    work = [_prepare(info, creation, plan, filename, warnings, taken) for creation in info.creations]
    if (steps := cache.steps_mismatch(plan, call_workload(info).get("steps"))) is not None:
        warnings.append(steps)
    rewriter = _Rewriter(info, work, edits, taken, plan.sets)
    new_module = module.visit(rewriter)
    edits.sort(key=lambda edit: int(m.group(1)) if (m := re.search(r"line (\d+)", edit)) else 10**9)
    new_module = _add_imports(new_module, info, [imp for w in work for imp in w.imports], edits)
    new_module = _set_environment(new_module, plan, edits)
    new_source = unmask(new_module.code)
    diff = "".join(
        difflib.unified_diff(
            source.splitlines(keepends=True), new_source.splitlines(keepends=True), f"a/{filename}", f"b/{filename}"
        )
    )
    return PatchResult(
        changed=new_source != source, source=new_source, diff=diff, edits=edits, warnings=list(dict.fromkeys(warnings))
    )


def _plan_takes(settings: frozenset[str], plan_sets: frozenset[str]) -> bool:
    """Whether the plan replaces a statement of the script: it sets what the statement sets (a placement
    always; an `if` that also places goes whole, and the removal says what else it held)."""
    return "placement" in settings or settings <= plan_sets


@lru_cache(maxsize=8)
def _analyzed(source: str, filename: str) -> tuple[cst.Module, ScriptInfo]:
    """The script's tree and what it builds, read once per source: recommend patches one template with
    several plans (the tree is immutable and the analysis only read)."""
    module = parse(source, filename)
    return module, analyze(module, filename)


# ---- per pipeline: what to write ----------------------------------------------------------------


@dataclass
class _Work:
    creation: Creation
    site: Site
    block: list[tuple[str, str]]  # (statement source, edit in words)
    imports: list[str]
    quant_expr: str | None  # the PipelineQuantizationConfig expression
    quant_var: str
    quant_statement: cst.SimpleStatementLine | None  # an existing `x = ...Config(...)` to replace
    quant_edit: str = ""
    component_quant: dict[int, tuple[str, cst.BaseStatement]] = field(default_factory=dict)  # id(load call) -> (expression, its statement)
    set_device_map: str | None = None  # '"cpu"'
    drop_device_map: bool = False
    staged: Code | None = None  # load 'staged': each quantized component loaded on its own before the pipeline
    staged_kwargs: dict[str, str] = field(default_factory=dict)  # component -> its variable, passed to the loader
    component_device_map: dict[int, str] = field(default_factory=dict)  # id(load call) -> device_map source
    park_after: dict[int, str] = field(default_factory=dict)  # id(statement) -> `x.to("cpu")` (load 'staged')
    anchor: cst.BaseStatement | None = None  # managed statement the block replaces ...
    after: cst.BaseStatement | None = None  # ... or the statement it follows


def _prepare(
    info: ScriptInfo, creation: Creation, plan: Plan, filename: str, warnings: list[str],
    taken: dict[int, tuple[str, cst.BaseStatement]],
) -> _Work:  # fmt: skip
    # the release follows the loading the plan asks for, which the script may already do (patched before)
    release_plan, plan = plan, _leave_prequantized(info, creation, plan, warnings)
    site = _site(info, creation, plan, warnings)
    known = {n: c for n, c in creation.components.items() if c.library in ("diffusers", "transformers")}
    target = Target(
        device_type=device_type(info, site.device),
        component_libraries={n: c.library for n, c in known.items()},
        component_classes={n: c.class_name for n, c in known.items() if c.class_name},
        denoiser=denoiser_of(creation), pipeline_class=creation.class_name or None,
    )
    findings = check_plan(plan, target)
    errors = [f.message for f in findings if f.severity == "error"]
    if errors:
        raise PipefitError(
            f"The plan cannot apply to {creation.pipe} (line {creation.line} of {filename}): " + " ".join(errors),
            "Nothing was changed.",
        )
    kept = _kept_settings(info, creation, taken)
    if kept:  # the script's own settings stay: the rules hold for the plan together with them
        combined = plan.model_copy(update=kept)
        clash = [f.message for f in check_plan(combined, target) if f.severity == "error" and f.message not in errors]
        if clash:
            raise PipefitError(
                f"The plan cannot apply to {creation.pipe} together with the script's own {', '.join(kept)} "
                f"(kept because the plan leaves it unset): " + " ".join(clash),
                "Pass `replace` to make the plan complete (the script's setting goes), or remove it. Nothing was changed.",
            )
    warnings += [f.message for f in findings]

    codes: list[Code] = []
    shared = {n for n, c in creation.components.items() if c.shared_from}
    if plan.layerwise_casting:
        cast = [c for c in plan.layerwise_casting.components if c not in shared]
        if cast:
            codes.append(layerwise_casting.apply(plan.layerwise_casting, cast, site))
    codes += [vae.apply(plan, site), attention.apply(plan, site), _placement(plan, site), loading.release(release_plan, site),
              cache.apply(plan, site), torch_compile.apply(plan, site)]  # fmt: skip
    work = _Work(
        creation, site, [(s, c.edit) for c in codes for s in c.statements], [i for c in codes for i in c.imports],
        quant_expr=None, quant_var=_quant_var(info, creation), quant_statement=None,
    )  # fmt: skip
    _prepare_quantization(info, creation, plan, site, target, work, warnings)
    _prepare_device_map(info, creation, plan, work)
    _find_anchor(info, work, taken)
    return work


def _leave_prequantized(info: ScriptInfo, creation: Creation, plan: Plan, warnings: list[str]) -> Plan:
    """The plan without the components that are already quantized (GGUF, a bnb or Nunchaku checkpoint, a
    quantization_config at load, a pipeline repository saved quantized): quantizing or casting them again
    would fail or ruin them; nor those the script passes as None. Each one left out is a warning."""
    left_out: dict[str, str] = {}
    for name in plan.converted:
        component = creation.components.get(name)
        reason = prequantized(info, component) if component is not None else None
        if component is not None and component.absent:
            reason = f"it is None in this script (line {component.line}): the pipeline runs without it"
        if reason is None and component is None and quantized_repo(creation.model_id):
            reason = f"already quantized: the pipeline repository {creation.model_id} looks saved quantized"
        if reason is not None:
            left_out[name] = reason
    if not left_out:
        return plan
    warnings += [f"{name}: {why}; the plan's quantization or casting leaves it as it is."
                 for name, why in left_out.items()]  # fmt: skip
    update = {}
    for name in ("quantize", "layerwise_casting"):
        spec = getattr(plan, name)
        if spec is not None:
            kept = [c for c in spec.components if c not in left_out]
            update[name] = spec.model_copy(update={"components": kept}) if kept else None
    return plan.model_copy(update=update)


def _kept_settings(info: ScriptInfo, creation: Creation, taken: dict[int, tuple[str, cst.BaseStatement]]) -> dict:
    """The plan fields the script's own kept statements amount to, for the rules: VAE tiling or
    slicing turned on, the components it casts to fp8 (``weights:X`` in what each statement sets),
    compile, a named attention backend."""
    vae, cast, kept = {}, [], {}
    for key, (owner, statement) in info.managed.items():
        if owner != creation.pipe or key in taken:
            continue
        cast += [s.removeprefix("weights:") for s in sorted(info.settings[key]) if s.startswith("weights:")]
        for call in nodes_of(statement, cst.Call):
            name = called_name(call)
            setting = SETTING_OF_METHOD.get(name)
            if setting in ("vae_tiling", "vae_slicing") and name.startswith("enable"):
                vae[setting.removeprefix("vae_")] = True
            elif setting == "compile":
                kept["compile"] = "regional" if name == "compile_repeated_blocks" else "full"
            elif setting == "attention" and call.args and isinstance(backend := value_of(info, call.args[0].value), str):
                kept["attention_backend"] = backend
            elif name == "enable_cache" and call.args and (spec := _cache_spec(info, call.args[0].value)) is not None:
                kept["cache"] = spec
    if vae:
        kept["vae"] = VaeSpec(**vae)
    if cast:
        kept["layerwise_casting"] = LayerwiseCastingSpec(components=cast)
    return kept


def _cache_spec(info: ScriptInfo, config: cst.BaseExpression):
    """The plan's cache field for a script's own ``enable_cache(XConfig(...))``, where pipefit models X."""
    if not isinstance(config, cst.Call):
        return None
    method = {cls: m for m, cls in cache.CONFIG_CLASS.items()}.get(called_name(config))
    if method is None:
        return None
    fields = {"cache_interval": "interval", "disable_cache_before_step": "warmup", "max_order": "order",
              "use_lite_mode": "lite", "threshold": "threshold", "max_skip_steps": "max_skip",
              "retention_ratio": "retention", "num_inference_steps": "steps"}  # fmt: skip
    given = {fields[a.keyword.value]: value_of(info, a.value) for a in config.args if a.keyword and a.keyword.value in fields}
    try:
        return Plan.model_validate({"cache": {"method": method, **given}}).cache
    except ValueError:
        return None


def _site(info: ScriptInfo, creation: Creation, plan: Plan, warnings: list[str]) -> Site:
    dtype_arg = creation.kwarg("torch_dtype") or creation.kwarg("dtype")
    named = set((plan.quantize.components if plan.quantize else []) + (plan.layerwise_casting.components if plan.layerwise_casting else []))
    denoiser = "unet" if "unet" in named else "transformer" if "transformer" in named else denoiser_of(creation)
    if denoiser is None and (plan.compile != "none" or plan.attention_backend or plan.cache):
        warnings.append(
            f"Assumed {creation.pipe}'s denoiser is `transformer` ({creation.class_name} does not say); "
            "for a UNet pipeline change it to `unet`."
        )
    return Site(
        pipe=creation.pipe,
        device=_device(info, creation) or '"cuda"',
        dtype=info.code(dtype_arg.value) if dtype_arg else "torch.float32",
        denoiser=denoiser or "transformer",
    )


def _device(info: ScriptInfo, creation: Creation) -> str | None:
    """The device the script puts this pipeline on, as source: from `.to(...)`, an offloading call's
    device, or a device-type ``device_map``."""
    for call in creation.chain:
        if device := placement_device(info, call):
            return device
    for owner, statement in info.managed.values():
        if owner != creation.pipe:
            continue
        for call in nodes_of(statement, cst.Call):
            if isinstance(call.func, cst.Attribute) and call.func.attr.value in ("to", "cuda"):
                if info.code(call.func.value) == creation.pipe and (device := placement_device(info, call)):
                    return device
            for arg in call.args:
                if arg.keyword and arg.keyword.value in ("device", "onload_device"):
                    text = info.code(arg.value)
                    inner = re.fullmatch(r"torch\.device\((.+)\)", text)
                    return inner.group(1) if inner else text
    device_map = creation.kwarg("device_map")
    if device_map and device_type(info, info.code(device_map.value)) not in (None, "cpu"):
        return info.code(device_map.value)
    return None


def _placement(plan: Plan, site: Site) -> Code:
    return plan.placement_module().apply(plan, site)


def _quant_var(info: ScriptInfo, creation: Creation) -> str:
    if len(info.creations) == 1:
        return "quantization_config"
    return re.sub(r"\W", "_", creation.pipe).strip("_") + "_quantization_config"


def _prepare_quantization(
    info: ScriptInfo, creation: Creation, plan: Plan, site: Site, target: Target, work: _Work, warnings: list[str]
) -> None:
    existing = creation.kwarg("quantization_config")
    if existing is not None and isinstance(existing.value, cst.Name):
        work.quant_var = existing.value.value
        work.quant_statement = _binding(info, creation, existing.value.value)
    if plan.quantize is None:
        return
    at_load: list[str] = []
    for name in plan.quantize.components:
        component = creation.components.get(name)
        if component is None:
            at_load.append(name)
        elif component.shared_from:
            continue  # quantized where the other pipeline loads it
        elif component.call is None:
            raise PipefitError(
                f"Cannot quantize {name}: it is passed to {creation.pipe} at line {component.line}, "
                "but pipefit cannot see where it is loaded.",
                f"Load it in this script with {name} = SomeModel.from_pretrained(...), or leave {name} out of the plan. "
                "Nothing was changed.",
            )
        else:
            code = quantize.model_config(plan.quantize.backend, target.library_of(name), site)
            work.component_quant[id(component.call)] = (code.statements[0], component.statement)
            work.imports += code.imports
            if plan.loading == "host":
                work.component_device_map[id(component.call)] = '"cpu"'
            elif plan.quantize.backend not in loading.QUANTIZES_ON_DEVICE:  # torchao: where the weights load
                work.component_device_map[id(component.call)] = site.device
            bound = _bound_name(info, component.statement)
            if plan.loading == "staged" and bound:
                work.park_after[id(component.statement)] = f'{bound}.to("cpu")'
    if at_load and plan.loading == "staged":
        source = _source_expression(info, creation)
        hub = {key: _kwarg_code(info, creation.loader, key) for key in loading.HUB_KWARGS}
        # one pipeline: the component's own name; several: prefixed like their quantization configs
        prefix = "" if len(info.creations) == 1 else _quant_var(info, creation).removesuffix("quantization_config")
        names = {c: prefix + c for c in at_load}
        hub = {key: value for key, value in hub.items() if value}
        work.staged = loading.staged_loads(plan.quantize, at_load, source, hub, site, target, names)
        work.staged_kwargs = names
        work.imports += work.staged.imports
    elif at_load:
        code = quantize.pipeline_config(plan.quantize, at_load, site, target)
        work.quant_expr = code.statements[0]
        work.quant_edit = code.edit
        work.imports += code.imports


def _bound_name(info: ScriptInfo, statement: cst.BaseStatement | None) -> str | None:
    """The variable a ``x = ...`` statement binds."""
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign):
        return info.code(statement.body[0].targets[0].target)
    return None


def _source_expression(info: ScriptInfo, creation: Creation) -> str:
    """The repo or folder the pipeline loads from, as source."""
    named = creation.kwarg("pretrained_model_name_or_path")
    if named is not None:
        return info.code(named.value)
    positional = next((a for a in creation.loader.args if a.keyword is None), None)
    if positional is None:
        raise PipefitError(
            f"Cannot stage the loading of {creation.pipe} (line {creation.line}): its from_pretrained call names no model.",
            "Use load 'device' or 'host'. Nothing was changed.",
        )
    return info.code(positional.value)


def _binding(info: ScriptInfo, creation: Creation, name: str) -> cst.SimpleStatementLine | None:
    """The last ``name = <a quantization config>`` before the creation, in the same block."""
    container = info.containers[id(creation.statement)]
    found = None
    for statement in container.body:
        if statement is creation.statement:
            break
        if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
            small = statement.body[0]
            if isinstance(small, cst.Assign) and info.code(small.targets[0].target) == name:
                found = statement if _QUANT_CONFIG.search(info.code(small.value)) else None
    return found


def _prepare_device_map(info: ScriptInfo, creation: Creation, plan: Plan, work: _Work) -> None:
    device_map = creation.kwarg("device_map")
    current = info.code(device_map.value) if device_map else None
    if work.quant_expr is not None and plan.loading == "host":
        # load and quantize in host RAM: nothing reaches the GPU until the placement
        if device_type(info, current) != "cpu":
            work.set_device_map = '"cpu"'
    elif device_map is not None and device_type(info, current) != "cpu":
        if plan.offload != "none" or "balanced" in current:
            work.drop_device_map = True
    elif device_map is not None and work.quant_expr is not None and plan.loading == "device":
        work.drop_device_map = True  # device_map="cpu" would quantize in host RAM: bitsandbytes maps to the GPU itself


def _find_anchor(info: ScriptInfo, work: _Work, taken: dict[int, tuple[str, cst.BaseStatement]]) -> None:
    """Where the block goes: replacing the first governed statement after the pipeline is built (in the
    same block, before it is first called), else after the statements that go on configuring it."""
    creation = work.creation
    container = info.containers[id(creation.statement)]
    body = list(container.body)
    start = next(i for i, s in enumerate(body) if s is creation.statement)
    pipe = creation.pipe
    for statement in body[start + 1 :]:
        owner = taken.get(id(statement), (None,))[0]
        if owner == pipe:
            work.anchor = statement
            return
        if f"{pipe}(" in info.code(statement):
            break
    work.after = creation.statement
    for statement in body[start + 1 :]:
        if id(statement) in taken:
            continue
        text = info.code(statement)
        if isinstance(statement, cst.SimpleStatementLine) and text.startswith(f"{pipe}.") and f"{pipe}(" not in text:
            work.after = statement
        else:
            break


# ---- rewriting ------------------------------------------------------------------------------------


class _Rewriter(cst.CSTTransformer):
    def __init__(
        self, info: ScriptInfo, work: list[_Work], edits: list[str], taken: dict[int, tuple[str, cst.BaseStatement]],
        plan_sets: frozenset[str],
    ):  # fmt: skip
        self.info = info
        self.taken, self.plan_sets = taken, plan_sets
        self.edits = edits
        self.loaders = {id(w.creation.loader): w for w in work}
        self.assigns = {id(w.creation.assign): w for w in work}
        self.component_calls = {key: found for w in work for key, found in w.component_quant.items()}
        self.component_device_maps = {key: value for w in work for key, value in w.component_device_map.items()}
        self.parks = {key: text for w in work for key, text in w.park_after.items()}
        self.anchors = {id(w.anchor): w for w in work if w.anchor is not None}
        self.afters: dict[int, list[_Work]] = {}
        for w in work:
            if w.after is not None:
                self.afters.setdefault(id(w.after), []).append(w)
        self.before = {id(w.creation.statement): w for w in work}
        self.quant_statements = {id(w.quant_statement): w for w in work if w.quant_statement is not None}

    # load-time arguments
    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        line = self.info.line_of(original)
        if id(original) in self.component_calls:
            expr, statement = self.component_calls[id(original)]
            self.edits.append(f"line {line}: load it quantized: quantization_config={expr}")
            updated = _set_kwarg(updated, "quantization_config", cst.parse_expression(expr))
            if (device_map := self.component_device_maps.get(id(original))) is not None:
                self.edits.append(f"line {line}: device_map={device_map}: quantized where it loads")
                updated = _set_kwarg(updated, "device_map", cst.parse_expression(device_map))
            return self._fit(original, updated, statement)
        work = self.loaders.get(id(original))
        if work is None:
            return updated
        pipe = work.creation.pipe
        if work.quant_expr is not None:
            if work.quant_statement is None and _kwarg_code(self.info, original, "quantization_config") != work.quant_var:
                self.edits.append(f"line {line}: {pipe} loads with {work.quant_edit} (quantization_config={work.quant_var})")
            updated = _set_kwarg(updated, "quantization_config", cst.Name(work.quant_var))
        elif _kwarg_code(self.info, original, "quantization_config") is not None:
            why = "its quantized components load on their own" if work.staged_kwargs else "the plan quantizes nothing"
            self.edits.append(f"line {line}: removed {pipe}'s quantization_config ({why})")
            updated = _drop_kwarg(updated, "quantization_config")
        for component, variable in work.staged_kwargs.items():
            if _kwarg_code(self.info, original, component) != variable:
                self.edits.append(f"line {line}: {pipe} takes the {component} loaded above ({component}={variable})")
                updated = _set_kwarg(updated, component, cst.Name(variable))
        if work.set_device_map and _kwarg_code(self.info, original, "device_map") != work.set_device_map:
            self.edits.append(f'line {line}: device_map="cpu": components load and quantize in RAM, not on the GPU')
            updated = _set_kwarg(updated, "device_map", cst.parse_expression(work.set_device_map))
        if work.drop_device_map:
            self.edits.append(
                f"line {line}: removed device_map={_kwarg_code(self.info, original, 'device_map')} "
                "(it loads every weight onto the GPU, which the plan's placement replaces)"
            )
            updated = _drop_kwarg(updated, "device_map")
        return self._fit(original, updated, work.creation.statement)

    def _fit(self, original: cst.Call, updated: cst.Call, statement: cst.BaseStatement) -> cst.Call:
        """A call the patch made longer than the line limit gets one argument per line."""
        if updated.deep_equals(original):
            return updated
        column = self.info.columns.get(id(statement), 0)
        small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
        prefix = len(cst.Module([]).code_for_node(small.targets[0].target)) + 3 if isinstance(small, cst.Assign) else 0
        lines = cst.Module([]).code_for_node(updated).splitlines()
        widths = [column + prefix + len(lines[0]), *(len(line) for line in lines[1:])]
        return _one_arg_per_line(updated, " " * column) if max(widths) > LINE_LIMIT else updated

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        work = self.assigns.get(id(original))
        if work is None or not work.creation.chain:
            return updated
        value = updated.value
        for _ in work.creation.chain:
            value = value.func.value
        chained = "".join(
            "." + self.info.code(c.func.attr) + "(" + ", ".join(self.info.code(a) for a in c.args) + ")"
            for c in reversed(work.creation.chain)
        )
        self.edits.append(f"line {self.info.line_of(original)}: removed {chained} after loading; the plan places {work.creation.pipe}")
        return updated.with_changes(value=value)

    # statements
    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        return updated.with_changes(body=self._body(original.body, updated.body, ""))

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = self._body(original.body, updated.body, None)
        return updated.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])

    def _body(self, originals, updated, indent: str | None) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        carried: list[cst.EmptyLine] = []  # comments of removed statements, kept for the next one
        for original, new in zip(originals, updated):
            column = " " * self.info.columns.get(id(original), 0)
            creating = self.before.get(id(original))
            if creating is not None and creating.staged is not None:
                staged = [_statement(text, column) for text in creating.staged.statements]
                marker = cst.EmptyLine(comment=cst.Comment(f"{MARKER} {creating.staged.edit}"))
                staged[0] = staged[0].with_changes(leading_lines=[*new.leading_lines, marker])
                out += staged
                new = new.with_changes(leading_lines=())
                self.edits.append(f"before line {self.info.line_of(original)}: {creating.staged.edit}")
            if creating is not None and creating.quant_expr is not None and creating.quant_statement is None:
                assignment = _statement(f"{creating.quant_var} = {creating.quant_expr}", column)
                out.append(assignment.with_changes(leading_lines=new.leading_lines))
                new = new.with_changes(leading_lines=())
            configuring = self.quant_statements.get(id(original))
            if configuring is not None and configuring.quant_expr is not None:
                text = f"{configuring.quant_var} = {configuring.quant_expr}"
                replacement = _statement(text, column).with_changes(leading_lines=new.leading_lines)
                if self.info.code(original) != cst.Module([]).code_for_node(replacement).strip():
                    self.edits.append(f"line {self.info.line_of(original)}: {configuring.quant_var} set to the plan's quantization")
                out.append(replacement)
                continue
            if id(original) in self.taken:
                carried += _user_comments(new.leading_lines)
                w = self.anchors.get(id(original))
                if w is not None:
                    out += self._block(w, column, carried)
                    carried = []
                    self.edits.append(
                        f"line {self.info.line_of(original)}: replaced `{_first_line(original)}` with the plan's "
                        f"placement and settings for {w.creation.pipe}"
                    )
                else:
                    self.edits.append(f"line {self.info.line_of(original)}: removed `{_first_line(original)}` "
                                      f"({self._why_taken(original)})")  # fmt: skip
                continue
            if carried:
                new = new.with_changes(leading_lines=[*carried, *new.leading_lines])
                carried = []
            out.append(new)
            if id(original) in self.parks:
                out.append(_statement(self.parks[id(original)], column))
                self.edits.append(f"after line {self.info.line_of(original)}: {self.parks[id(original)]} (parked in RAM "
                                  "before the next component loads onto the GPU)")
            for w in self.afters.get(id(original), []):
                out += self._block(w, column, [])
                self.edits.append(f"after line {self.info.line_of(original)}: added the plan's placement and settings for {w.creation.pipe}")
        return out

    def _why_taken(self, statement: cst.BaseStatement) -> str:
        settings = self.info.settings[id(statement)]
        if "placement" not in settings and not settings <= self.plan_sets:
            return "`replace`: the plan decides every setting"
        return "the plan sets " + ", ".join(_SETTING_WORDS.get(s, s.replace("weights:", "") + "'s weights") for s in sorted(settings))

    def _block(self, work: _Work, column: str, comments: list[cst.EmptyLine]) -> list[cst.BaseStatement]:
        words = ", ".join(dict.fromkeys(edit for _, edit in work.block if edit))
        statements = [_statement(text, column) for text, _ in work.block]
        marker = cst.EmptyLine(comment=cst.Comment(f"{MARKER} {words}"))
        statements[0] = statements[0].with_changes(leading_lines=[*comments, marker])
        return statements


def _statement(text: str, column: str) -> cst.BaseStatement:
    """Parse one generated statement, breaking a long call into one argument per line."""
    statement = cst.parse_statement(text + "\n")
    if len(column) + len(text) <= LINE_LIMIT or "\n" in text:
        return statement
    small = statement.body[0]
    return statement.with_changes(body=[small.with_changes(value=_one_arg_per_line(small.value, column))])


def _one_arg_per_line(call: cst.Call, column: str) -> cst.Call:
    def newline(indent: str) -> cst.ParenthesizedWhitespace:
        return cst.ParenthesizedWhitespace(
            first_line=cst.TrailingWhitespace(), empty_lines=[], indent=False, last_line=cst.SimpleWhitespace(indent)
        )

    args = [
        a.with_changes(comma=cst.Comma(whitespace_after=newline(column + "    ")), whitespace_after_arg=cst.SimpleWhitespace(""))
        for a in call.args
    ]
    args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=newline(column)))
    return call.with_changes(whitespace_before_args=newline(column + "    "), args=args)


def _user_comments(lines) -> list[cst.EmptyLine]:
    return [line for line in lines if not (line.comment and line.comment.value.startswith(MARKER))]


def _first_line(statement: cst.BaseStatement) -> str:
    if isinstance(statement, cst.SimpleStatementLine):
        return cst.Module([]).code_for_node(statement.body[0])
    text = cst.Module([]).code_for_node(statement.with_changes(leading_lines=())).strip()
    return text.splitlines()[0] + " ..."


def _kwarg_code(info: ScriptInfo, call: cst.Call, name: str) -> str | None:
    arg = keyword_arg(call, name)
    return info.code(arg.value) if arg else None


def _set_kwarg(call: cst.Call, name: str, value: cst.BaseExpression) -> cst.Call:
    """Set ``name=value`` on ``call``, replacing the value or appending in the call's own layout."""
    args = list(call.args)
    for i, arg in enumerate(args):
        if arg.keyword and arg.keyword.value == name:
            args[i] = arg.with_changes(value=value)
            return call.with_changes(args=args)
    equal = cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace(""))
    new = cst.Arg(value=value, keyword=cst.Name(name), equal=equal)
    if not args:
        return call.with_changes(args=[new])
    last = args[-1]
    if len(args) >= 2 and isinstance(args[-2].comma, cst.Comma):
        separator = args[-2].comma
    elif isinstance(call.whitespace_before_args, cst.ParenthesizedWhitespace):
        separator = cst.Comma(whitespace_after=call.whitespace_before_args)
    else:
        separator = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    args[-1] = last.with_changes(comma=separator, whitespace_after_arg=cst.SimpleWhitespace(""))
    args.append(new.with_changes(comma=last.comma, whitespace_after_arg=last.whitespace_after_arg))
    return call.with_changes(args=args)


def _drop_kwarg(call: cst.Call, name: str) -> cst.Call:
    args = list(call.args)
    i = next(i for i, a in enumerate(args) if a.keyword and a.keyword.value == name)
    removed = args.pop(i)
    if i == len(args) and args:  # it was last: the new last argument takes over its comma and spacing
        args[-1] = args[-1].with_changes(comma=removed.comma, whitespace_after_arg=removed.whitespace_after_arg)
    return call.with_changes(args=args)


# ---- imports ----------------------------------------------------------------------------------------


def _set_environment(module: cst.Module, plan: Plan, edits: list[str]) -> cst.Module:
    """The allocator's setting as the first statements after the docstring and ``__future__`` imports,
    before any import that could start torch; nothing where the script already names the variable."""
    lines = allocator.environment(plan)
    if not lines or allocator.VARIABLE in module.code:
        return module
    body = list(module.body)
    position = 0
    for i, statement in enumerate(body):
        first = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
        docstring = i == 0 and isinstance(first, cst.Expr) and isinstance(first.value, cst.SimpleString)
        future = isinstance(first, cst.ImportFrom) and isinstance(first.module, cst.Name) and first.module.value == "__future__"
        if not (docstring or future):
            break
        position = i + 1
    has_os = any(
        isinstance(s, cst.SimpleStatementLine) and isinstance(s.body[0], cst.Import)
        and any(isinstance(a.name, cst.Name) and a.name.value == "os" and a.asname is None for a in s.body[0].names)
        for s in body[:position]
    )  # fmt: skip
    new = ([] if has_os else [cst.parse_statement("import os\n")]) + [cst.parse_statement(line + "\n") for line in lines]
    line = len(module.with_changes(body=body[:position], footer=[]).code.splitlines()) + 1
    edits.insert(0, f"line {line}: {allocator.edit(plan)}")
    return module.with_changes(body=[*body[:position], *new, *body[position:]])


def _add_imports(module: cst.Module, info: ScriptInfo, wanted: list[str], edits: list[str]) -> cst.Module:
    """Add each import the applied code needs and the script lacks, after its last top-level import."""
    missing: dict[str, list[str]] = {}  # module -> names ("" for `import x`)
    for statement in dict.fromkeys(wanted):
        if match := re.fullmatch(r"import (\w+)", statement):
            if match.group(1) not in info.module_aliases:
                missing.setdefault("", []).append(match.group(1))
            continue
        source, name, alias = re.fullmatch(r"from ([\w.]+) import (\w+)(?: as (\w+))?", statement).groups()
        if info.imports.get(alias or name) != (source, name):
            missing.setdefault(source, []).append(f"{name} as {alias}" if alias else name)
    if not missing:
        return module
    lines = [f"import {n}" for n in missing.pop("", [])]
    for source, names in missing.items():
        plain = [n for n in names if " as " not in n]
        if plain:
            lines.append(f"from {source} import {', '.join(plain)}")
        lines += [f"from {source} import {n}" for n in names if " as " in n]
    body = list(module.body)
    position = 0
    for i, statement in enumerate(body):
        if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], (cst.Import, cst.ImportFrom)):
            position = i + 1
        elif i == 0 and isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Expr) and isinstance(statement.body[0].value, cst.SimpleString):
            position = 1  # after the docstring
    new = [cst.parse_statement(line + "\n") for line in lines]
    edits.append("added " + "; ".join(lines))
    return module.with_changes(body=[*body[:position], *new, *body[position:]])
