"""Where a bench row was measured: the GPU, the machine, the library versions, the command."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipefit.tools.hardware import detect_hardware, installed_versions  # noqa: E402


def provenance() -> dict:
    """The fields every JSON line in bench/results carries, for the script now running."""
    gpus = detect_hardware().gpus
    return {
        "gpu": gpus[0].name if gpus else None,
        "machine": platform.machine(),
        "versions": {name: version for name, version in installed_versions().items() if version},
        "command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
    }
