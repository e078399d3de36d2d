"""The child side of run_trial: instrument a user's script without editing it, then run it.

run_trial starts ``python trial_runner.py SCRIPT ARGS...`` with $PIPEFIT_TRIAL holding a JSON
config. Only the standard library is imported here, so the runner works under whichever
interpreter the user's script needs, and nothing is imported before the script asks for it:

- when the script imports torch and a VRAM cap is set, the CUDA context is started, measured, and
  PyTorch's allocator is capped at the cap minus that context;
- when it imports diffusers, every pipeline class's ``__call__`` is wrapped so each call reports its
  start, the start of its denoising loop (``progress_bar``), each step (``callback_on_step_end``,
  chained after the user's own callback, with a device synchronize so the time is the step's), and
  its end.

Events go to a JSON-lines file, one per line, with ``time.monotonic()`` stamps; the parent reads it
while the script runs (progress) and after (timings, allocator peaks, the exception). The script's
own stdout and stderr are left alone.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import json
import os
import runpy
import sys
import time
import traceback

CONFIG_ENV = "PIPEFIT_TRIAL"


class Events:
    """Appends one JSON object per line and flushes it, so a killed child still leaves its events."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8", buffering=1)

    def emit(self, event: str, **fields) -> None:
        fields.update(event=event, t=time.monotonic())
        self._file.write(json.dumps(fields) + "\n")


class _ThenCall(importlib.abc.Loader):
    """A loader that runs ``callback(module)`` right after the real loader executed the module."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_data, get_resource_reader, ... stay the real loader's
        return getattr(self._loader, name)


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback once, right after a named module is first imported, wherever it comes from."""

    def __init__(self, callbacks: dict):
        self._callbacks = dict(callbacks)

    def find_spec(self, name, path=None, target=None):
        callback = self._callbacks.pop(name, None)
        if callback is None:
            return None
        spec = importlib.util.find_spec(name)  # the other finders; ours no longer answers for name
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, callback)
        return spec


def _torch():
    return sys.modules.get("torch")


def _cuda_ready() -> bool:
    torch = _torch()
    return torch is not None and torch.cuda.is_initialized()


def allocator_peaks() -> dict:
    """PyTorch's own peak counters on the current device since the current pipeline call began (since
    the start before the first call), or {} where CUDA never started."""
    if not _cuda_ready():
        return {}
    torch = _torch()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def _reset_peaks() -> None:
    if _cuda_ready():
        _torch().cuda.reset_peak_memory_stats()


def cap_vram(events: Events, cap_bytes: int, others_bytes: int, nvml_index: int | None = None) -> None:
    """Make GPU 0 behave like a card of ``cap_bytes``: PyTorch may reserve the cap minus the context.

    The context is this process's device memory as NVML lists it (GPU ``nvml_index``) less what the
    allocator reserved; where NVML cannot list it, what the device gained beyond ``others_bytes``, what
    other processes held before this one started (the parent's reading; memory a process that just
    ended is still returning makes that figure low, hence NVML first).
    """
    torch = _torch()
    if not torch.cuda.is_available():
        events.emit("cap", error="no CUDA device is visible to the script: the VRAM cap cannot apply")
        return
    device = torch.device("cuda", torch.cuda.current_device())
    torch.empty(1, device=device)  # starts the context and the allocator
    free, total = torch.cuda.mem_get_info(device)
    own = _own_device_bytes(nvml_index)
    if own is not None:  # NVML's figure for this process: the context plus what the allocator reserved
        context = max(0, own - torch.cuda.memory_reserved(device))
    else:  # NVML cannot name this process (a container's PID namespace): the device's growth since the start
        context = max(0, total - free - others_bytes - torch.cuda.memory_reserved(device))
    budget = cap_bytes - context
    if budget <= 0 or cap_bytes > total:
        events.emit("cap", error="cap outside the device", context_bytes=context, total_bytes=total)
        raise SystemExit(
            f"pipefit: the VRAM cap {cap_bytes} B cannot be simulated on this {total} B device "
            f"(the CUDA context alone takes {context} B)."
        )
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    events.emit("cap", context_bytes=context, total_bytes=total, allocator_bytes=budget, device=device.index)


def _own_device_bytes(nvml_index: int | None) -> int | None:
    """This process's device memory on GPU ``nvml_index`` as NVML lists it, or None (no NVML, not listed)."""
    if nvml_index is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no nvidia-ml-py under this interpreter, no driver library: the other way
        return None
    return mine[0] if mine and mine[0] is not None else None


