import os
import sys
from pathlib import Path

import pytest

# No test may reach the network or a user's caches.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEFIT_CACHE_DIR", str(tmp_path / "pipefit-cache"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{kind: folder} of the tiny Flux/SDXL/Wan pipelines saved with weights (built once per session)."""
    import tiny_pipelines

    root = tmp_path_factory.mktemp("tiny")
    return {kind: tiny_pipelines.write(kind, root / kind) for kind in tiny_pipelines.KINDS}


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
