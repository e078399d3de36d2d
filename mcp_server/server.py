"""pipefit's tools for agents, over MCP (the official Python SDK's MCPServer).

Each tool translates its arguments, calls the tools/ function in a worker thread (they block: file
reads, child processes) and returns that function's pydantic model as structured output. Errors a
user can cause (PipefitError, invalid values) come back as tool errors that name the fix; progress
messages become progress notifications; cancelling run_trial stops its child process tree.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import ToolAnnotations
from pydantic import ConfigDict, Field, ValidationError

from pipefit.tools.errors import PipefitError, invalid_input
from pipefit.tools.estimate import Batch, Frames, GuidanceScale, Height, Steps, Width
from pipefit.tools.hardware import HardwareReport
from pipefit.tools.measure import PipelineMeasurement
from pipefit.tools.patch import PatchResult
from pipefit.tools.recommend import Recommendation
from pipefit.tools.skills import skill_dir, skill_files
from pipefit.tools.triage import OomTriage
from pipefit.tools.trial import TrialResult

from . import imports

T = TypeVar("T")
logger = logging.getLogger(__name__)
Dtype = Literal["bfloat16", "float16", "float32"]
CANCEL_GRACE_S = 30.0  # how long a cancelled run_trial may take to stop its processes

INSTRUCTIONS = """\
pipefit makes a Hugging Face diffusers pipeline fit the GPU and host it runs on, by measurement.
The loop: triage_oom (a traceback) -> detect_hardware -> measure_components (the model) -> recommend
(every strategy, predicted; show the user the best of each group and ask what matters) ->
patch_script (the chosen plan, as a diff) -> run_trial (prove it). When a trial runs out of memory
or misses the prediction, call recommend again with what it measured. The skill's docs are the
skill://pipefit/ resources; the fix-oom prompt starts the loop from a traceback."""

_TOOLS: list[Tool] = []


class _StrictTool(Tool):
    """A tool whose input schema admits only its own arguments (a misspelt ``heigth`` is an error,
    not a silent default) and whose argument errors are one line naming the argument as sent."""

    async def run(self, arguments: dict[str, Any], context: Context, convert_result: bool = False) -> Any:
        try:
            self.fn_metadata.validate_arguments(arguments)
        except ValidationError as exc:
            problem = invalid_input(exc, known=self.parameters.get("properties", {}))
            raise ToolError(f"Error executing tool {self.name}: {problem}") from None  # as the SDK words its own
        return await super().run(arguments, context, convert_result)


def _tool(*, title: str, read_only: bool = True, idempotent: bool = True, open_world: bool = False, destructive: bool = False):
    """Register an async tool with its docstring, dedented, as the description agents read."""

    def register(fn):
        annotations = ToolAnnotations(
            title=title, read_only_hint=read_only, destructive_hint=destructive if not read_only else None,
            idempotent_hint=idempotent, open_world_hint=open_world,
        )  # fmt: skip
        tool = _StrictTool.from_function(fn, title=title, description=inspect.cleandoc(fn.__doc__), annotations=annotations)
        loose = tool.fn_metadata.arg_model
        strict = type(loose.__name__, (loose,), {"model_config": ConfigDict(**{**loose.model_config, "extra": "forbid"})})
        tool.fn_metadata.arg_model = strict
        tool.parameters = strict.model_json_schema(by_alias=True)  # with additionalProperties: false
        _TOOLS.append(tool)
        return fn

    return register


