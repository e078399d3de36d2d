"""measure_components against really loaded components, full-size configs, and a user's mistakes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pipefit.tools.errors import PipefitError
from pipefit.tools.measure import measure_components
from pipefit.tools.sizes import module_bytes, param_count

KINDS = ("flux", "sdxl", "wan")


def _load(folder, dtype=torch.bfloat16):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, dtype=dtype)


def _configs_only(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sizes_equal_the_loaded_components(tiny_dirs, kind, dtype):
    pipe = _load(tiny_dirs[kind], getattr(torch, dtype))
    result = measure_components(str(tiny_dirs[kind]), dtype=dtype)
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert {n for n, c in result.components.items() if c.bytes is not None} == set(modules)
    for name, module in modules.items():
        measured = result.components[name]
        assert measured.params == param_count(module), name
        assert measured.bytes == module_bytes(module), name
        assert measured.checkpoint.params >= measured.params  # tied weights are stored once or twice
    assert result.total_bytes == sum(module_bytes(m) for m in modules.values())
    assert result.components["tokenizer"].bytes is None  # listed, not sized


@pytest.mark.parametrize("kind", KINDS)
def test_configs_alone_give_the_same_sizes(tiny_dirs, tmp_path, kind):
    with_weights = measure_components(str(tiny_dirs[kind]))
    configs = measure_components(str(_configs_only(tiny_dirs[kind], tmp_path / kind)))
    for name, comp in with_weights.components.items():
        assert configs.components[name].model_dump(exclude={"checkpoint"}) == comp.model_dump(exclude={"checkpoint"})
        assert configs.components[name].checkpoint is None


def test_in_memory_pipeline_matches_its_folder(tiny_dirs):
    pipe = _load(tiny_dirs["flux"])
    from_object = measure_components(pipe)
    from_folder = measure_components(str(tiny_dirs["flux"]))
    assert from_object.total_bytes == from_folder.total_bytes
    assert from_object.components["transformer"].quantized_bytes == from_folder.components["transformer"].quantized_bytes
    assert not from_object.warnings


def test_missing_tokenizer_folder_is_not_an_error(tiny_dirs, tmp_path):
    folder = _configs_only(tiny_dirs["flux"], tmp_path / "flux")
    shutil.rmtree(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer_2")
    assert measure_components(str(folder)).components["transformer"].bytes > 0


def test_null_components_are_skipped(tiny_dirs, tmp_path):
    folder = _configs_only(tiny_dirs["sdxl"], tmp_path / "sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["image_encoder"] == [None, None]  # as save_pretrained writes optional components
    assert "image_encoder" not in measure_components(str(folder)).components


# Published parameter counts of the full-size architectures (model cards / papers).
PUBLISHED = {
    ("flux1-dev", "transformer"): 11.90e9, ("flux1-dev", "text_encoder_2"): 4.76e9,
    ("flux1-dev", "text_encoder"): 123.06e6, ("sdxl-base", "unet"): 2.567e9,
    ("sdxl-base", "text_encoder_2"): 694.7e6, ("wan2.1-t2v-1.3b", "transformer"): 1.42e9,
    ("wan2.1-t2v-1.3b", "text_encoder"): 5.68e9,
    # the families added with the dry run (model cards and the published configs)
    ("flux1-schnell", "transformer"): 11.891e9, ("sd3.5-medium", "transformer"): 2.243e9,
    ("sd3.5-large", "transformer"): 8.057e9, ("sd3.5-large", "text_encoder_3"): 4.762e9,
    ("wan2.1-t2v-14b", "transformer"): 14.289e9, ("wan2.2-t2v-a14b", "transformer_2"): 14.289e9,
    ("wan2.2-ti2v-5b", "transformer"): 5.000e9, ("qwen-image", "transformer"): 20.43e9,
    ("qwen-image", "text_encoder"): 8.292e9, ("z-image-turbo", "transformer"): 6.155e9,
    ("z-image-turbo", "text_encoder"): 4.022e9, ("hunyuanvideo-1.5", "transformer"): 8.327e9,
    ("ltx-video", "transformer"): 1.923e9, ("cogvideox-5b", "transformer"): 5.570e9,
    ("chroma", "transformer"): 8.900e9, ("flux2-klein-4b", "transformer"): 3.876e9,
}  # fmt: skip


@pytest.mark.parametrize("example", sorted({name for name, _ in PUBLISHED}))
def test_full_size_examples(example):
    result = measure_components(f"builtin:{example}")
    for (ex, comp), params in PUBLISHED.items():
        if ex == example:
            assert result.components[comp].params == pytest.approx(params, rel=1e-3), comp
    for comp in result.components.values():
        if comp.bytes is not None:
            assert sum(comp.block_offload_groups_bytes) == comp.bytes


def test_flux_full_size_figures_match_the_class_defaults():
    """FluxTransformer2DModel() defaults are Flux.1 (schnell); dev adds the guidance embedder."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=True)
    flux = measure_components("builtin:flux1-dev").components
    transformer = flux["transformer"]
    assert transformer.params == param_count(reference)
    assert transformer.bytes == param_count(reference) * 2  # bf16, no buffers, nothing kept in fp32
    # layerwise casting keeps norms, embedders and AdaLN linears in bf16: ~15.1 GB, not half
    assert 14.9e9 < transformer.layerwise_fp8_bytes < 15.3e9
    assert [(b.attr, b.count) for b in transformer.blocks] == [("transformer_blocks", 19), ("single_transformer_blocks", 38)]
    assert len(transformer.block_offload_groups_bytes) == 19 + 38 + 1
    # a T5 encoder has no top-level ModuleList: block-level offloading moves it as one group
    t5 = flux["text_encoder_2"]
    assert t5.block_offload_groups_bytes == [t5.bytes]
    assert t5.layerwise_fp8_bytes is None  # breaks transformers' T5 at run time
    # T5 keeps `wo` unquantized: nf4 is far from a quarter of 9.5 GB
    assert 4.0e9 < t5.quantized_bytes["bnb_nf4"] < 4.5e9
    # ...under bitsandbytes; transformers' torchao path matches parameter names, so it converts `wo` too
    assert t5.quantized_bytes["torchao_int8wo"] < t5.quantized_bytes["bnb_int8"] - 0.9e9


