"""Plans parse strictly, every compatibility rule fires when broken and only then, and the code the
strategies write is accepted by the installed libraries."""

import json

import pytest

from pipefit.tools.errors import PipefitError
from pipefit.tools.plan import Plan, Target, all_rules, check_plan, parse_plan
from pipefit.tools.strategies import Site, quantize, vae


def test_parse_plan_from_json_text_and_file(tmp_path):
    text = '{"offload": "group_block", "group": {"num_blocks_per_group": 2}, "vae": {"tiling": true}}'
    path = tmp_path / "plan.json"
    path.write_text(text)
    for given in (text, str(path), json.loads(text)):
        plan = parse_plan(given)
        assert plan.offload == "group_block" and plan.group.num_blocks_per_group == 2 and plan.vae.tiling


@pytest.mark.parametrize(
    "given, says",
    [
        ('{"offload": "model",}', "not valid JSON"),
        ('{"ofload": "model"}', "ofload"),
        ('{"offload": "cpu"}', "offload"),
        ('{"quantize": {"backend": "bnb_nf4", "components": []}}', "quantize.components"),
        ('{"group": {"num_blocks_per_group": 0}}', "num_blocks_per_group"),
        ("no-such-plan.json", "neither inline JSON nor an existing file"),
        ("[1, 2]", "neither inline JSON"),
    ],
)
def test_bad_plans_are_refused_with_the_field_named(given, says):
    with pytest.raises(PipefitError, match=says.replace(".", r"\.")):
        parse_plan(given)


CUDA = Target(device_type="cuda")
CASES = [
    # (rule id, plan that breaks it, target, a plan that does not)
    ("quantize.bnb_needs_gpu", {"quantize": {"backend": "bnb_nf4", "components": ["transformer"]}},
     Target(device_type="cpu"), {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}}),
    ("quantize.fp8_needs_sm89", {"quantize": {"backend": "torchao_fp8wo", "components": ["transformer"]}},
     Target(compute_capability=(8, 6)), {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}}),
    ("quantize.not_with_layerwise_casting",
     {"quantize": {"backend": "bnb_nf4", "components": ["transformer"]}, "layerwise_casting": {"components": ["transformer"]}},
     CUDA, {"quantize": {"backend": "bnb_nf4", "components": ["text_encoder_2"]}, "layerwise_casting": {"components": ["transformer"]}}),
    ("quantize.bnb_int8_stays_resident",
     {"quantize": {"backend": "bnb_int8", "components": ["transformer"]}, "offload": "model"},
     Target(versions={"bitsandbytes": "0.46.0", "transformers": "4.57.0"}),
     {"quantize": {"backend": "bnb_nf4", "components": ["transformer"]}, "offload": "model"}),
    ("load.int8_not_on_host", {"quantize": {"backend": "bnb_int8", "components": ["transformer"]}, "load": "host"},
     CUDA, {"quantize": {"backend": "bnb_int8", "components": ["transformer"]}, "load": "staged"}),
    ("load.torchao_not_while_streaming",
     {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}, "load": "device"},
     CUDA, {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}}),
    ("load.needs_quantization", {"load": "staged"}, CUDA, {"offload": "model"}),
    ("layerwise_casting.diffusers_models_only", {"layerwise_casting": {"components": ["transformer", "text_encoder_2"]}},
     CUDA, {"layerwise_casting": {"components": ["transformer", "vae"]}}),
    ("offload.needs_accelerator", {"offload": "model"}, Target(device_type="cpu"), {"offload": "group_block"}),
    ("offload.group_settings_need_group_offload", {"offload": "model", "group": {"use_stream": True}}, CUDA,
     {"offload": "group_leaf", "group": {"use_stream": True}}),
    ("group_offload.streams_need_cuda", {"offload": "group_leaf", "group": {"use_stream": True}},
     Target(device_type="mps"), {"offload": "group_leaf"}),
    ("group_offload.streams_force_one_block", {"offload": "group_block", "group": {"use_stream": True, "num_blocks_per_group": 4}},
     CUDA, {"offload": "group_block", "group": {"num_blocks_per_group": 4}}),
    ("group_offload.record_stream_needs_stream", {"offload": "group_block", "group": {"record_stream": True}}, CUDA,
     {"offload": "group_block", "group": {"record_stream": True, "use_stream": True}}),
    ("group_offload.low_cpu_mem_usage_needs_stream", {"offload": "group_leaf", "group": {"low_cpu_mem_usage": True}},
     CUDA, {"offload": "group_leaf", "group": {"low_cpu_mem_usage": True, "use_stream": True}}),
    ("group_offload.torchao_low_cpu_mem_grows",
     {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}, "load": "host",
      "offload": "group_leaf", "group": {"use_stream": True, "low_cpu_mem_usage": True}}, CUDA,
     {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}, "load": "host",
      "offload": "group_leaf", "group": {"use_stream": True, "low_cpu_mem_usage": True, "exclude": ["transformer"]}}),
    ("plan.unknown_component", {"quantize": {"backend": "bnb_nf4", "components": ["transformer"]}},
     Target(components=["unet", "vae", "text_encoder"]),
     {"quantize": {"backend": "bnb_nf4", "components": ["unet"]}}),
    ("vae.no_tiling", {"vae": {"tiling": True}}, Target(component_classes={"vae": "AutoencoderKLTemporalDecoder"}),
     {"vae": {"slicing": False}}),
    ("compile.regional_needs_repeated_blocks", {"compile": "regional"},
     Target(component_classes={"transformer": "SD3Transformer2DModel"}), {"compile": "full"}),
    ("attention.known_backend", {"attention_backend": "flashy"}, CUDA, {"attention_backend": "flash"}),
    ("attention.backend_needs_package", {"attention_backend": "sage"}, Target(versions={"sageattention": None}),
     {"attention_backend": "native"}),
    ("attention.unet_ignores_backend", {"attention_backend": "native"}, Target(denoiser="unet"), {}),
    ("quantize.fp8_compute_needs_gpu", {"quantize": {"backend": "torchao_fp8dq", "components": ["transformer"]}},
     Target(device_type="cpu"), {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}}),
    ("cache.needs_cache_mixin", {"cache": {"method": "taylorseer"}},
     Target(component_classes={"transformer": "SD3Transformer2DModel"}, denoiser="transformer"), {}),
    ("cache.needs_cache_context", {"cache": {"method": "first_block"}}, Target(pipeline_class="ZImagePipeline"),
     {"compile": "full"}),
    ("cache.needs_registered_blocks", {"cache": {"method": "first_block"}},
     Target(repeated_blocks={"transformer": ["NoSuchBlock"]}, denoiser="transformer"), {"cache": {"method": "taylorseer"}}),
    ("cache.needs_registered_blocks", {"cache": {"method": "mag"}},
     Target(repeated_blocks={"transformer": ["NoSuchBlock"]}, denoiser="transformer"), {"cache": {"method": "taylorseer"}}),
    ("cache.mag_needs_ratios", {"cache": {"method": "mag"}},
     Target(component_classes={"transformer": "WanTransformer3DModel"}, denoiser="transformer"),
     {"cache": {"method": "taylorseer", "lite": True}}),
    ("cache.taylorseer_hooks_nothing", {"cache": {"method": "taylorseer"}},
     Target(component_classes={"transformer": "WanTransformer3DModel"}, module_names=["blocks.0", "blocks.0.attn1", "proj_out"]),
     {"cache": {"method": "taylorseer", "lite": True}}),
    ("group_offload.streams_keep_vae_dtype", {"offload": "group_leaf", "group": {"use_stream": True}},
     Target(denoiser="unet"), {"offload": "group_leaf", "group": {"use_stream": True, "exclude": ["vae"]}}),
]  # fmt: skip