async def _call(
    ctx: Context | None,
    fn: Callable[..., T],
    *args: Any,
    cancel: threading.Event | None = None,
    imported: str | None = None,
    **kwargs: Any,
) -> T:
    """Run a blocking tools/ function in a worker thread. Its progress messages are sent as progress
    notifications; its user errors are raised as tool errors. With ``cancel``, a cancelled request
    sets it and waits (shielded) for the function to clean up before the cancellation goes on. With
    ``imported``, the worker first waits for that stage of the background imports (imports.STAGES)."""
    counter = itertools.count(1)

    def progress(message: str) -> None:
        if ctx is None:
            return
        with contextlib.suppress(Exception):  # the request is gone (cancelled, closed): progress no longer matters
            anyio.from_thread.run(functools.partial(ctx.report_progress, next(counter), None, message))

    if "progress" in inspect.signature(fn).parameters:
        kwargs["progress"] = progress
    if cancel is not None:
        kwargs["cancel"] = cancel
    finished = threading.Event()

    def work() -> T:
        try:
            if imported:
                imports.wait(imported)
            return fn(*args, **kwargs)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(work, abandon_on_cancel=cancel is not None)
    except anyio.get_cancelled_exc_class():
        if cancel is not None:
            cancel.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait, CANCEL_GRACE_S)
        raise
    except PipefitError as exc:
        raise ToolError(str(exc)) from None
    except ValidationError as exc:
        raise ToolError(str(invalid_input(exc))) from None
    except Exception as exc:  # a bug in pipefit: say what, keep serving, leave the traceback on stderr
        logger.exception("%s failed", getattr(fn, "__name__", "a tool"))
        raise ToolError(
            f"pipefit failed unexpectedly ({type(exc).__name__}: {exc}). This is a bug in pipefit; the server's "
            "stderr has the traceback. Try the CLI equivalent, or report it."
        ) from None


@_tool(title="Detect the machine")
async def detect_hardware(
    bandwidth: Annotated[bool, Field(description="also time host-to-GPU copies (about 1 s; offloading speed)")] = False,
) -> HardwareReport:
    """The GPUs (total, free and used memory, memory other processes hold, compute capability,
    bf16 / fp8 / flash-attention support), host RAM with its container limit, and the installed
    stack (torch, diffusers, bitsandbytes, torchao, attention packages). Works without a GPU.

    Call it before recommend, which plans for the free VRAM and usable RAM it reports.
    """
    from pipefit.tools.hardware import detect_hardware as run

    return await _call(None, run, bandwidth=bandwidth, imported="torch")


@_tool(title="Measure a pipeline's components", open_world=True)  # a hub id reads the Hub
async def measure_components(
    model: Annotated[str, Field(description="hub id, local diffusers folder, hub cache entry, or builtin:NAME")],
    ctx: Context,
    dtype: Dtype = "bfloat16",
    refresh: Annotated[bool, Field(description="measure again instead of answering from the cache")] = False,
) -> PipelineMeasurement:
    """Exact bytes of every component of a diffusers pipeline, from its configs and weight headers,
    never loading weights: parameters, bytes at dtype, repeated blocks, the groups block-level
    group offloading makes, the largest layer, bytes after fp8 layerwise casting and after bnb nf4,
    bnb int8 and torchao int8. A hub id is read from the Hugging Face cache when offline;
    builtin:flux1-dev, builtin:sdxl-base and builtin:wan2.1-t2v-1.3b ship with pipefit.

    Next: recommend (it measures on its own; call this to show the user the components).
    """
    from pipefit.tools.measure import measure_components as run

    return await _call(ctx, run, model, dtype=dtype, cache=not refresh, imported="models")