def test_cache_answers_repeats_and_notices_changes(tiny_dirs, tmp_path):
    folder = _configs_only(tiny_dirs["wan"], tmp_path / "wan")
    first = measure_components(str(folder))
    again = measure_components(str(folder))
    assert not first.from_cache and again.from_cache
    assert again.model_dump(exclude={"seconds", "from_cache"}) == first.model_dump(exclude={"seconds", "from_cache"})
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["num_layers"] = 3
    config_file.write_text(json.dumps(config))
    changed = measure_components(str(folder))
    assert changed.components["transformer"].blocks[0].count == 3
    assert changed.total_bytes > first.total_bytes


def test_hub_cache_entry_and_cached_hub_id(tiny_dirs, tmp_path, monkeypatch):
    entry = tmp_path / "hub" / "models--acme--tiny-flux"
    _configs_only(tiny_dirs["flux"], entry / "snapshots" / "0123abcd")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    expected = measure_components(str(tiny_dirs["flux"])).total_bytes
    assert measure_components(str(entry)).total_bytes == expected
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert measure_components("acme/tiny-flux").total_bytes == expected


@pytest.mark.parametrize(
    "model, message",
    [
        ("./no/such/folder", "No such folder"),
        ("acme/not-cached", "not in the local Hugging Face cache"),
        ("builtin:nope", "no built-in example"),
    ],
)
def test_bad_model_names_the_fix(model, message):
    with pytest.raises(PipefitError, match=message) as err:
        measure_components(model)
    assert err.value.fix


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(PipefitError, match="no model_index.json"):
        measure_components(str(tmp_path))


def test_unknown_component_class(tiny_dirs, tmp_path):
    folder = _configs_only(tiny_dirs["flux"], tmp_path / "flux")
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer9000Model"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipefitError, match="Unknown component class diffusers.FluxTransformer9000Model"):
        measure_components(str(folder))
    index["transformer"] = ["my_pipeline_code", "CustomTransformer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipefitError, match="diffusers and transformers components only"):
        measure_components(str(folder))


def test_bad_dtype():
    with pytest.raises(PipefitError, match="bfloat16"):
        measure_components("builtin:flux1-dev", dtype="int3")


def _cli(*args):
    env = {**os.environ, "COLUMNS": "160"}  # a terminal wide enough for the whole table
    return subprocess.run([sys.executable, "-m", "pipefit", *args], capture_output=True, text=True, env=env)


def test_cli_measure_json_and_table():
    out = _cli("measure", "builtin:wan2.1-t2v-1.3b", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["components"]["transformer"]["class"] == "WanTransformer3DModel"
    assert data["total_bytes"] == sum(c["bytes"] or 0 for c in data["components"].values())
    table = _cli("measure", "builtin:wan2.1-t2v-1.3b")  # answered from the cache the first call wrote
    assert table.returncode == 0 and "WanTransformer3DModel" in table.stdout and "total" in table.stdout


@pytest.mark.parametrize("model", ["./missing-folder", "acme/not-cached", "builtin:nope"])
def test_cli_errors_are_one_line_without_traceback(model):
    out = _cli("measure", model)
    assert out.returncode == 2
    assert out.stderr.startswith("pipefit: error:") and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
