"""The strategy models agree with what diffusers, transformers, bitsandbytes and torchao really do."""

import copy

import pytest
import torch

from pipefit.tools.sizes import loaded_bytes, module_bytes, tensor_bytes
from pipefit.tools.strategies import group_offload, quantize

KINDS = ("flux", "sdxl", "wan")


@pytest.fixture(scope="module")
def pipes(tiny_dirs):
    from diffusers import DiffusionPipeline

    return {kind: DiffusionPipeline.from_pretrained(tiny_dirs[kind], dtype=torch.bfloat16) for kind in KINDS}


def _modules(pipe):
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def _installed_groups(module):
    """The ModuleGroups diffusers' hooks hold, each as the bytes it moves."""
    return [sum(map(tensor_bytes, tensors)) for tensors in _installed_group_tensors(module)]


@pytest.mark.parametrize("kind", KINDS)
def test_block_level_groups_match_diffusers_hooks(pipes, kind):
    from diffusers.hooks import apply_group_offloading

    for name, module in _modules(pipes[kind]).items():
        predicted = group_offload.block_level_groups(module)
        real = copy.deepcopy(module)
        apply_group_offloading(real, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
        assert sorted(predicted) == sorted(_installed_groups(real)), f"{kind}.{name}"


@pytest.mark.parametrize("kind", KINDS)
def test_largest_leaf_matches_leaf_level_hooks(pipes, kind):
    from diffusers.hooks import apply_group_offloading

    for name, module in _modules(pipes[kind]).items():
        real = copy.deepcopy(module)
        apply_group_offloading(real, onload_device=torch.device("cpu"), offload_type="leaf_level")
        assert group_offload.largest_leaf_bytes(module) == max(_installed_groups(real)), f"{kind}.{name}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_leaf_stream_holds_the_two_largest_layers_a_shared_tensor_once(pipes, kind):
    """Leaf level copies one layer while the one before runs: the two largest of diffusers' own groups,
    where a tensor two layers share (a T5's tied ``shared``/``encoder.embed_tokens``) is copied once."""
    from diffusers.hooks import apply_group_offloading

    for name, module in _modules(pipes[kind]).items():
        real = copy.deepcopy(module)
        apply_group_offloading(real, onload_device=torch.device("cpu"), offload_type="leaf_level")
        seen: set[int] = set()
        sizes = []
        for group in _installed_group_tensors(real):
            fresh = [t for t in group if id(t) not in seen]
            seen.update(map(id, fresh))
            sizes.append(sum(map(tensor_bytes, fresh)))
        assert group_offload.leaf_pair_bytes(module) <= sum(sorted(sizes)[-2:]), f"{kind}.{name}"
        assert group_offload.leaf_pair_bytes(module) >= sorted(sizes)[-1], f"{kind}.{name}"
    t5 = pipes["flux"].text_encoder_2
    if t5.shared.weight is t5.encoder.embed_tokens.weight:  # tied: the vocabulary embedding moves once
        assert group_offload.leaf_pair_bytes(t5) < 2 * group_offload.largest_leaf_bytes(t5)


def _installed_group_tensors(module) -> list[list]:
    """The tensors of each ModuleGroup diffusers' hooks hold, largest group first."""
    groups = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry else []):
            if getattr(hook, "group", None) is not None:
                groups[id(hook.group)] = hook.group
    out = []
    for group in groups.values():
        tensors = {id(t): t for m in group.modules for t in (*m.parameters(), *m.buffers())}
        tensors.update({id(t): t for t in (*(group.parameters or []), *(group.buffers or []))})
        out.append(list(tensors.values()))
    return sorted(out, key=lambda ts: -sum(map(tensor_bytes, ts)))


@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_casting_matches_diffusers(pipes, kind, tiny_dirs):
    from pipefit.tools.measure import measure_components

    measured = measure_components(str(tiny_dirs[kind]))
    for name, module in _modules(pipes[kind]).items():
        if not module.__class__.__module__.startswith("diffusers"):
            assert measured.components[name].layerwise_fp8_bytes is None
            continue
        real = copy.deepcopy(module)
        real.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        assert measured.components[name].layerwise_fp8_bytes == module_bytes(real), name
        assert module_bytes(real) < module_bytes(module)


