"""Find a diffusers pipeline's configs from what a user typed: a folder, a built-in example, a hub id.

Whatever MODEL is, it ends as a local folder holding ``model_index.json`` and one subfolder per
component with its config (weights optional), and the model card where there is one. Hub ids go
through huggingface_hub: the local cache first, then, when online, a metadata-only download (JSON
files and the card, never weights).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import PipefitError

EXAMPLES_DIR = Path(__file__).parent / "examples"
BUILTIN_PREFIX = "builtin:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What a metadata-only hub download fetches: configs and shard indexes, never weights.
_METADATA_PATTERNS = [
    "model_index.json", "*/config.json", "*/scheduler_config.json", "*.safetensors.index.json",
    "*/tokenizer_config.json",  # the dry run pads text as the tokenizer does: its model_max_length
    "README.md",  # the model card: its example call says how the model is run (tools/model_card.py)
]  # fmt: skip


@dataclass(frozen=True)
class ComponentSource:
    """One entry of model_index.json."""

    name: str
    library: str | None
    class_name: str | None
    folder: Path


@dataclass(frozen=True)
class PipelineSource:
    model: str  # what the user asked for, for messages and reports
    root: Path
    pipeline_class: str
    components: list[ComponentSource]


def builtin_examples() -> list[str]:
    """Names of the configs-only full-size pipelines shipped with pipefit (``builtin:NAME``)."""
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if (p / "model_index.json").is_file())


def builtin_hub_id(model: str) -> str | None:
    """The Hub repository a built-in's configs were written from (``_hub_id`` in its model_index.json):
    the id a user's code loads."""
    name = model.removeprefix(BUILTIN_PREFIX)
    index = EXAMPLES_DIR / name / "model_index.json"
    if not model.startswith(BUILTIN_PREFIX) or not index.is_file():
        return None
    return json.loads(index.read_text()).get("_hub_id")


def resolve_pipeline(model: str, progress: Callable[[str], None] | None = None) -> PipelineSource:
    """Turn MODEL into a local folder with model_index.json, or raise PipefitError naming the fix."""
    if not model.strip():
        raise PipefitError("`model` is empty.", "Give a hub id, a local diffusers folder or builtin:NAME.")
    return read_pipeline_folder(model, _locate(model, progress))


def read_pipeline_folder(model: str, root: Path) -> PipelineSource:
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise PipefitError(
            f"{root} is not a diffusers pipeline folder: it has no model_index.json.",
            "Point at the folder that holds model_index.json (the one `save_pretrained` wrote).",
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise PipefitError(f"{index_file} is not valid JSON ({exc}).", "Restore the file from the model's repository.")
    components = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue  # _class_name, _diffusers_version, and plain options such as force_zeros_for_empty_prompt
        library, class_name = entry
        components.append(ComponentSource(name, library, class_name, root / name))
    return PipelineSource(model, root, index.get("_class_name", "DiffusionPipeline"), components)


def _locate(model: str, progress: Callable[[str], None] | None) -> Path:
    if model.startswith(BUILTIN_PREFIX):
        name = model[len(BUILTIN_PREFIX) :]
        folder = EXAMPLES_DIR / name
        if not (folder / "model_index.json").is_file():
            raise PipefitError(
                f"There is no built-in example {name!r}.", f"Built-in examples: {', '.join(builtin_examples())}."
            )
        return folder

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PipefitError(f"{model} is a file, not a pipeline folder.", "Pass the folder holding model_index.json.")
        return _snapshot_of_cache_entry(path) if path.name.startswith("models--") else path

    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise PipefitError(
            f"No such folder: {model}.",
            f"Give a local diffusers folder, a hub id such as black-forest-labs/FLUX.1-dev, "
            f"or a built-in example ({', '.join(BUILTIN_PREFIX + n for n in builtin_examples())}).",
        )
    return _hub_metadata(model, progress)


def _snapshot_of_cache_entry(entry: Path) -> Path:
    """``~/.cache/huggingface/hub/models--org--name`` -> the snapshot its ``main`` ref points at."""
    ref = entry / "refs" / "main"
    snapshots = entry / "snapshots"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    if not candidates:
        raise PipefitError(f"{entry} is a hub cache entry without snapshots.", "Download the model again.")
    return candidates[-1]


def _hub_metadata(repo_id: str, progress: Callable[[str], None] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # the cache first: works offline, and for models the user already has
        return Path(snapshot_download(repo_id, allow_patterns=_METADATA_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise PipefitError(
            f"{repo_id} is not in the local Hugging Face cache and the hub is unreachable (HF_HUB_OFFLINE is set).",
            f"Unset HF_HUB_OFFLINE, or fetch its configs first with "
            f"`hf download {repo_id} --include '*.json'`, or pass a local folder.",
        )
    if progress:
        progress(f"Fetching the configs of {repo_id} from the hub (no weights)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_METADATA_PATTERNS))
    except GatedRepoError:
        raise PipefitError(
            f"{repo_id} is gated on the hub.", "Accept its license on the model page, then run `hf auth login`."
        )
    except RepositoryNotFoundError:
        raise PipefitError(f"No model {repo_id} on the hub.", "Check the spelling, or log in if it is private.")
    except Exception as exc:  # connection errors come in many types across huggingface_hub versions
        raise PipefitError(
            f"Could not fetch the configs of {repo_id} from the hub ({type(exc).__name__}: {exc}).",
            "Check the network, or pass a local folder.",
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
