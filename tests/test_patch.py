"""patch_script on a corpus of real-style scripts crossed with plans.

Every patched script parses, is idempotent and contains exactly the calls its plan implies
(checked with ``ast``, independently of the libcst code that wrote them). Scripts that can run on
a CPU are run, patched, in a child process against tiny random-weight pipelines placed in a fake,
offline Hugging Face cache under the real model ids.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipefit.tools.errors import PipefitError
from pipefit.tools.patch import patch_script, patch_source
from pipefit.tools.plan import Plan

SCRIPTS = Path(__file__).parent / "fixtures" / "scripts"
CORPUS = {k: v for k, v in json.loads((SCRIPTS / "corpus.json").read_text()).items() if not k.startswith("_")}
USABLE = sorted(name for name, meta in CORPUS.items() if "refuse" not in meta)
RUNNABLE = sorted(name for name in USABLE if "run" in CORPUS[name])
FAMILY = {  # denoiser, largest text encoder
    "flux": ("transformer", "text_encoder_2"), "sdxl": ("unet", "text_encoder_2"),
    "wan": ("transformer", "text_encoder"), "sd3": ("transformer", "text_encoder_3"),
}  # fmt: skip
PLANS = {
    "none": {},
    "model": {"offload": "model"},
    "sequential": {"offload": "sequential"},
    "group_block": {"offload": "group_block", "group": {"num_blocks_per_group": 2}},
    "group_leaf": {"offload": "group_leaf"},
    "group_stream": {"offload": "group_leaf", "group": {"use_stream": True, "low_cpu_mem_usage": True, "exclude": ["vae"]}},
    "fp8_group": {"layerwise_casting": {"components": ["{den}"]}, "offload": "group_block", "group": {"exclude": ["vae"]}},
    "fp8_model": {"layerwise_casting": {"components": ["{den}"]}, "offload": "model"},
    "nf4_model": {"quantize": {"backend": "bnb_nf4", "components": ["{den}", "{enc}"]}, "offload": "model", "vae": {"tiling": True}},
    "nf4_staged": {"quantize": {"backend": "bnb_nf4", "components": ["{den}", "{enc}"]}, "load": "staged", "offload": "model"},
    "nf4_host": {"quantize": {"backend": "bnb_nf4", "components": ["{den}"]}, "load": "host", "offload": "model"},
    "int8": {"quantize": {"backend": "bnb_int8", "components": ["{den}"]}},
    "ao_int8": {"quantize": {"backend": "torchao_int8wo", "components": ["{den}"]}},
    "vae": {"vae": {"tiling": True, "slicing": True}},
    "compile": {"compile": "regional"},
    "attention": {"attention_backend": "native"},
}  # fmt: skip
CPU_PLANS = ("none", "group_block", "group_leaf", "fp8_group", "ao_int8", "vae", "attention")


def plan_for(name: str, plan: str) -> dict:
    den, enc = FAMILY[CORPUS[name]["family"]]
    return json.loads(json.dumps(PLANS[plan]).replace("{den}", den).replace("{enc}", enc))


def test_the_corpus_is_large_enough():
    assert len(USABLE) >= 25 and len(RUNNABLE) >= 10


# ---- static: every script x every plan --------------------------------------------------------------


def _calls(tree: ast.AST) -> list[tuple[str, str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                found.append((ast.unparse(func.value), func.attr, node))
            elif isinstance(func, ast.Name):
                found.append(("", func.id, node))
    return found


def _kwarg(call: ast.Call, name: str):
    return next((ast.unparse(k.value) for k in call.keywords if k.arg == name), None)


def check_calls(source: str, name: str, plan: dict) -> None:
    """The patched source makes exactly the calls ``plan`` implies, for every pipeline in it."""
    meta = CORPUS[name]
    den, _ = FAMILY[meta["family"]]
    calls = _calls(ast.parse(source))
    count = lambda receiver, method: sum(1 for r, m, _ in calls if r == receiver and m == method)  # noqa: E731
    offload = plan.get("offload", "none")
    quantized = plan.get("quantize", {}).get("components", [])
    loaded = meta.get("loaded", {})
    prequantized = meta.get("prequantized", [])
    pipeline_configs = [c for r, m, c in calls if m == "PipelineQuantizationConfig"]
    expected_configs = []
    for pipe in meta["pipes"]:
        shared = meta.get("shared", {}).get(pipe, [])
        assert count(pipe, "to") == (offload == "none"), pipe
        assert count(pipe, "cuda") == 0
        assert count(pipe, "enable_model_cpu_offload") == (offload == "model")
        assert count(pipe, "enable_sequential_cpu_offload") == (offload == "sequential")
        groups = [c for r, m, c in calls if r == pipe and m == "enable_group_offload"]
        assert len(groups) == offload.startswith("group")
        if groups:
            kind = {"group_block": "block_level", "group_leaf": "leaf_level"}[offload]
            assert _kwarg(groups[0], "offload_type") == repr(kind)
            assert (_kwarg(groups[0], "use_stream") == "True") == plan.get("group", {}).get("use_stream", False)
        assert count(pipe, "enable_vae_tiling") == count(pipe, "enable_vae_slicing") == 0
        assert count(f"{pipe}.vae", "enable_tiling") == plan.get("vae", {}).get("tiling", False)
        assert count(f"{pipe}.vae", "enable_slicing") == plan.get("vae", {}).get("slicing", False)
        cast = set(plan.get("layerwise_casting", {}).get("components", [])) - set(shared) - set(prequantized)
        casting = {r.removeprefix(pipe + ".") for r, m, _ in calls if m == "enable_layerwise_casting" and r.startswith(pipe + ".")}
        assert casting == cast
        assert count(f"{pipe}.{den}", "compile_repeated_blocks") == (plan.get("compile") == "regional")
        assert count(f"{pipe}.{den}", "set_attention_backend") == bool(plan.get("attention_backend"))
        at_load = [c for c in quantized if c not in loaded and c not in shared and c not in prequantized]
        loader = next(c for r, m, c in calls if m in ("from_pretrained", "from_single_file") and _is_pipeline(r))
        loading = Plan.model_validate(plan).loading
        if at_load and loading == "staged":  # each loaded on its own, quantized, parked; the pipeline takes them
            staged = {ast.literal_eval(_kwarg(c, "subfolder")): c for r, m, c in calls if r == "AutoModel"}
            assert set(staged) >= set(at_load) and all(_kwarg(staged[c], "quantization_config") for c in at_load)
            if len(meta["pipes"]) == 1:
                parked = {r for r, m, c in calls if m == "to" and c.args and ast.unparse(c.args[0]) == "'cpu'"}
                assert all(_kwarg(loader, c) == c for c in at_load) and parked >= set(at_load)
        elif at_load:
            expected_configs.append(sorted(at_load))
        if at_load and loading != "staged":  # host: device_map="cpu"; device: bitsandbytes maps to the GPU itself
            assert (_kwarg(loader, "device_map") == "'cpu'") == (loading == "host")
    assert sum(1 for _, m, _ in calls if m == "apply_group_offloading") == 0
    assert not [c for r, m, c in calls if r == "" and m == "compile"]  # torch.compile(...) assignments replaced
    assert not [c for r, m, c in calls if m == "to" and r.endswith(")") and ".from_pretrained(" in r]
    assert sorted(_quantized_names(c) for c in pipeline_configs) == sorted(expected_configs)
    for component, _library in loaded.items():
        if component in quantized and component not in prequantized:
            load = next(c for r, m, c in calls if m in ("from_pretrained", "from_single_file") and not _is_pipeline(r)
                        and (_kwarg(c, "subfolder") in (repr(component), None)))  # fmt: skip
            assert _kwarg(load, "quantization_config") is not None, component


def _is_pipeline(receiver: str) -> bool:
    return receiver.endswith("Pipeline") or receiver.startswith("AutoPipeline")


def _quantized_names(call: ast.Call) -> list[str]:
    listed = _kwarg(call, "components_to_quantize")
    if listed is not None:
        return sorted(ast.literal_eval(listed))
    mapping = next(k.value for k in call.keywords if k.arg == "quant_mapping")
    return sorted(ast.literal_eval(k) for k in mapping.keys)


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", USABLE)
def test_patched_script_parses_is_idempotent_and_makes_the_planned_calls(name, plan):
    """With ``replace`` the plan is complete: the script makes exactly the calls the plan implies."""
    source = (SCRIPTS / name).read_text()
    result = patch_source(source, plan_for(name, plan), filename=name, replace=True)
    ast.parse(result.source)
    check_calls(result.source, name, plan_for(name, plan))
    again = patch_source(result.source, plan_for(name, plan), filename=name, replace=True)
    assert not again.changed, again.diff
    assert result.changed and result.diff.startswith(f"--- a/{name}") and result.edits
    # comments on their own lines survive
    comments = [line.strip() for line in source.splitlines() if line.strip().startswith("#")]
    assert all(c in result.source for c in comments)


def test_existing_offloading_is_replaced_not_duplicated():
    source = (SCRIPTS / "flux_half_optimized.py").read_text()
    result = patch_source(source, {"offload": "group_block"}, "flux_half_optimized.py")
    assert "enable_sequential_cpu_offload" not in result.source
    assert "enable_layerwise_casting" in result.source  # the user's fp8 casting: the plan leaves it unset
    assert "# memory savers I found in the docs" in result.source
    assert any("enable_sequential_cpu_offload" in edit and "line 8" in edit for edit in result.edits)
    complete = patch_source(source, {"offload": "group_block"}, "flux_half_optimized.py", replace=True)
    assert "enable_layerwise_casting" not in complete.source
    assert any("enable_layerwise_casting" in edit and "replaced" in edit for edit in complete.edits)
    assert any("enable_slicing" in edit and "`replace`" in edit for edit in complete.edits)


def test_removed_pipeline_level_vae_tiling_becomes_the_vae_method():
    source = (SCRIPTS / "flux_issue_report.py").read_text()
    result = patch_source(source, {"offload": "model", "vae": {"tiling": True}}, "flux_issue_report.py")
    assert "pipe.enable_vae_tiling()" not in result.source and "pipe.vae.enable_tiling()" in result.source
    assert "pipe.enable_vae_slicing()" in result.source  # slicing: the plan leaves it to the script
    complete = patch_source(source, {"offload": "model", "vae": {"tiling": True}}, "flux_issue_report.py", replace=True)
    assert "pipe.enable_vae_slicing()" not in complete.source


def _governed(source: str) -> list[tuple[str, frozenset[str]]]:
    """The script's statements a plan may take over, each with what it sets (as tools/script.py reads them)."""
    from pipefit.tools.script import analyze, parse

    info = analyze(parse(source))
    return [(info.code(statement), info.settings[key]) for key, (_, statement) in info.managed.items()]


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", USABLE)
def test_by_default_the_users_own_settings_stay_unless_the_plan_sets_them(name, plan):
    """Additive: every governed statement whose setting the plan leaves unset is still there, verbatim;
    those the plan sets (and every placement) are gone, each named in the edits."""
    source = (SCRIPTS / name).read_text()
    chosen = Plan.model_validate(plan_for(name, plan))
    try:
        result = patch_source(source, chosen, filename=name)
    except PipefitError as exc:  # the plan clashes with a setting the script keeps: said, and how to get past it
        assert "together with the script's own" in str(exc) and "`replace`" in str(exc)
        return
    ast.parse(result.source)
    assert not patch_source(result.source, chosen, filename=name).changed
    for code, settings in _governed(source):
        taken = "placement" in settings or settings <= chosen.sets
        first = code.splitlines()[0]
        if taken:
            assert any(first in edit and "removed" in edit or "replaced" in edit for edit in result.edits), (code, result.edits)
        else:
            assert code in result.source, (code, chosen.sets)


