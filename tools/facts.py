"""Facts read from the installed diffusers, kept on disk per version of it.

recommend's rules and step-cache model ask diffusers small questions (which attention backends it
names, which modules TaylorSeer hooks, whether a pipeline enters ``cache_context``) for hundreds of
plans. Answering them imports diffusers, which takes seconds (about 10 s for a model class on a
2-core machine) and would make every cached recommendation as slow as a new one. Each answer is a
pure function of the installed diffusers, so it is computed once and kept beside the measurements.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_SCHEMA = 1
_loaded: dict[Path, dict[str, Any]] = {}


def _path() -> Path:
    from .measure import cache_dir

    return cache_dir() / "facts" / f"v{_SCHEMA}-{_versions()}.json"


@functools.cache
def _versions() -> str:
    return "-".join(f"{p}{importlib.metadata.version(p)}" for p in ("diffusers", "torch"))


def _facts(path: Path) -> dict[str, Any]:
    if path not in _loaded:
        try:
            _loaded[path] = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or a torn file: ask diffusers again
            _loaded[path] = {}
    return _loaded[path]


def library_fact(fn: F) -> F:
    """Memoize ``fn`` (JSON arguments, a JSON result) per installed diffusers, on disk and in memory."""

    @functools.wraps(fn)
    def wrapper(*args):
        path = _path()
        facts = _facts(path)
        key = f"{fn.__module__}.{fn.__qualname__}{json.dumps(args)}"
        if key not in facts:
            facts[key] = json.loads(json.dumps(fn(*args)))  # as the file gives it back: tuples become lists
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(facts, sort_keys=True))
            temporary.replace(path)  # whole or not at all: processes racing write the same facts
        return facts[key]

    return wrapper  # type: ignore[return-value]