class PipelineTracer:
    """Wraps diffusers pipelines' ``__call__`` and ``progress_bar`` to report calls, loops and steps."""

    def __init__(self, events: Events):
        self._events = events
        self._depth = 0  # a pipeline calling another (or super().__call__) is one call

    def install(self, pipeline_utils) -> None:
        base = pipeline_utils.DiffusionPipeline
        tracer = self
        own = base.__dict__.get("__init_subclass__")

        def __init_subclass__(cls, **kwargs):
            if own is not None:
                own.__func__(cls, **kwargs)
            else:
                super(base, cls).__init_subclass__(**kwargs)
            tracer.wrap_call(cls)

        base.__init_subclass__ = classmethod(__init_subclass__)
        progress_bar = base.progress_bar

        @functools.wraps(progress_bar)
        def traced_progress_bar(pipe, iterable=None, total=None):
            if tracer._depth == 1:
                _synchronize()
                steps = total if total is not None else _length(iterable)
                tracer._events.emit("loop_start", total=steps)
            return progress_bar(pipe, iterable=iterable, total=total)

        base.progress_bar = traced_progress_bar

    def wrap_call(self, cls) -> None:
        call = cls.__dict__.get("__call__")
        if call is None or getattr(call, "_pipefit_traced", False):
            return
        try:
            takes_callback = "callback_on_step_end" in inspect.signature(call).parameters
        except (TypeError, ValueError):
            takes_callback = False
        tracer = self

        @functools.wraps(call)
        def traced_call(pipe, *args, **kwargs):
            if tracer._depth:
                return call(pipe, *args, **kwargs)
            tracer._depth += 1
            # The peaks so far (loading, earlier calls) go out before the counters restart for this call.
            tracer._events.emit(
                "call_start", pipeline=type(pipe).__name__, callbacks=takes_callback,
                allocator=os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default", **allocator_peaks()
            )
            _reset_peaks()
            ok = False
            try:
                if takes_callback:
                    tracer._add_step_callback(kwargs)
                result = call(pipe, *args, **kwargs)
                ok = True
                return result
            finally:
                tracer._depth -= 1
                if ok:
                    _synchronize()
                tracer._events.emit("call_end", ok=ok, **allocator_peaks())

        traced_call._pipefit_traced = True
        cls.__call__ = traced_call

    def _add_step_callback(self, kwargs: dict) -> None:
        theirs = kwargs.get("callback_on_step_end")
        # A PipelineCallback tells the pipeline which tensors it wants; a plain function cannot.
        if getattr(theirs, "tensor_inputs", None) and "callback_on_step_end_tensor_inputs" not in kwargs:
            kwargs["callback_on_step_end_tensor_inputs"] = theirs.tensor_inputs
        events = self._events

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if theirs is not None:
                callback_kwargs = theirs(pipe, step, timestep, callback_kwargs)
            _synchronize()
            events.emit("step", index=int(step), **allocator_peaks())
            return callback_kwargs

        kwargs["callback_on_step_end"] = on_step_end


def _synchronize() -> None:
    if _cuda_ready():
        _torch().cuda.synchronize()


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def _print_user_traceback(exc: BaseException, script: str) -> None:
    """The traceback as ``python script.py`` would print it: the runner's frames left out."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1, as Python does
    return 1


def _join_cgroup(group: str | None) -> str | None:
    """Move this process into the trial's cgroup: "joined", the reason it could not, or None (none made)."""
    if not group:
        return None
    try:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        return f"not joined: {exc.strerror}"
    return "joined"


def main() -> int:
    config = json.loads(os.environ.pop(CONFIG_ENV))
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    # As `python script.py` would have it: the script's folder first on the path, not this one's.
    sys.path[0] = os.path.dirname(os.path.abspath(config.get("import_dir") or script))
    joined = _join_cgroup(config.get("cgroup"))  # first: whatever the script starts is born inside it
    events = Events(config["events"])
    hooks = {"diffusers.pipelines.pipeline_utils": PipelineTracer(events).install}
    if config.get("vram_cap_bytes"):
        hooks["torch"] = lambda _: cap_vram(
            events, config["vram_cap_bytes"], config.get("others_bytes") or 0, config.get("nvml_index")
        )
    sys.meta_path.insert(0, AfterImport(hooks))
    events.emit("start", pid=os.getpid(), cgroup=joined)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        events.emit("exception", type=type(exc).__name__, message=str(exc)[:4000], traceback="".join(lines)[-20000:])
        _print_user_traceback(exc, script)
        code = 1
    finally:
        sys.stdout.flush()
        events.emit("end", exit_code=code, **allocator_peaks())
    return code


if __name__ == "__main__":
    sys.exit(main())