def test_each_loading_path_loads_as_it_says():
    source = (SCRIPTS / "flux_chained_to.py").read_text()
    nf4 = {"quantize": {"backend": "bnb_nf4", "components": ["transformer", "text_encoder_2"]}, "offload": "model"}
    device = patch_source(source, nf4).source  # bitsandbytes quantizes on the GPU as the weights stream in
    host = patch_source(source, {**nf4, "load": "host"}).source
    staged = patch_source(source, {**nf4, "load": "staged"}).source
    assert "device_map" not in device and "PipelineQuantizationConfig(" in device
    assert 'device_map="cpu"' in host and "PipelineQuantizationConfig(" in host
    tree = ast.parse(staged)
    loads = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and ast.unparse(c.func) == "AutoModel.from_pretrained"]
    assert [ast.literal_eval(_kwarg(c, "subfolder")) for c in loads] == ["transformer", "text_encoder_2"]
    configs = [ast.unparse(next(k.value for k in c.keywords if k.arg == "quantization_config").func) for c in loads]
    assert configs == ["BitsAndBytesConfig", "TransformersBitsAndBytesConfig"]  # each library's own config
    parks = staged.index('transformer.to("cpu")'), staged.index('text_encoder_2.to("cpu")')
    assert staged.index("text_encoder_2 = AutoModel") > parks[0] and "PipelineQuantizationConfig(" not in staged
    assert "transformer=transformer" in staged and "text_encoder_2=text_encoder_2" in staged
    # torchao quantizes where the weights load: by default in host RAM, staged onto the GPU
    ao = {"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}}
    assert 'device_map="cpu"' in patch_source(source, ao).source
    assert 'device_map="cuda"' in patch_source(source, {**ao, "load": "staged"}).source


@pytest.mark.parametrize(("plan", "rule"), [
    ({"quantize": {"backend": "bnb_int8", "components": ["transformer"]}, "load": "host"}, "Expected a cuda device"),
    ({"quantize": {"backend": "torchao_int8wo", "components": ["transformer"]}, "load": "device"}, "torchao quantizer"),
])  # fmt: skip
def test_a_loading_path_the_backend_cannot_take_is_refused(plan, rule):
    with pytest.raises(PipefitError, match=rule):
        patch_source((SCRIPTS / "flux_chained_to.py").read_text(), plan)


def test_streams_on_an_sdxl_vae_warn_to_keep_it_resident():
    source = (SCRIPTS / "sdxl_docs.py").read_text()
    warned = patch_source(source, {"offload": "group_leaf", "group": {"use_stream": True}}).warnings
    assert any('Add "vae" to group.exclude' in w for w in warned)
    kept = {"offload": "group_leaf", "group": {"use_stream": True, "exclude": ["vae"]}}
    assert not patch_source(source, kept).warnings


def test_the_device_expression_of_the_script_is_kept():
    source = (SCRIPTS / "flux_fstring_device.py").read_text()
    result = patch_source(source, {"offload": "group_leaf"}, "flux_fstring_device.py")
    assert 'onload_device=torch.device(f"cuda:{args.gpu}")' in result.source
    result = patch_source(source, {"offload": "model"}, "flux_fstring_device.py")
    assert 'enable_model_cpu_offload(device=f"cuda:{args.gpu}")' in result.source


def test_user_formatting_survives():
    source = (SCRIPTS / "flux_comments_heavy.py").read_text()
    result = patch_source(source, {"offload": "model"}, "flux_comments_heavy.py")
    removed = {line for line in result.diff.splitlines() if line.startswith("-") and not line.startswith("---")}
    assert removed == {"-pipe.to(DEVICE)"}


# ---- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(n for n, m in CORPUS.items() if "refuse" in m))
def test_refuses_scripts_it_cannot_handle_and_writes_nothing(name, tmp_path):
    out = tmp_path / "out.py"
    with pytest.raises(PipefitError, match=CORPUS[name]["refuse"]):
        patch_script(SCRIPTS / name, {"offload": "model"}, output=out)
    assert not out.exists()


@pytest.mark.parametrize(
    "name, plan, says",
    [
        ("flux_docs_offload.py", {"layerwise_casting": {"components": ["text_encoder_2"]}}, "text_encoder_2"),
        ("flux_docs_offload.py", {"offload": "model", "group": {"use_stream": True}}, "cannot be combined"),
        ("flux_gguf.py", {"quantize": {"backend": "bnb_nf4", "components": ["text_encoder"]},
                          "layerwise_casting": {"components": ["text_encoder"]}}, "both quantized"),
    ],
)  # fmt: skip
def test_refuses_plans_that_break_a_rule(name, plan, says):
    with pytest.raises(PipefitError, match=says):
        patch_source((SCRIPTS / name).read_text(), plan, name)


def test_refuses_cuda_only_plans_for_a_cpu_script():
    source = 'import torch\nfrom diffusers import FluxPipeline\npipe = FluxPipeline.from_pretrained("x")\npipe.to("cpu")\n'
    for plan, says in (({"offload": "model"}, "needs an accelerator"),
                       ({"quantize": {"backend": "bnb_int8", "components": ["transformer"]}}, "GPU only")):  # fmt: skip
        with pytest.raises(PipefitError, match=says):
            patch_source(source, plan)
    assert patch_source(source, {"offload": "group_leaf"}).changed


def test_quantizes_a_component_loaded_with_a_placement_chain():
    source = (
        "from diffusers import FluxPipeline, FluxTransformer2DModel\n"
        "transformer = FluxTransformer2DModel.from_pretrained('x', subfolder='transformer').to('cuda')\n"
        "pipe = FluxPipeline.from_pretrained('x', transformer=transformer)\npipe.to('cuda')\n"
    )
    plan = {"quantize": {"backend": "bnb_nf4", "components": ["transformer"]}}
    result = patch_source(source, plan)
    load = next(c for r, m, c in _calls(ast.parse(result.source)) if r == "FluxTransformer2DModel")
    assert _kwarg(load, "quantization_config") == "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.float32)"
    assert not patch_source(result.source, plan).changed


def test_refuses_to_quantize_a_component_it_cannot_trace():
    source = (
        "from diffusers import FluxPipeline\nfrom helpers import load_transformer\n"
        "transformer = load_transformer()\npipe = FluxPipeline.from_pretrained('x', transformer=transformer)\n"
    )
    with pytest.raises(PipefitError, match="Cannot quantize transformer.*line 4"):
        patch_source(source, {"quantize": {"backend": "bnb_nf4", "components": ["transformer"]}})


# ---- files and the CLI ----------------------------------------------------------------------------------


def test_never_writes_unless_asked(tmp_path):
    script = tmp_path / "gen.py"
    original = (SCRIPTS / "flux_chained_to.py").read_text()
    script.write_text(original)
    result = patch_script(script, {"offload": "model"})
    assert result.changed and result.output_path is None
    assert script.read_text() == original and sorted(p.name for p in tmp_path.iterdir()) == ["gen.py"]
    out = tmp_path / "gen_fit.py"
    result = patch_script(script, {"offload": "model"}, output=out)
    assert out.read_text() == result.source and script.read_text() == original


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipefit", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_writes_only_new_files_unless_told_and_then_keeps_a_backup(tmp_path):
    script = tmp_path / "gen.py"
    original = (SCRIPTS / "flux_chained_to.py").read_text()
    script.write_text(original)
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(PipefitError, match="exists; nothing was written"):
        patch_script(script, {"offload": "model"}, output=other)
    assert other.read_text() == "mine"
    # a relative output lands beside the script, and the answer says where, absolutely
    result = patch_script(str(script), {"offload": "model"}, output="gen_fit.py")
    assert result.output_path == str(tmp_path / "gen_fit.py") and Path(result.output_path).read_text() == result.source
    replaced = patch_script(script, {"offload": "model"}, output=script, overwrite=True)
    again = patch_script(script, {"offload": "sequential"}, output=script, overwrite=True)
    assert (tmp_path / "gen.py.bak").read_text() == original and (tmp_path / "gen.py.bak1").read_text() == replaced.source
    assert script.read_text() == again.source
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # written whole, through a renamed temporary
    with pytest.raises(PipefitError, match="does not exist"):
        patch_script(script, {"offload": "model"}, output=tmp_path / "no" / "such.py")
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(PipefitError, match="not a UTF-8 text file"):
        patch_script(binary, {"offload": "model"})


def test_cli_shows_a_diff_writes_with_o_and_reports_json(tmp_path):
    script = tmp_path / "gen.py"
    original = (SCRIPTS / "flux_device_var.py").read_text()
    script.write_text(original)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"offload": "group_block", "vae": {"tiling": True}}))

    shown = _cli("patch", "gen.py", "--plan", str(plan), cwd=tmp_path)
    assert shown.returncode == 0 and "+pipe.enable_group_offload(" in shown.stdout and "Nothing written" in shown.stdout
    diff = _cli("patch", "gen.py", "--plan", str(plan), "--diff", cwd=tmp_path)
    assert diff.stdout.startswith("--- a/gen.py") and script.read_text() == original

    data = json.loads(_cli("patch", "gen.py", "--plan", str(plan), "--json", cwd=tmp_path).stdout)
    assert set(data) >= {"changed", "source", "diff", "edits", "warnings"} and data["changed"]

    refused = _cli("patch", "gen.py", "--plan", str(plan), "-o", "gen.py", cwd=tmp_path)  # an existing file
    assert refused.returncode != 0 and "exists" in refused.stderr and "--force" in refused.stderr
    assert script.read_text() == original and "Traceback" not in refused.stderr
    written = _cli("patch", "gen.py", "--plan", str(plan), "-o", "gen.py", "--force", cwd=tmp_path)  # in place
    assert written.returncode == 0 and script.read_text() == data["source"]
    assert (tmp_path / "gen.py.bak").read_text() == original  # the script as it was
    again = _cli("patch", "gen.py", "--plan", str(plan), cwd=tmp_path)
    assert "already applies the plan" in again.stdout

    bad = _cli("patch", "gen.py", "--plan", '{"offload": "everywhere"}', cwd=tmp_path)
    assert bad.returncode == 2 and "offload" in bad.stderr and "Traceback" not in bad.stderr


