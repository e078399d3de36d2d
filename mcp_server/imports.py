"""Import the heavy libraries in the background while the server waits for its first request.

torch, diffusers' model classes and transformers' model base take 6-10 s to import on a 2-core machine:
most of a first measure_components or recommend. The server starts this thread when it starts serving,
and answers at once meanwhile (the tool list, the skill, triage_oom and patch_script need none of them).
A tool that imports them first waits for the stage it needs, so no two threads import the same modules
at once (CPython can refuse a concurrent circular import with a deadlock error).
"""

from __future__ import annotations

import importlib
import logging
import threading

logger = logging.getLogger(__name__)

# in order: detect_hardware needs the first stage only; measure and recommend need both
STAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "models": (
        "transformers.modeling_utils",
        "diffusers.models.autoencoders",  # each package imports all of its model classes
        "diffusers.models.transformers",
        "diffusers.models.unets",
        "diffusers.pipelines.pipeline_utils",
    ),
}
_done = {stage: threading.Event() for stage in STAGES}
_lock = threading.Lock()
_thread: threading.Thread | None = None
_enabled = False


def enable() -> None:
    """Let ``start`` run: only the server's own process (``serve``) does. A process that embeds the server
    (an in-memory client, a test) imports on its own schedule, never beside a thread it did not ask for."""
    global _enabled
    _enabled = True


def start() -> None:
    """Start the background imports once per process, if enabled (later calls do nothing)."""
    global _thread
    with _lock:
        if _enabled and _thread is None:
            _thread = threading.Thread(target=_import_all, name="pipefit-imports", daemon=True)
            _thread.start()


def wait(stage: str) -> None:
    """Return once ``stage`` (and those before it) is imported; at once if the imports were never started."""
    if _thread is not None:
        _done[stage].wait()


def _import_all() -> None:
    from pipefit.quiet import quiet_third_party_imports

    quiet_third_party_imports()
    for stage, modules in STAGES.items():
        try:
            for name in modules:
                importlib.import_module(name)
        except Exception:  # a broken or partial install: the tool that needs the module reports it itself
            logger.debug("background import of %s failed", stage, exc_info=True)
        finally:
            _done[stage].set()
