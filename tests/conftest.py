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
def builtin_cache(tmp_path_factory):
    """One pipefit cache for the whole session's full-size built-ins: their measurements and dry runs are the
    same answer in every module that asks, so each is computed once (the first asker runs it; the tests of
    caching itself keep their own folder)."""
    return tmp_path_factory.mktemp("builtin-cache")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{kind: folder} of the tiny Flux/SDXL/Wan pipelines saved with weights (built once per session)."""
    import tiny_pipelines

    root = tmp_path_factory.mktemp("tiny")
    return {kind: tiny_pipelines.write(kind, root / kind) for kind in tiny_pipelines.KINDS}


HUB_IDS = {
    "black-forest-labs/FLUX.1-dev": "flux", "black-forest-labs/FLUX.1-schnell": "flux",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl", "madebyollin/sdxl-vae-fp16-fix": "sdxl/vae",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan",
}  # fmt: skip


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory):
    """A Hugging Face cache holding tiny pipelines (VAEs at the real 8x scale) under real model ids."""
    import tiny_pipelines

    root = tmp_path_factory.mktemp("fake-hub")
    built = {kind: tiny_pipelines.write(kind, root / "built" / kind, full_scale_vae=True) for kind in tiny_pipelines.KINDS}
    cache = root / "hub"
    for repo, source in HUB_IDS.items():
        kind, _, sub = source.partition("/")
        entry = cache / f"models--{repo.replace('/', '--')}"
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text("0" * 40)
        (entry / "snapshots").mkdir()
        (entry / "snapshots" / ("0" * 40)).symlink_to(built[kind] / sub if sub else built[kind])
    return cache


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): xdist's own count (a worker per core), but none for the gpu tests,
    which share one GPU and each measure its peak memory; ``-n N`` on the command line still decides."""
    if "gpu" in (config.option.markexpr or "") and "not gpu" not in config.option.markexpr:
        return 0
    return None  # the next implementation: xdist's


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