# ---- running patched scripts on a CPU ----------------------------------------------------------------

def _runs():
    """(script, plan) pairs: each runnable script with two CPU plans. By default every plan runs once and
    every family at least once, the families taken in turn; the rest run under `-m slow` (each run is a
    child process: about 15 s)."""
    families = [CORPUS[name]["family"] for name in RUNNABLE]
    rank = {name: families[:i].count(families[i]) for i, name in enumerate(RUNNABLE)}
    plans_seen: set[str] = set()
    families_seen: set[str] = set()
    for name in sorted(RUNNABLE, key=lambda n: (rank[n], n)):
        i = RUNNABLE.index(name)
        first, second = CPU_PLANS[i % len(CPU_PLANS)], CPU_PLANS[(i + 3) % len(CPU_PLANS)]
        default = first not in plans_seen or CORPUS[name]["family"] not in families_seen
        yield pytest.param(name, first, marks=[] if default else [pytest.mark.slow])
        if default:
            plans_seen.add(first)
            families_seen.add(CORPUS[name]["family"])
        if second != first:
            yield pytest.param(name, second, marks=[pytest.mark.slow])


def test_every_cpu_plan_and_family_runs_by_default():
    default = [p.values for p in _runs() if not p.marks]
    assert {plan for _, plan in default} == set(CPU_PLANS)
    assert {CORPUS[name]["family"] for name, _ in default} == {CORPUS[name]["family"] for name in RUNNABLE}