@pytest.mark.parametrize("rule, breaking, target, fine", CASES, ids=[c[0] for c in CASES])
def test_each_rule_fires_when_broken_and_only_then(rule, breaking, target, fine):
    fired = {f.rule: f for f in check_plan(Plan.model_validate(breaking), target)}
    assert rule in fired and fired[rule].message
    assert rule not in {f.rule for f in check_plan(Plan.model_validate(fine), target)}
    # without knowing the target, a rule that needs it stays silent
    if target.model_dump(exclude_none=True) and rule.split(".")[1] not in (
        "not_with_layerwise_casting", "group_settings_need_group_offload", "streams_force_one_block",
        "record_stream_needs_stream", "low_cpu_mem_usage_needs_stream", "known_backend", "diffusers_models_only",
        "int8_not_on_host", "torchao_not_while_streaming", "needs_quantization", "torchao_low_cpu_mem_grows",
    ):  # fmt: skip
        assert rule not in {f.rule for f in check_plan(Plan.model_validate(breaking), Target())}


def test_every_rule_is_tested():
    assert {r.id for r in all_rules()} == {c[0] for c in CASES}


def test_errors_come_before_warnings():
    plan = Plan.model_validate({"offload": "group_block", "group": {"use_stream": True, "num_blocks_per_group": 2}})
    findings = check_plan(plan, Target(device_type="cpu"))
    assert [f.severity for f in findings] == ["error", "warning"]


def test_vaes_without_tiling_are_the_ones_diffusers_has():
    """Every VAE inherits enable_tiling; it raises NotImplementedError unless the class sets use_tiling."""
    import inspect

    import diffusers

    def supports(name: str, what: str) -> bool:
        return f"self.use_{what}" in inspect.getsource(getattr(diffusers, name))

    for name in vae.NO_TILING:
        assert not supports(name, "tiling") and not supports(name, "slicing"), name
    for name in ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLHunyuanVideo"):
        assert supports(name, "tiling"), name


@pytest.mark.parametrize("backend", sorted(quantize._TORCHAO_CONFIG) + sorted(quantize._BNB_KWARGS))
def test_quantization_code_builds_with_the_installed_libraries(backend):
    """The expressions the patch writes construct real config objects (torchao and bnb alike)."""
    import diffusers
    import transformers

    site = Site(dtype="torch.bfloat16")
    spec = Plan.model_validate({"quantize": {"backend": backend, "components": ["transformer", "text_encoder_2"]}}).quantize
    whole = quantize.pipeline_config(spec, spec.components, site, Target())
    namespace: dict = {}
    exec("\n".join(whole.imports), namespace)
    config = eval(whole.statements[0], namespace)
    assert isinstance(config, diffusers.PipelineQuantizationConfig)
    for library, expected in (("diffusers", diffusers), ("transformers", transformers)):
        one = quantize.model_config(backend, library, site)
        exec("\n".join(one.imports), namespace)
        made = eval(one.statements[0], namespace)
        assert type(made).__module__.startswith(expected.__name__)
