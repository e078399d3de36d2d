"""Step caching: pipefit's schedule and memory are diffusers' hooks' own, checked against the real
hooks running on tiny pipelines; the rules follow what diffusers refuses; patch writes a cache that runs."""

import subprocess
import sys

import pytest

from pipefit.tools.dryrun import trace_pipeline
from pipefit.tools.plan import Plan, Target, check_plan
from pipefit.tools.strategies import cache

STEPS = 12


def _run_with_hooks(folder, spec: dict, steps: int, **call):
    """Run the tiny pipeline at ``folder`` with diffusers' TaylorSeer hooks; per step, how many times the
    first hooked module's inner layers ran (its full computation) and the bytes the hooks' state held."""
    import diffusers
    import torch
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    plan = Plan.model_validate({"cache": spec})
    pipe.transformer.enable_cache(
        diffusers.TaylorSeerCacheConfig(
            cache_interval=plan.cache.interval,
            disable_cache_before_step=plan.cache.warmup,
            max_order=plan.cache.order,
            use_lite_mode=plan.cache.lite,
        )  # fmt: skip
    )
    hooked = [
        m
        for m in pipe.transformer.modules()
        if isinstance(getattr(m, "_diffusers_hook", None), HookRegistry)
        and _TAYLORSEER_CACHE_HOOK in m._diffusers_hook.hooks
    ]
    inner = next(iter(hooked[0].children()), hooked[0])  # a child runs only when the hooked module computes
    ran = []
    inner.register_forward_hook(lambda *args: ran.append(len(per_step)))
    per_step, held = [], []

    def on_step_end(pipe, step, timestep, kwargs):
        per_step.append(sum(1 for s in ran if s == len(per_step)))
        state_bytes = 0
        for module in hooked:
            manager = module._diffusers_hook.hooks[_TAYLORSEER_CACHE_HOOK].state_manager
            for state in manager._state_cache.values():
                state_bytes += sum(
                    t.numel() * t.element_size() for f in state.taylor_factors.values() for t in f.values()
                )
        held.append(state_bytes)
        return kwargs

    with torch.no_grad():
        pipe("a fox", num_inference_steps=steps, callback_on_step_end=on_step_end, output_type="latent", **call)
    return per_step, held


@pytest.mark.parametrize(
    "kind, spec, call",
    [
        ("flux", {"method": "taylorseer"}, {"height": 32, "width": 32, "guidance_scale": 3.5}),
        ("flux", {"method": "taylorseer", "interval": 3, "warmup": 2, "order": 2}, {"height": 32, "width": 32}),
        (
            "wan",
            {"method": "taylorseer", "lite": True},
            {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0},
        ),
    ],
    ids=["flux-default", "flux-order2", "wan-lite-cfg"],
)
def test_schedule_and_held_bytes_are_the_hooks_own(tiny_dirs, kind, spec, call):
    folder = tiny_dirs[kind]
    plan = Plan.model_validate({"cache": spec})
    per_step, held = _run_with_hooks(folder, spec, STEPS, **call)

    schedule = cache.computed_steps(plan.cache, STEPS)
    passes = 2 if kind == "wan" else 1  # Wan runs guidance as a second pass, each with its own cache state
    assert [n > 0 for n in per_step] == schedule
    assert schedule.count(False) > 0  # the test means something: some steps were cached

    workload = {"height": call["height"], "width": call["width"], "frames": call.get("num_frames"), "steps": STEPS,
                "guidance_scale": call.get("guidance_scale")}  # fmt: skip
    trace = trace_pipeline(str(folder), dtype="float32", **workload)
    assert round(trace.per_step("transformer")) == passes
    assert cache.held_bytes(plan, trace, "transformer") == held[-1] > 0


@pytest.mark.parametrize("steps, spec", [(STEPS, {}), (28, {"threshold": 0.1, "max_skip": 2, "retention": 0.1})],
                         ids=["default", "looser"])  # fmt: skip
def test_mag_cache_schedule_is_the_hooks_own_on_fluxs_ratios(tiny_dirs, steps, spec):
    """diffusers' MagCache hooks on the tiny Flux with the ratios diffusers ships for Flux.1: the steps the
    head block really runs are the ones pipefit derives, and patch writes a config diffusers accepts."""
    import diffusers
    import torch
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    plan = Plan.model_validate({"cache": {"method": "mag", "steps": steps, **spec}})
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dirs["flux"])
    pipe.transformer.enable_cache(diffusers.MagCacheConfig(
        threshold=plan.cache.threshold, max_skip_steps=plan.cache.max_skip, retention_ratio=plan.cache.retention,
        num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS))  # fmt: skip
    head = pipe.transformer.transformer_blocks[0]
    ran, per_step = [], []
    next(iter(head.children())).register_forward_hook(lambda *args: ran.append(len(per_step)))

    def on_step_end(pipe, step, timestep, kwargs):
        per_step.append(ran.count(len(per_step)) > 0)
        return kwargs

    with torch.no_grad():
        pipe("a fox", height=32, width=32, num_inference_steps=steps, callback_on_step_end=on_step_end, output_type="latent")
    schedule = cache.computed_steps(plan.cache, steps, "FluxTransformer2DModel")
    assert per_step == schedule and schedule.count(False) > 0
    assert cache.computed_steps(plan.cache, steps, "WanTransformer3DModel") is None  # no ratios shipped
    code = cache.apply(plan, type("Site", (), {"pipe": "pipe", "denoiser": "transformer"})())
    assert f"num_inference_steps={steps}" in code.statements[0] and "mag_ratios=FLUX_MAG_RATIOS" in code.statements[0]


