"""Reading a diffusers script: where it builds pipelines, how they reach the device, what configures them.

Works on libcst's concrete syntax tree so the patcher can rewrite exactly those nodes and leave
every comment and blank line as it was. Nothing here changes a tree.

A pipeline is an assignment whose value is ``SomePipeline.from_pretrained(...)`` (or
``from_single_file`` / ``from_pipe``, or a direct ``SomePipeline(...)``), optionally followed by
``.to(...)`` / ``.cuda()``; the class is any name ending in ``Pipeline`` or starting with
``AutoPipelineFor``. The statements the plan takes over ("managed") are those that place the
pipeline or apply a memory/speed technique to it: ``.to(device)``, the offloading methods, layerwise
casting, VAE tiling/slicing, compile, attention backends, and ``if``s made only of such statements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import libcst as cst
from libcst.metadata import MetadataWrapper, ParentNodeProvider, PositionProvider

from .errors import PipefitError

LOADERS = ("from_pretrained", "from_single_file", "from_pipe")
PLACEMENT = ("to", "cuda")
# pipeline methods a plan decides about
PIPE_METHODS = frozenset({
    "enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload",
    "enable_vae_tiling", "enable_vae_slicing", "disable_vae_tiling", "disable_vae_slicing",
})  # fmt: skip
# component methods a plan decides about
COMPONENT_METHODS = frozenset({
    "enable_layerwise_casting", "compile_repeated_blocks", "compile", "set_attention_backend",
    "enable_group_offload", "enable_tiling", "enable_slicing", "disable_tiling", "disable_slicing",
    "enable_cache", "disable_cache",
})  # fmt: skip
HOOK_FUNCTIONS = frozenset({"apply_group_offloading", "apply_layerwise_casting"})
# which plan field a governed call is about (everything else: the placement, which every plan sets)
SETTING_OF_METHOD = {
    "enable_vae_tiling": "vae_tiling", "disable_vae_tiling": "vae_tiling", "enable_tiling": "vae_tiling",
    "disable_tiling": "vae_tiling", "enable_vae_slicing": "vae_slicing", "disable_vae_slicing": "vae_slicing",
    "enable_slicing": "vae_slicing", "disable_slicing": "vae_slicing",
    "enable_layerwise_casting": "layerwise_casting", "apply_layerwise_casting": "layerwise_casting",
    "compile_repeated_blocks": "compile", "compile": "compile",
    "set_attention_backend": "attention", "enable_xformers_memory_efficient_attention": "attention",
    "enable_cache": "cache", "disable_cache": "cache",
}  # fmt: skip
ATTENTION_METHODS = frozenset({"enable_xformers_memory_efficient_attention"})
_DTYPE_ARG = re.compile(r"^(torch\.)?(b?float\d+|half|float|dtype|torch_dtype|\w*_dtype)$")
# pipelines whose denoiser is a UNet (by class name or hub id); everything newer uses a transformer
_UNET_PIPELINE = re.compile(r"StableDiffusion(?!3)|Kandinsky|^IF|AnimateDiff|StableVideo|I2VGen|LatentConsistency")
_UNET_MODEL_ID = re.compile(r"stable-diffusion(?!-3)|sdxl|sd-turbo|kandinsky|playground|animatediff|dreamshaper", re.I)

Container = cst.Module | cst.IndentedBlock


def keyword_arg(call: cst.Call, name: str) -> cst.Arg | None:
    """The ``name=...`` argument of ``call``, if given."""
    return next((a for a in call.args if a.keyword and a.keyword.value == name), None)


def unchain(expr: cst.BaseExpression) -> tuple[cst.BaseExpression, list[cst.Call]]:
    """``X.from_pretrained(...).to("cuda")`` -> (the inner expression, the placement calls, outermost first)."""
    chain = []
    while isinstance(expr, cst.Call) and isinstance(expr.func, cst.Attribute) and expr.func.attr.value in PLACEMENT:
        chain.append(expr)
        expr = expr.func.value
    return expr, chain


@dataclass
class ComponentLoad:
    """A model the script loads itself and passes to a pipeline (``transformer=transformer``)."""

    name: str  # the pipeline's component name
    library: str | None  # diffusers / transformers, from the script's imports
    class_name: str | None
    call: cst.Call | None  # its X.from_pretrained(...) call, when found
    line: int
    statement: cst.BaseStatement | None = None  # the statement holding that call
    shared_from: str | None = None  # ``base.vae``: another pipeline's component
    absent: bool = False  # passed as None: the pipeline runs without it


@dataclass
class Creation:
    """One pipeline the script builds."""

    pipe: str  # the target expression's source: "pipe", "self.pipe"
    statement: cst.SimpleStatementLine
    assign: cst.Assign
    loader: cst.Call  # the from_pretrained (or constructor) call
    chain: list[cst.Call]  # placement calls chained after it, outermost first
    class_name: str
    model_id: str | None
    line: int
    scope: cst.CSTNode | None  # the enclosing FunctionDef, None at module level
    components: dict[str, ComponentLoad] = field(default_factory=dict)

    def kwarg(self, name: str) -> cst.Arg | None:
        return keyword_arg(self.loader, name)


@dataclass
class ScriptInfo:
    module: cst.Module
    creations: list[Creation]
    managed: dict[int, tuple[str, cst.BaseStatement]]  # id(statement) -> (pipe, statement)
    # id(managed statement) -> what it sets: placement, vae_tiling, vae_slicing, compile, attention, cache, weights:COMPONENT
    settings: dict[int, frozenset[str]]
    containers: dict[int, Container]  # id(statement) -> the block holding it
    lines: dict[int, int]  # id(node) -> line
    columns: dict[int, int]  # id(statement) -> column: its indentation
    imports: dict[str, tuple[str, str]]  # local name -> (module, imported name)
    module_aliases: dict[str, str]  # "d" -> "diffusers"
    # module-level NAME = "string" or NAME = 1024: every constant each NAME is given, in order (the last
    # is its value; `if cuda: device = "cuda" else: device = "cpu"` gives two)
    constants: dict[str, list[str | int]]
    argparse_defaults: dict[str, str | int]  # parser.add_argument("--steps", default=28): what args.steps holds
    calls: list[cst.Call]

    def line_of(self, node: cst.CSTNode) -> int:
        return self.lines.get(id(node), 0)

    def code(self, node: cst.CSTNode) -> str:
        return self.module.code_for_node(node).strip()


_MAGIC = re.compile(r"^([ \t]*)([!%].*)$", re.M)  # a notebook's shell and magic lines: !pip install, %cd
MAGIC_MARK = "#pipefit-notebook-line: "


def parse(source: str, filename: str = "script.py") -> cst.Module:
    """The script's tree, or a PipefitError naming the line that does not parse. A notebook exported
    with ``!pip`` or ``%magic`` lines parses with them kept as marked comments (``unmask`` restores them)."""
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        if _MAGIC.search(source):
            try:
                return cst.parse_module(_MAGIC.sub(lambda m: f"{m.group(1)}{MAGIC_MARK}{m.group(2)}", source))
            except cst.ParserSyntaxError:
                pass
        raise PipefitError(
            f"{filename} does not parse: line {exc.raw_line}, column {exc.raw_column + 1}: {exc.message}",
            "Fix the syntax error first; pipefit patches only valid Python and changed nothing.",
        ) from None


def analyze(module: cst.Module, filename: str = "script.py") -> ScriptInfo:
    """Find the pipelines, their components and every statement a plan takes over."""
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    index = _Index()
    wrapper.visit(index)
    info = ScriptInfo(
        module=module, creations=[], managed={}, settings={}, containers=index.containers, lines=index.lines,
        columns=index.columns, imports=index.imports, module_aliases=index.module_aliases, constants=index.constants,
        argparse_defaults=index.argparse_defaults, calls=index.calls,
    )  # fmt: skip
    for assign, statement in index.assigns:
        creation = _creation(info, assign, statement, index)
        if creation is not None:
            info.creations.append(creation)
    if not info.creations:
        unassigned = [
            f"line {info.line_of(call)}" for call in index.calls if _pipeline_loader(info, call) and id(call) not in index.assigned_values
        ]
        where = f" Found pipeline loading at {', '.join(unassigned)}, but not assigned to a name." if unassigned else ""
        raise PipefitError(
            f"No diffusers pipeline found in {filename}: looked for `pipe = SomePipeline.from_pretrained(...)`.{where}",
            "Assign the pipeline to a variable (pipe = ...) and patch again; nothing was changed.",
        )
    pipes = {c.pipe for c in info.creations}
    inside_managed: set[int] = set()  # statements of a managed `if`: they go with it
    for statement, scope in index.statements:
        if id(statement) in inside_managed:
            continue
        pipe = _managed_by(info, statement, pipes)
        if pipe and any(c.pipe == pipe and c.scope is scope and info.line_of(statement) > c.line for c in info.creations):
            info.managed[id(statement)] = (pipe, statement)
            info.settings[id(statement)] = _settings(info, statement)
            if isinstance(statement, cst.If):
                inside_managed |= {id(n) for n in nodes_of(statement, cst.SimpleStatementLine, cst.If)}
    for creation in info.creations:
        _link_components(info, creation, index)
    return info


def unmask(code: str) -> str:
    """A tree's code with a notebook's ``!`` and ``%`` lines as they were."""
    return code.replace(MAGIC_MARK, "")


def qualified_class(info: ScriptInfo, expr: cst.BaseExpression) -> tuple[str | None, str] | None:
    """(library, class name) of a class expression: ``FluxPipeline``, ``diffusers.FluxPipeline``."""
    if isinstance(expr, cst.Name):
        module, name = info.imports.get(expr.value, (None, expr.value))
        return (module.split(".")[0] if module else None), name
    if isinstance(expr, cst.Attribute) and isinstance(expr.value, cst.Name):
        library = info.module_aliases.get(expr.value.value)
        return (library, expr.attr.value) if library else None
    return None


def is_pipeline_class(name: str) -> bool:
    return name == "DiffusionPipeline" or name.startswith("AutoPipelineFor") or name.endswith("Pipeline")


def denoiser_of(creation: Creation) -> str | None:
    """``unet`` or ``transformer`` when the class or the hub id tells; None when neither does."""
    if creation.class_name not in ("DiffusionPipeline",) and not creation.class_name.startswith("AutoPipeline"):
        return "unet" if _UNET_PIPELINE.search(creation.class_name) else "transformer"
    if creation.model_id:
        return "unet" if _UNET_MODEL_ID.search(creation.model_id) else "transformer"
    return None


def placement_device(info: ScriptInfo, call: cst.Call) -> str | None:
    """The device expression of ``x.to(device...)`` / ``x.cuda()``; None for a dtype-only ``.to``."""
    method = call.func.attr.value if isinstance(call.func, cst.Attribute) else None
    if method == "cuda":
        return '"cuda"' if not call.args else f'"cuda:{info.code(call.args[0].value)}"'
    for arg in call.args:
        if arg.keyword is not None:
            if arg.keyword.value == "device":
                return info.code(arg.value)
            continue
        text = info.code(arg.value)
        if not _DTYPE_ARG.match(text):
            return text
    return None


def device_type(info: ScriptInfo, device: str | None) -> str | None:
    """cuda / cpu / mps when the device expression is a literal or a module-level literal (one a script
    sets to "cuda" or "cpu" by what is available counts as its accelerator); else None."""
    if device is None:
        return None
    values = [v for v in info.constants.get(device, []) if isinstance(v, str)]
    # a device chosen at run time (cuda if available, else cpu) is planned for its accelerator
    constant = next((v for v in values if not v.startswith("cpu")), values[-1] if values else None)
    text = f'"{constant}"' if isinstance(constant, str) else device
    match = re.fullmatch(r"""(?:torch\.device\()?["']([a-z]+)(?::\d+)?["']\)?""", text)
    return match.group(1) if match else None


# ---- internals -----------------------------------------------------------------------------------


class _Index(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider, ParentNodeProvider)

    def __init__(self) -> None:
        self.containers: dict[int, Container] = {}
        self.lines: dict[int, int] = {}
        self.columns: dict[int, int] = {}
        self.imports: dict[str, tuple[str, str]] = {}
        self.module_aliases: dict[str, str] = {}
        self.constants: dict[str, list[str | int]] = {}
        self.assigns: list[tuple[cst.Assign, cst.SimpleStatementLine]] = []
        self.statements: list[tuple[cst.BaseStatement, cst.CSTNode | None]] = []
        self.calls: list[cst.Call] = []
        self.argparse_defaults: dict[str, str | int] = {}
        self.assigned_values: set[int] = set()
        # name -> (line, value, statement) of each simple assignment to it
        self.bindings: dict[str, list[tuple[int, cst.BaseExpression, cst.SimpleStatementLine]]] = {}
        self._scopes: list[cst.CSTNode | None] = [None]

    def _line(self, node: cst.CSTNode) -> None:
        start = self.get_metadata(PositionProvider, node).start
        self.lines[id(node)] = start.line
        self.columns[id(node)] = start.column

    def _body(self, container: Container) -> None:
        for statement in container.body:
            self.containers[id(statement)] = container
            self.statements.append((statement, self._scopes[-1]))

    def visit_Module(self, node: cst.Module) -> None:
        self._body(node)

    def visit_IndentedBlock(self, node: cst.IndentedBlock) -> None:
        self._body(node)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._scopes.append(node)

    def leave_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._scopes.pop()

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        self._line(node)

    def visit_If(self, node: cst.If) -> None:
        self._line(node)

    def visit_For(self, node: cst.For) -> None:
        self._line(node)

    def visit_With(self, node: cst.With) -> None:
        self._line(node)

    def visit_Call(self, node: cst.Call) -> None:
        self._line(node)
        self.calls.append(node)
        # parser.add_argument("--model", default="org/name"): what `args.model` holds unless overridden
        if isinstance(node.func, cst.Attribute) and node.func.attr.value == "add_argument" and node.args:
            flag, default = node.args[0].value, keyword_arg(node, "default")
            constant = _constant(default.value) if default else None
            if isinstance(flag, cst.SimpleString) and constant is not None:
                dest = keyword_arg(node, "dest")
                dest = _constant(dest.value) if dest else str(flag.evaluated_value).lstrip("-").replace("-", "_")
                self.argparse_defaults[str(dest)] = constant

    def visit_Assign(self, node: cst.Assign) -> None:
        statement = self.get_metadata(ParentNodeProvider, node)
        self._line(node)
        self.assigned_values.add(id(unchain(node.value)[0]))
        if isinstance(statement, cst.SimpleStatementLine) and len(node.targets) == 1:
            self.assigns.append((node, statement))
            target = node.targets[0].target
            if isinstance(target, (cst.Name, cst.Attribute)):  # x = ..., self.x = ...
                key = target.value if isinstance(target, cst.Name) else cst.Module([]).code_for_node(target)
                self.bindings.setdefault(key, []).append((self.lines[id(node)], node.value, statement))
                if self._scopes[-1] is None and (constant := _constant(node.value)) is not None:
                    self.constants.setdefault(target.value, []).append(constant)

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if node.module is None or isinstance(node.names, cst.ImportStar):
            return
        module = cst.Module([]).code_for_node(node.module)
        for alias in node.names:
            name = cst.Module([]).code_for_node(alias.name)
            local = alias.asname.name.value if alias.asname else name
            self.imports[local] = (module, name)

    def visit_Import(self, node: cst.Import) -> None:
        for alias in node.names:
            name = cst.Module([]).code_for_node(alias.name)
            local = alias.asname.name.value if alias.asname else name.split(".")[0]
            self.module_aliases[local] = name.split(".")[0]


def _pipeline_loader(info: ScriptInfo, call: cst.Call) -> str | None:
    """The pipeline class name if ``call`` builds a pipeline."""
    func = call.func
    if isinstance(func, cst.Attribute) and func.attr.value in LOADERS:
        cls = qualified_class(info, func.value)
    else:
        cls = qualified_class(info, func)
    if cls is None or cls[0] not in (None, "diffusers") or not is_pipeline_class(cls[1]):
        return None
    return cls[1]


def _creation(info: ScriptInfo, assign: cst.Assign, statement: cst.SimpleStatementLine, index: _Index) -> Creation | None:
    value, chain = unchain(assign.value)
    if not isinstance(value, cst.Call):
        return None
    class_name = _pipeline_loader(info, value)
    if class_name is None:
        return None
    first = value.args[0] if value.args and value.args[0].keyword is None else keyword_arg(value, "pretrained_model_name_or_path")
    model_id = value_of(info, first.value) if first is not None else None
    pipe = info.code(assign.targets[0].target)
    creation = Creation(
        pipe=pipe, statement=statement, assign=assign, loader=value, chain=chain, class_name=class_name,
        model_id=model_id if isinstance(model_id, str) else None, line=info.line_of(statement),
        scope=next((s for st, s in index.statements if st is statement), None),
    )  # fmt: skip
    return creation


WORKLOAD_KWARGS = {
    "height": "height", "width": "width", "num_frames": "frames", "num_inference_steps": "steps",
    "num_images_per_prompt": "batch", "num_videos_per_prompt": "batch", "guidance_scale": "guidance_scale",
}  # fmt: skip  # the pipeline call's arguments -> recommend's workload
FLOAT_KWARGS = frozenset({"guidance_scale"})  # the rest are whole numbers


def workload_value(kwarg: str, value: object) -> int | float | None:
    """A pipeline call argument's value as recommend takes it: a number for guidance_scale, a whole
    number for the sizes, None for anything else (a string, a float size, an expression not followed)."""
    if kwarg in FLOAT_KWARGS and isinstance(value, int | float):
        return float(value)
    return value if isinstance(value, int) else None


def value_of(info: ScriptInfo, expr: cst.BaseExpression) -> str | int | float | None:
    """A string or number the script spells out: a literal, a module constant, or ``args.NAME``'s argparse default."""
    if (constant := _constant(expr)) is not None:
        return constant
    if isinstance(expr, cst.Name):
        return info.constants.get(expr.value, [None])[-1]
    if isinstance(expr, cst.Attribute):
        return info.argparse_defaults.get(expr.attr.value)
    return None


def call_workload(info: ScriptInfo) -> dict[str, int | float]:
    """The workload the script's pipeline calls pass (``pipe(prompt, height=768, num_inference_steps=args.steps,
    guidance_scale=0.0)``), in recommend's names: height, width, frames, steps, batch (whole numbers) and
    guidance_scale."""
    pipes = {c.pipe for c in info.creations}
    workload: dict[str, int | float] = {}
    for call in info.calls:
        if info.code(call.func) not in pipes:
            continue
        for arg in call.args:
            name = arg.keyword.value if arg.keyword else None
            if name in WORKLOAD_KWARGS and (value := workload_value(name, value_of(info, arg.value))) is not None:
                workload[WORKLOAD_KWARGS[name]] = value
    return workload


# a repository saved quantized says so in its name: flux.1-dev-nf4, t5-nf4, FLUX.1-dev-bnb-4bit, svdq-int4-...
_QUANTIZED_REPO = re.compile(
    r"(?i)(?:^|[-_/.])(?:nf4|fp4|int4|int8|fp8|4bit|8bit|bnb|gguf|svdq|awq|gptq|q[2-8]_k(?:_[sml])?|q[458]_[01])(?:$|[-_/.])"
)


def prequantized(info: ScriptInfo, component: ComponentLoad) -> str | None:
    """Why a component the script loads itself is already quantized (None: it is not, as far as the
    script shows): a quantization_config at load, a GGUF checkpoint, a Nunchaku (SVDQuant) class, or a
    repository whose name says it was saved quantized."""
    if component.call is None:
        return None
    if keyword_arg(component.call, "quantization_config") is not None:
        return "already quantized: it is loaded with a quantization_config"
    if component.class_name and re.search(r"(?i)nunchaku|svdq", component.class_name):
        return f"already quantized: {component.class_name} is a Nunchaku (SVDQuant) model"
    source = value_of(info, component.call.args[0].value) if component.call.args else None
    if isinstance(source, str) and source.lower().endswith(".gguf"):
        return "already quantized: it loads a GGUF checkpoint"
    if isinstance(source, str) and _QUANTIZED_REPO.search(source):
        return f"already quantized: {source} looks saved quantized (its name says so)"
    return None


def quantized_repo(model_id: str | None) -> bool:
    """Whether a pipeline repository's name says it was saved quantized."""
    return bool(model_id and _QUANTIZED_REPO.search(model_id))


def _constant(expr: cst.BaseExpression) -> str | int | float | None:
    if isinstance(expr, cst.SimpleString):
        return str(expr.evaluated_value)
    if isinstance(expr, cst.Integer):
        return int(expr.evaluated_value)
    if isinstance(expr, cst.Float):
        return float(expr.evaluated_value)
    return None


def nodes_of(node: cst.CSTNode, *types: type) -> list:
    """Every node of the given types inside ``node`` (itself included), in source order."""
    found: list = []

    class _Collect(cst.CSTVisitor):
        def on_visit(self, visited: cst.CSTNode) -> bool:
            if isinstance(visited, types):
                found.append(visited)
            return True

    node.visit(_Collect())
    return found


def called_name(call: cst.Call) -> str:
    """The name a call calls: ``enable_tiling`` for ``pipe.vae.enable_tiling()``, ``apply_x`` for ``apply_x(m)``."""
    func = call.func
    return func.attr.value if isinstance(func, cst.Attribute) else func.value if isinstance(func, cst.Name) else ""


def _settings(info: ScriptInfo, statement: cst.BaseStatement) -> frozenset[str]:
    """What a governed statement sets, by the calls in it: a plan field's name, or ``placement``."""
    found = set()
    for call in nodes_of(statement, cst.Call):
        func, name = call.func, called_name(call)
        if SETTING_OF_METHOD.get(name) == "layerwise_casting":  # a component's storage: the plan's if it names it
            receiver = func.value if isinstance(func, cst.Attribute) else call.args[0].value if call.args else func
            found.add(f"weights:{info.code(receiver).rsplit('.', 1)[-1]}")
        elif name in SETTING_OF_METHOD:
            found.add(SETTING_OF_METHOD[name])
        elif name in PLACEMENT or name in PIPE_METHODS or name in HOOK_FUNCTIONS or name in COMPONENT_METHODS:
            found.add("placement")
    return frozenset(found or {"placement"})


def _receiver_and_method(call: cst.Call, info: ScriptInfo) -> tuple[str, str] | None:
    if isinstance(call.func, cst.Attribute):
        return info.code(call.func.value), call.func.attr.value
    return None


def _managed_by(info: ScriptInfo, statement: cst.BaseStatement, pipes: set[str]) -> str | None:
    """The pipe whose plan governs ``statement``, if it is a statement the plan takes over."""
    if _is_release(statement):  # written after a placement (strategies.loading.RELEASE): it goes with it
        before = [c for c in info.creations if c.line < info.line_of(statement)]
        return max(before, key=lambda c: c.line).pipe if before else None
    if isinstance(statement, cst.If):
        branches, node = [], statement
        while node is not None:
            if not isinstance(node.body, cst.IndentedBlock):
                return None
            branches.append(node.body.body)
            orelse = node.orelse
            node = orelse if isinstance(orelse, cst.If) else None
            if isinstance(orelse, cst.Else):
                if not isinstance(orelse.body, cst.IndentedBlock):
                    return None
                branches.append(orelse.body.body)
        owners = {_managed_by(info, s, pipes) for body in branches for s in body}
        return owners.pop() if len(owners) == 1 and None not in owners else None
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    small = statement.body[0]
    if isinstance(small, cst.Expr) and isinstance(small.value, cst.Call):
        return _managed_call(info, small.value, pipes)
    if isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.value, cst.Call):
        target = info.code(small.targets[0].target)
        call = small.value
        # pipe = pipe.to("cuda")
        if target in pipes and _managed_call(info, call, pipes) == target:
            return target
        # pipe.transformer = torch.compile(pipe.transformer, ...)
        if info.code(call.func) == "torch.compile" and call.args and info.code(call.args[0].value) == target:
            owner = target.rsplit(".", 1)[0]
            return owner if owner in pipes else None
    return None


def _is_release(statement: cst.BaseStatement) -> bool:
    """Whether ``statement`` is the release of freed host memory a patch writes: an ``if`` whose calls are
    glibc's ``malloc_trim`` and what guards it (``platform.libc_ver``, ``ctypes.CDLL``)."""
    if not isinstance(statement, cst.If):
        return False
    names = {called_name(call) for call in nodes_of(statement, cst.Call)}
    return "malloc_trim" in names and names <= {"malloc_trim", "libc_ver", "CDLL"}


def _managed_call(info: ScriptInfo, call: cst.Call, pipes: set[str]) -> str | None:
    if isinstance(call.func, cst.Name) and call.func.value in HOOK_FUNCTIONS and call.args:
        owner = info.code(call.args[0].value).rsplit(".", 1)[0]
        return owner if owner in pipes else None
    found = _receiver_and_method(call, info)
    if found is None:
        return None
    receiver, method = found
    if receiver in pipes:
        if method in PLACEMENT:
            return receiver if placement_device(info, call) else None
        if method in PIPE_METHODS or method in ATTENTION_METHODS:
            return receiver
        return None
    owner, _, component = receiver.rpartition(".")
    if owner in pipes and method in COMPONENT_METHODS:
        if method in ("enable_tiling", "enable_slicing", "disable_tiling", "disable_slicing") and component != "vae":
            return None
        return owner
    return None


def _link_components(info: ScriptInfo, creation: Creation, index: _Index) -> None:
    """Components passed in as keyword arguments: where each one is loaded, or which pipe it comes from."""
    pipes = {c.pipe for c in info.creations}
    for arg in creation.loader.args:
        if arg.keyword is None or isinstance(arg.value, (cst.SimpleString, cst.Integer)):
            continue
        name = arg.keyword.value
        text = info.code(arg.value)
        owner = text.rsplit(".", 1)[0] if "." in text else None
        if owner in pipes:
            creation.components[name] = ComponentLoad(name, None, None, None, info.line_of(arg.value) or creation.line, shared_from=text)
            continue
        if isinstance(arg.value, cst.Name) and arg.value.value == "None":
            creation.components[name] = ComponentLoad(name, None, None, None, info.line_of(arg.value) or creation.line, absent=True)
            continue
        expr, statement = arg.value, creation.statement
        if isinstance(expr, (cst.Name, cst.Attribute)):  # transformer=transformer, transformer=self.transformer
            earlier = [(v, st) for line, v, st in index.bindings.get(text, []) if line <= creation.line]
            expr, statement = earlier[-1] if earlier else (None, None)
        expr = unchain(expr)[0] if expr is not None else None
        if not isinstance(expr, cst.Call) or not isinstance(expr.func, cst.Attribute) or expr.func.attr.value not in LOADERS:
            if name in ("transformer", "unet", "vae", "controlnet") or name.startswith(("text_encoder", "image_encoder")):
                creation.components[name] = ComponentLoad(name, None, None, None, creation.line)
            continue
        cls = qualified_class(info, expr.func.value)
        library, class_name = cls if cls else (None, None)
        creation.components[name] = ComponentLoad(name, library, class_name, expr, info.line_of(expr), statement=statement)
