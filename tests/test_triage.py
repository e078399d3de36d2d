"""triage_oom on a corpus of real-format tracebacks and logs, each with the fields it must yield."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipefit.tools.triage import triage_oom

CORPUS = Path(__file__).parent / "fixtures" / "tracebacks"
REAL = Path(__file__).parent / "fixtures" / "real" / "tracebacks"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
_UNITS = {"bytes": 1, "MiB": 2**20, "GiB": 2**30}


def _bytes(value):
    """Expected sizes are written as torch prints them ("1.50 GiB"), in powers of 1024."""
    if not isinstance(value, str):
        return value
    number, unit = re.fullmatch(r"([\d.]+) (bytes|MiB|GiB)", value).groups()
    return int(float(number) * _UNITS[unit])


def test_corpus_is_large_and_every_file_has_expectations():
    files = {p.name for p in CORPUS.glob("*.txt")}
    assert len(files) >= 30 and files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_triage_reads_the_corpus(name):
    result = triage_oom((CORPUS / name).read_text(encoding="utf-8"))
    for field, expected in EXPECTED[name].items():
        if field == "advice_contains":
            advice = " ".join(result.advice)
            for fragment in expected:
                assert fragment in advice, f"{name}: {fragment!r} not in {result.advice}"
        elif field == "recommend_args" and expected is not None:
            assert result.recommend_args is not None, name
            for key, value in expected.items():
                got = result.recommend_args[key]
                assert got == value, name
        elif field.endswith("_bytes") and isinstance(expected, str):
            assert getattr(result, field) == pytest.approx(_bytes(expected), abs=1), f"{name}: {field}"
        else:
            assert getattr(result, field) == expected, f"{name}: {field}"
    if result.kind != "none":
        assert result.advice and result.error


def test_every_oom_says_what_to_run_next():
    for name, expected in EXPECTED.items():
        result = triage_oom((CORPUS / name).read_text(encoding="utf-8"))
        if result.kind in ("cuda_oom", "mps_oom", "host_oom", "alloc_failure"):
            assert "pipefit recommend" in result.advice[-1], name


SCRIPT = """
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

MODEL = "black-forest-labs/FLUX.1-dev"
STEPS = 28

def main():
    transformer = FluxTransformer2DModel.from_pretrained("someone/flux-finetune", subfolder="transformer")
    pipe = FluxPipeline.from_pretrained(MODEL, transformer=transformer, torch_dtype=torch.bfloat16).to("cuda")
    for prompt in ["a", "b"]:
        pipe(prompt, height=1024, width=768, num_inference_steps=STEPS, num_images_per_prompt=2)

if __name__ == "__main__":
    main()
"""


def test_script_gives_model_and_workload():
    result = triage_oom((CORPUS / "flux_denoise_torch2_5.txt").read_text(), script=SCRIPT)
    assert result.model_id == "black-forest-labs/FLUX.1-dev"  # the pipeline's id, not the component's
    # the script's call wins over the traceback's line; names are followed to their constants
    assert result.workload == {"height": 1024, "width": 768, "steps": 28, "batch": 2}
    args = result.recommend_args
    assert args["model"] == "black-forest-labs/FLUX.1-dev" and args["steps"] == 28
    assert args["vram"] == "23.52GiB"  # the text's total, rounded down: a size recommend parses
    assert "pipefit recommend black-forest-labs/FLUX.1-dev --height 1024 --width 768 --steps 28" in result.advice[-1]


def test_recommend_args_are_what_recommend_takes(fake_hub, monkeypatch):
    """The hand-off: recommend(**recommend_args) in Python, and the same dict as the MCP tool's arguments."""
    import anyio
    import huggingface_hub.constants
    from mcp import Client

    from pipefit.mcp_server.server import server
    from pipefit.tools.recommend import recommend

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub))
    script = SCRIPT.replace("num_images_per_prompt=2", "num_images_per_prompt=1").replace("1024, width=768", "256, width=256")
    args = triage_oom((CORPUS / "flux_denoise_torch2_5.txt").read_text(), script=script).recommend_args
    assert set(args) == {"model", "height", "width", "steps", "batch", "vram"}
    direct = recommend(**args, ram="64GiB")
    assert direct.workload.height == 256 and direct.workload.steps == 28 and direct.options
    assert 23.51 * 2**30 < direct.hardware.vram_bytes <= 23.52 * 2**30

    async def main():
        async with Client(server) as client:
            return await client.call_tool("recommend", {**args, "ram": "64GiB"})

    through_mcp = anyio.run(main)
    assert not through_mcp.is_error, through_mcp.content
    assert through_mcp.structured_content["workload"] == direct.workload.model_dump()


def test_unparsable_script_still_gives_the_model():
    broken = 'pipe = DiffusionPipeline.from_pretrained("stabilityai/sdxl-turbo"\nprint(('
    result = triage_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB.", script=broken)
    assert result.model_id == "stabilityai/sdxl-turbo"


def test_hub_cache_path_in_a_log_gives_the_model():
    log = (
        "Loading /home/ana/.cache/huggingface/hub/models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers/snapshots/abc/vae\n"
        "Killed\n"
    )
    result = triage_oom(log)
    assert result.kind == "host_oom" and result.model_id == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_empty_text_is_none():
    assert triage_oom("").kind == "none"


def _cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "pipefit", "triage", *args], input=stdin, capture_output=True, text=True
    )


def test_cli_reads_files_and_stdin(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    out = _cli(str(CORPUS / "sdxl_vae_decode.txt"), "--script", str(script), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["kind"] == "cuda_oom" and data["stage"] == "vae_decode"
    assert data["model_id"] == "black-forest-labs/FLUX.1-dev"
    table = _cli("-", stdin=(CORPUS / "multi_gpu_other_processes.txt").read_text())
    assert table.returncode == 0 and "cuda_oom" in table.stdout and "30.00 GiB" in table.stdout


def test_cli_missing_file_is_one_line():
    out = _cli("no-such-log.txt")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no-such-log.txt" in out.stderr


def test_every_signature_is_exercised_by_the_corpus():
    from pipefit.tools.triage import SIGNATURES

    texts = [p.read_text(encoding="utf-8") for p in (*CORPUS.glob("*.txt"), *REAL.glob("*.txt"))]
    for signature in SIGNATURES:
        assert any(re.search(signature.pattern, t, flags=re.M) for t in texts), signature.pattern