def test_what_the_cache_saves_is_the_hooked_modules_work(tiny_dirs):
    trace = trace_pipeline(str(tiny_dirs["flux"]), dtype="float32", height=32, width=32, steps=STEPS)
    call = trace.denoiser_calls("transformer")[0]
    lite = Plan.model_validate({"cache": {"method": "taylorseer", "lite": True}})
    default = Plan.model_validate({"cache": {"method": "taylorseer"}})
    lite_flops, lite_attention = cache.saved_per_cached_call(lite, trace, "transformer")
    flops, attention = cache.saved_per_cached_call(default, trace, "transformer")
    # lite skips every block: all the attention, and all but the embedders' and the output's matmuls
    assert lite_attention == pytest.approx(call.attention_flops)
    assert 0.5 * call.flops < lite_flops < call.flops
    # the default extrapolates the attention modules: all attention, some of the matmuls
    assert attention == pytest.approx(call.attention_flops) and 0 < flops < lite_flops
    assert cache.cached_fraction(lite, STEPS) == cache.computed_steps(lite.cache, STEPS).count(False) / STEPS
    first_block = Plan.model_validate({"cache": {"method": "first_block"}})
    assert cache.saved_per_cached_call(first_block, trace, "transformer") == (0.0, 0.0)  # depends on the image
    # MagCache skips the block stack: what lite mode skips, within the few modules lite's patterns add
    mag_flops, mag_attention = cache.saved_per_cached_call(Plan.model_validate({"cache": {"method": "mag"}}), trace, "transformer")
    assert mag_attention == pytest.approx(lite_attention) and mag_flops == pytest.approx(lite_flops, rel=0.01)


def test_real_pipelines_pass_the_cache_rules_and_the_refused_ones_are_diffusers_refusals():
    flux = Target(component_classes={"transformer": "FluxTransformer2DModel"}, denoiser="transformer",
                  pipeline_class="FluxPipeline", repeated_blocks={"transformer": ["FluxTransformerBlock", "FluxSingleTransformerBlock"]})  # fmt: skip
    for spec in ({"method": "taylorseer"}, {"method": "taylorseer", "lite": True}, {"method": "first_block"}, {"method": "mag"}):
        assert not [f for f in check_plan(Plan.model_validate({"cache": spec}), flux) if f.rule.startswith("cache.")]
    import diffusers

    # SD3's transformer has no enable_cache, and Z-Image's pipeline enters no cache context
    with pytest.raises(AttributeError):
        diffusers.SD3Transformer2DModel.enable_cache  # noqa: B018
    z_image = Target(component_classes={"transformer": "ZImageTransformer2DModel"}, denoiser="transformer",
                     pipeline_class="ZImagePipeline")  # fmt: skip
    rules = {f.rule for f in check_plan(Plan.model_validate({"cache": {"method": "taylorseer"}}), z_image)}
    assert {"cache.needs_cache_mixin", "cache.needs_cache_context"} <= rules


def test_a_patched_script_with_a_cache_runs(tiny_dirs, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(
        "import torch\nfrom diffusers import WanPipeline\n\n"
        f"pipe = WanPipeline.from_pretrained({str(tiny_dirs['wan'])!r}, torch_dtype=torch.float32)\n"
        'pipe.to("cpu")\n'
        'video = pipe("a fox", height=32, width=32, num_frames=5, num_inference_steps=8, output_type="latent").frames\n'
        "print('hooks', pipe.transformer.is_cache_enabled)\n"
    )
    from pipefit.tools.patch import patch_script

    result = patch_script(str(script), {"cache": {"method": "taylorseer", "lite": True}}, output="patched.py")
    patched = tmp_path / "patched.py"
    assert (
        "TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1, use_lite_mode=True)"
        in patched.read_text()
    )
    run = subprocess.run([sys.executable, str(patched)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "hooks True" in run.stdout
    assert result.source == patched.read_text()

    # the script's own cache stays when the plan leaves it unset, and the rules see it with the plan
    again = patch_script(str(patched), {"offload": "none"}, output="again.py")
    assert "enable_cache(" in (tmp_path / "again.py").read_text() and again.source.count("enable_cache(") == 1


def test_patch_says_when_mag_cache_steps_differ_from_the_scripts(tmp_path):
    from pipefit.tools.patch import patch_source

    source = ("import torch\nfrom diffusers import FluxPipeline\n\n"
              "pipe = FluxPipeline.from_pretrained('black-forest-labs/FLUX.1-dev', torch_dtype=torch.bfloat16)\n"
              "pipe.to('cuda')\nimage = pipe('a fox', num_inference_steps=50).images[0]\n")  # fmt: skip
    off = patch_source(source, {"cache": {"method": "mag", "steps": 28}})
    assert any("set cache.steps to 50" in w for w in off.warnings)
    assert "num_inference_steps=28, mag_ratios=FLUX_MAG_RATIOS" in off.source
    assert "from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS" in off.source
    right = patch_source(source, {"cache": {"method": "mag", "steps": 50}})
    assert not any("cache.steps" in w for w in right.warnings)