def _replaced_by_bnb(module, library, backend):
    """Names of the layers the library's own bnb replacement swaps, on a meta copy."""
    with torch.device("meta"):
        meta = copy.deepcopy(module).to("meta")
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
        from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

        skip = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    else:
        from transformers import BitsAndBytesConfig
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = get_keys_to_not_convert(meta) + list(getattr(module, "_keep_in_fp32_modules", None) or [])
    config = BitsAndBytesConfig(load_in_4bit=backend == "bnb_nf4", load_in_8bit=backend == "bnb_int8")
    replaced = replace_with_bnb_linear(meta, modules_to_not_convert=skip, quantization_config=config)
    import bitsandbytes as bnb

    return {n for n, m in replaced.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["bnb_nf4", "bnb_int8"])
def test_converted_layers_match_the_libraries_replacement(pipes, kind, backend):
    for name, module in _modules(pipes[kind]).items():
        library = module.__class__.__module__.split(".")[0]
        predicted = {n for n, _ in quantize.converted_linears(module, library, backend)}
        assert predicted == _replaced_by_bnb(module, library, backend), f"{kind}.{name}"


def _quantized_by_torchao(module, library):
    """Names of the Linear layers the library's own torchao quantizer decides to quantize."""
    from torchao.quantization import Int8WeightOnlyConfig

    linears = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    if library == "diffusers":
        from diffusers import TorchAoConfig
        from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer

        quantizer = TorchAoHfQuantizer(TorchAoConfig(Int8WeightOnlyConfig()))
        keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
        quantizer._process_model_before_weight_loading(module, device_map=None, keep_in_fp32_modules=keep)
        return {n for n in linears if quantizer.check_if_quantized_param(module, None, f"{n}.weight", {})}
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    quantizer = TorchAoHfQuantizer(TorchAoConfig(Int8WeightOnlyConfig()))
    quantizer._process_model_before_weight_loading(module)
    return {n for n in linears if quantizer.param_needs_quantization(module, f"{n}.weight")}


@pytest.mark.parametrize("kind", KINDS)
def test_torchao_converted_layers_match_the_libraries_quantizers(pipes, kind):
    for name, module in _modules(pipes[kind]).items():
        library = module.__class__.__module__.split(".")[0]
        predicted = {n for n, _ in quantize.converted_linears(module, library, "torchao_int8wo")}
        assert predicted == _quantized_by_torchao(module, library), f"{kind}.{name}"


def test_t5_wo_stays_unconverted_under_bnb_but_not_torchao(pipes):
    t5 = pipes["flux"].text_encoder_2
    for backend, wo_converted in [("bnb_nf4", False), ("bnb_int8", False), ("torchao_int8wo", True)]:
        converted = {n for n, _ in quantize.converted_linears(t5, "transformers", backend)}
        assert any(n.endswith(".wi_0") for n in converted), backend
        assert any(n.endswith(".wo") for n in converted) == wo_converted, backend


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_skip_rules_restate_the_originals(pipes, kind):
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    for module in _modules(pipes[kind]).values():
        if not module.__class__.__module__.startswith("transformers"):
            continue
        keys = quantize.transformers_keys_to_not_convert(module)
        assert sorted(keys) == sorted(get_keys_to_not_convert(module))
        patterns = keys + ["wo", "encoder.block.1"]
        for name, _ in module.named_modules():
            assert quantize._transformers_should_convert(name, patterns) == should_convert_module(name, patterns)


def test_nf4_and_int8_bytes_equal_bitsandbytes_layers():
    import bitsandbytes as bnb

    for out_features, in_features in [(96, 64), (3072, 768), (10, 33)]:
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
        nf4 = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
        assert quantize.BACKENDS["bnb_nf4"].weight_bytes(out_features, in_features) == loaded_bytes(nf4)
        int8 = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        int8.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False).to("cpu")
        assert quantize.BACKENDS["bnb_int8"].weight_bytes(out_features, in_features) == loaded_bytes(int8)


@pytest.mark.parametrize("kind", KINDS)
def test_torchao_int8_weight_only_bytes_equal_torchao(pipes, kind):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for name, module in _modules(pipes[kind]).items():
        library = module.__class__.__module__.split(".")[0]
        converted = {n for n, _ in quantize.converted_linears(module, library, "torchao_int8wo")}
        real = copy.deepcopy(module)
        quantize_(real, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in converted)
        assert quantize.quantized_bytes(module, library, "torchao_int8wo") == loaded_bytes(real), f"{kind}.{name}"