@_tool(title="Recommend a strategy", open_world=True)  # a hub id reads the Hub
async def recommend(
    model: Annotated[str, Field(description="as for measure_components")],
    ctx: Context,
    height: Height = 1024,
    width: Width = 1024,
    frames: Frames | None = None,
    steps: Annotated[Steps | None, Field(description="omit for the model card's example's, else 28")] = None,
    batch: Batch = 1,
    guidance_scale: GuidanceScale | None = None,
    gpu: Annotated[str | None, Field(description="plan for this card, e.g. 'RTX 4090' (its memory unless vram)")] = None,
    vram: Annotated[str | None, Field(description="plan for this much GPU memory, e.g. '16GiB'")] = None,
    ram: Annotated[str | None, Field(description="plan for this much host RAM, e.g. '64GiB'")] = None,
    prefer: Literal["speed", "memory", "quality", "balanced"] = "balanced",
    plan: Annotated[dict | str | None, Field(description="evaluate only this plan (JSON object)")] = None,
    dtype: Dtype = "bfloat16",
    calls: Annotated[int, Field(ge=1, le=100_000, description="calls one process makes: compiling pays off only over several")] = 1,
) -> Recommendation:
    """Every strategy for the pipeline at this workload: predicted peak VRAM (as the driver sees it),
    RAM while loading and while running, seconds per call; whether each fits and why not; ranked by
    prefer, fitting options first. group separates full-precision plans (offloading, fp8 casting)
    from quantized ones and from cached ones (a step cache: faster, and the image changes, as their
    reasons say): present the best of each group with their figures and ask the user what
    matters (speed, memory, quality). Without vram/ram it plans for this machine's free memory.
    Each option's plan is the JSON patch_script and run_trial take; predictions are derived from a dry
    run of the pipeline's own code, and basis says whether this family and kind of plan also ran on a
    GPU. guidance says how the pipeline runs CFG at this workload; from_card, which of steps and
    guidance_scale (left out) came from the model card's example. margin_bytes is kept free.

    Next: patch_script with the chosen option's plan.
    """
    from pipefit.tools.recommend import recommend as run

    def work(progress: Callable[[str], None]) -> Recommendation:
        return run(
            model, height=height, width=width, frames=frames, steps=steps, batch=batch, guidance_scale=guidance_scale,
            vram=vram, ram=ram, prefer=prefer, plan=plan, dtype=dtype, gpu=gpu, calls=calls, progress=progress,
        )  # fmt: skip

    return await _call(ctx, work, imported="models")


@_tool(title="Patch a script to apply a plan", read_only=False, destructive=True)
async def patch_script(
    script: Annotated[str, Field(description="path of the user's Python script")],
    plan: Annotated[dict | str, Field(description="a plan from recommend (JSON object)")],
    output: Annotated[
        str | None, Field(description="write the patched script here (relative: beside the script); omit to write nothing")
    ] = None,
    overwrite: Annotated[
        bool, Field(description="replace output if it exists; replacing the script itself keeps SCRIPT.bak")
    ] = False,
    replace: Annotated[
        bool, Field(description="make the plan complete: drop the script's own settings the plan leaves unset")
    ] = False,
) -> PatchResult:
    """Rewrite the user's script on its syntax tree so it applies the plan: quantization configs,
    offloading, fp8 casting, VAE tiling, compile. Additive: the script's own settings the plan leaves
    unset (VAE tiling, compile, attention, fp8 casting of other components) stay; replace drops them.
    Returns the new source, a unified diff and the edits in words (every removal named). Writes nothing unless output is given (show the diff to the user first; write
    to a new file unless they ask to replace theirs). An existing output is refused unless overwrite
    is true; replacing the script itself keeps SCRIPT.bak. Refuses, writing nothing, when the script
    does not parse, builds no pipeline, or the plan breaks a compatibility rule; the message says which.

    Next: run_trial with the script and the plan (or the written output) to prove it.
    """
    from pipefit.tools.patch import patch_script as run

    return await _call(None, run, script, plan, output=output, overwrite=overwrite, replace=replace)