def _run_patched(name: str, plan: str, hub: Path, workdir: Path, **env: str) -> None:
    meta = CORPUS[name]
    patch_script(SCRIPTS / name, plan_for(name, plan), output=workdir / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), **env}
    run = subprocess.run(
        [sys.executable, name, *meta["run"]["args"]], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for output in meta["run"]["outputs"]:
        assert (workdir / output).stat().st_size > 0, output


@pytest.mark.parametrize("name, plan", list(_runs()))
def test_patched_script_runs_on_cpu(name, plan, fake_hub, tmp_path):
    _run_patched(name, plan, fake_hub, tmp_path, CUDA_VISIBLE_DEVICES="")


GPU_RUNS = [(n, p) for n in ("flux_device_var.py", "sdxl_argparse.py") for p in sorted(PLANS) if p != "vae"] + [
    ("wan_device_var.py", p) for p in ("model", "group_stream", "nf4_model")
]


@pytest.mark.gpu
@pytest.mark.parametrize("name, plan", GPU_RUNS)
def test_patched_script_runs_on_gpu(name, plan, fake_hub, tmp_path):
    """The CUDA-only plans (offloading hooks, streams, bitsandbytes, compile) as patched, on the GPU."""
    _run_patched(name, plan, fake_hub, tmp_path)


def test_the_allocator_is_set_before_torch_starts_and_a_users_setting_wins():
    source = (SCRIPTS / "flux_device_var.py").read_text()
    patched = patch_source(source, {"offload": "model"}).source
    tree = ast.parse(patched)
    setting = next(i for i, s in enumerate(tree.body) if "PYTORCH_CUDA_ALLOC_CONF" in ast.unparse(s))
    first_import = next(i for i, s in enumerate(tree.body) if isinstance(s, (ast.Import, ast.ImportFrom))
                        and any(a.name.split(".")[0] in ("torch", "diffusers") for a in s.names)
                        or isinstance(s, ast.ImportFrom) and (s.module or "").split(".")[0] in ("torch", "diffusers"))
    assert setting < first_import
    assert 'os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")' in patched
    assert patch_source(patched, {"offload": "model"}).source == patched  # once only
    # the user's own setting stays theirs; "default" leaves the allocator alone
    own = 'import os\nos.environ["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"\n' + source
    assert patch_source(own, {"offload": "model"}).source.count("PYTORCH_CUDA_ALLOC_CONF") == 1
    assert "PYTORCH_CUDA_ALLOC_CONF" not in patch_source(source, {"offload": "model", "allocator": "default"}).source
