"""The model card's example call as the default workload: distilled models planned without CFG and at
their few steps (tools/model_card.py), read as a script is, and never over what the user gave."""

import shutil
import textwrap

import pytest
from pipefit.tools.model_card import card_call
from pipefit.tools.model_source import EXAMPLES_DIR
from pipefit.tools.recommend import recommend
from pipefit.tools.script import analyze, call_workload, parse


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PIPEFIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "card-cache"))


def _card(tmp_path, text):
    (tmp_path / "README.md").write_text(textwrap.dedent(text))
    return tmp_path


def test_the_first_example_building_a_pipeline_is_read(tmp_path):
    """Shell and non-pipeline blocks are passed over, a block that does not parse too; constants are
    followed as in a script; sizes are left to the user."""
    root = _card(tmp_path, '''
        ---
        license: apache-2.0
        ---
        ```bash
        pip install -U diffusers
        ```
        ```python
        print("not a pipeline")
        ```
        ```python
        pipe = ZImagePipeline.from_pretrained("org/model" ...
        ```
        ```py
        import torch
        from diffusers import ZImagePipeline

        STEPS = 9
        pipe = ZImagePipeline.from_pretrained("org/model", torch_dtype=torch.bfloat16).to("cuda")
        image = pipe(prompt="a fox", height=768, width=1344, num_inference_steps=STEPS, guidance_scale=0.0).images[0]
        ```
        ```python
        pipe = ZImagePipeline.from_pretrained("org/model")
        image = pipe("a fox", num_inference_steps=50, guidance_scale=5).images[0]
        ```
    ''')
    assert card_call(root) == {"steps": 9, "guidance_scale": 0.0}


def test_no_card_or_no_call_arguments_is_no_default(tmp_path):
    assert card_call(tmp_path) == {} and card_call(None) == {}
    root = _card(tmp_path, '''
        ```python
        pipe = DiffusionPipeline.from_pretrained("org/model")
        image = pipe("a fox").images[0]
        ```
    ''')
    assert card_call(root) == {}


def test_a_script_guidance_scale_is_read_as_a_number():
    """Integers and floats alike (guidance_scale=5 is 5.0); sizes stay whole numbers."""
    info = analyze(parse("pipe = FluxPipeline.from_pretrained('m')\npipe('x', guidance_scale=5, height=512)\n"))
    workload = call_workload(info)
    assert workload == {"guidance_scale": 5.0, "height": 512} and isinstance(workload["guidance_scale"], float)


def test_a_distilled_model_is_planned_as_its_card_runs_it(tmp_path):
    """Z-Image-Turbo's class defaults to CFG (guidance 5.0, a batch of 2 through the transformer); its
    card calls it with guidance 0 and 9 steps. Without a card the same configs plan for CFG; what the
    user passes wins over the card."""
    folder = tmp_path / "z-image-turbo"
    shutil.copytree(EXAMPLES_DIR / "z-image-turbo", folder)
    small = {"height": 256, "width": 256, "vram": "24GiB", "ram": "64GiB", "plan": "{}"}

    carded = recommend(str(folder), **small)
    assert carded.from_card == {"guidance_scale": 0.0, "steps": 9}
    assert carded.workload.steps == 9 and "no classifier-free guidance" in carded.guidance
    assert "model card" in carded.guidance

    (folder / "README.md").unlink()
    classes = recommend(str(folder), steps=9, **small)
    assert classes.from_card == {} and "batch of 2" in classes.guidance
    assert classes.options[0].predicted.seconds > 1.2 * carded.options[0].predicted.seconds  # twice the denoiser FLOPs

    shutil.copy(EXAMPLES_DIR / "z-image-turbo" / "README.md", folder / "README.md")
    told = recommend(str(folder), guidance_scale=5.0, steps=4, **small)
    assert told.from_card == {} and told.workload.steps == 4 and "batch of 2" in told.guidance


def test_the_table_says_where_the_defaults_came_from():
    from rich.console import Console

    from pipefit.render import recommendation

    r = recommend("builtin:flux1-schnell", height=256, width=256, vram="24GiB", ram="64GiB", plan="{}")
    console = Console(record=True, width=160)
    recommendation(r, console)
    text = console.export_text()
    assert "4 steps" in text and "steps 4: as the model card's example calls it" in text


def test_a_card_value_out_of_range_is_passed_over(tmp_path):
    folder = tmp_path / "z-image-turbo"
    shutil.copytree(EXAMPLES_DIR / "z-image-turbo", folder)
    (folder / "README.md").write_text(
        "```python\npipe = ZImagePipeline.from_pretrained('m')\npipe('x', num_inference_steps=0, guidance_scale=0.0)\n```\n"
    )
    r = recommend(str(folder), height=256, width=256, vram="24GiB", ram="64GiB", plan="{}")
    assert r.from_card == {} and r.workload.steps == 28