@_tool(title="Run a trial", read_only=False, idempotent=False, destructive=True, open_world=True)  # the user's code
async def run_trial(
    script: Annotated[str, Field(description="path of the Python script to run")],
    ctx: Context,
    plan: Annotated[dict | str | None, Field(description="apply this plan to a copy first")] = None,
    replace: Annotated[bool, Field(description="as patch_script's: the plan complete, the script's own settings dropped")] = False,
    args: Annotated[list[str], Field(description="the script's command-line arguments")] = [],  # noqa: B006
    vram_cap: Annotated[str | None, Field(description="simulate a smaller NVIDIA GPU, e.g. '12GiB'")] = None,
    ram_cap: Annotated[
        str | None, Field(description="stop the run past this much held RAM (mapped weight files not counted), e.g. '32GiB'")
    ] = None,
    timeout: Annotated[float, Field(gt=0, description="seconds before the run is stopped")] = 1800,
    cwd: Annotated[str | None, Field(description="working folder (default: the server's)")] = None,
) -> TrialResult:
    """Run the script (or the plan applied to a copy; the user's file is never modified) in a child
    process and measure it: peak VRAM as the driver sees it, PyTorch's peaks, peak RAM while loading
    and running, seconds per call and per step. Outcome: ok, cuda_oom (with the triage), host_oom,
    timeout, cancelled or error. Runs the user's code: it may take minutes and uses the GPU.
    Cancelling the request stops the script and every process it started.

    Next: compare with recommend's prediction; on an OOM or a miss, recommend again with a smaller
    vram or ram, or pick the next option.
    """
    from pipefit.tools.trial import run_trial as run

    return await _call(
        ctx, run, script, plan, replace=replace, args=list(args), vram_cap=vram_cap, ram_cap=ram_cap, timeout=timeout, cwd=cwd,
        cancel=threading.Event(),
    )  # fmt: skip


@_tool(title="Triage an out-of-memory error")
async def triage_oom(
    text: Annotated[str, Field(description="the traceback or log, as pasted")],
    script: Annotated[str | None, Field(description="the failing script's source, for the model and sizes")] = None,
    script_path: Annotated[str | None, Field(description="or the path of that script")] = None,
) -> OomTriage:
    """Read an out-of-memory traceback or log (CUDA, MPS, host RAM, the OOM killer, incompatible
    strategies): what failed, in which stage (load, text encoding, denoising, VAE decode), which
    component, the sizes it names (tried to allocate, free, reserved, other processes), the
    shortfall, and the model id and workload found in the script. advice says what to try.

    Next: detect_hardware, then recommend with the model and workload it found.
    """
    from pipefit.tools.files import read_user_text
    from pipefit.tools.triage import triage_oom as run

    def work():  # in a worker thread: a slow or odd file never holds the server
        source = script if script is not None or script_path is None else read_user_text(script_path, "script", errors="replace")
        return run(text, script=source)

    return await _call(None, work)


@contextlib.asynccontextmanager
async def _lifespan(_server: MCPServer):
    imports.start()  # once the transport is up (stdio: fd 1 already points at stderr), not at import
    yield {}


server = MCPServer("pipefit", instructions=INSTRUCTIONS, log_level="WARNING", tools=_TOOLS, lifespan=_lifespan)


def _register_skill_resources() -> None:
    """Each file of the skill as skill://pipefit/PATH, read from disk when asked."""
    root = skill_dir()
    for name in skill_files():
        path = root / name
        mime = "text/markdown" if name.endswith(".md") else "text/plain"
        description = "pipefit's skill: the loop, the tools, how to present options" if name == "SKILL.md" else None
        server.resource(f"skill://pipefit/{name}", name=f"pipefit/{name}", mime_type=mime, description=description)(
            _reader(path)
        )


def _reader(path: Path) -> Callable[[], str]:
    def read() -> str:
        return path.read_text(encoding="utf-8")

    return read


_register_skill_resources()


@server.prompt(name="fix-oom", title="Fix a diffusers out-of-memory error")
def fix_oom(traceback: str, script: str = "", script_path: str = "") -> str:
    """Start pipefit's loop from a pasted traceback and the script that raised it."""
    where = f"The script is at {script_path}." if script_path else ""
    source = f"\n\nThe script:\n```python\n{script}\n```" if script else ""
    return f"""My diffusers pipeline ran out of memory. {where}

The traceback:
```
{traceback}
```{source}

Fix it with the pipefit tools, in this order:
1. triage_oom with the traceback (and the script) to learn what failed, where and by how much.
2. detect_hardware for this machine's free VRAM and RAM.
3. recommend for the model and workload the triage found (ask me if it found none).
4. Show me the best full-precision and the best quantized options with their predicted VRAM, RAM
   and time, say which you would pick, and ask me what matters most before going on.
5. patch_script with the chosen plan: show me the diff; write a new file, not over mine.
6. run_trial with the plan to prove it fits; if it does not, recommend again with what it measured."""
