"""The Agent Skill shipped with pipefit: `pipefit install-skills`, and its docs kept true for the
installed libraries (every API they name exists, every config they show is accepted)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import typing
from pathlib import Path

import pytest

from pipefit.cli import EXIT_USER_ERROR, main
from pipefit.tools.skills import skill_dir, skill_files


def test_install_copies_the_skill_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["install-skills"]) == 0
    installed = tmp_path / ".claude" / "skills" / "pipefit"
    assert str(installed) in capsys.readouterr().out.replace("\n", "")
    for name in skill_files():
        assert (installed / name).read_bytes() == (skill_dir() / name).read_bytes()

    assert main(["install-skills", "--json"]) == 0  # again: nothing to do
    assert json.loads(capsys.readouterr().out)["changed"] is False


def test_a_different_copy_is_replaced_only_with_force(tmp_path, capsys):
    target = tmp_path / "agent-skills"
    assert main(["install-skills", "--target", str(target)]) == 0
    edited = target / "pipefit" / "SKILL.md"
    edited.write_text(edited.read_text() + "\nmy notes\n")
    capsys.readouterr()

    assert main(["install-skills", "--target", str(target)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "different pipefit skill" in err and "--force" in err
    assert edited.read_text().endswith("my notes\n")  # untouched

    assert main(["install-skills", "--target", str(target), "--force"]) == 0
    assert edited.read_bytes() == (skill_dir() / "SKILL.md").read_bytes()


def test_a_file_in_the_way_is_an_error(tmp_path, capsys):
    (tmp_path / "pipefit").write_text("not a folder")
    assert main(["install-skills", "--target", str(tmp_path)]) == EXIT_USER_ERROR
    assert "not a folder" in capsys.readouterr().err


# ---- the skill's docs stay true for the installed libraries ------------------------------------

DOCS = sorted(skill_dir().rglob("*.md"))
LIBRARIES = ("diffusers", "torch", "torchao", "transformers", "bitsandbytes", "accelerate")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
NEGATED = re.compile(r"\b(no|not|removed|never|instead of)\b", re.IGNORECASE)  # a sentence saying an API does not exist


def _blocks(language: str) -> list[tuple[str, str]]:
    return [(doc.name, m.group(2)) for doc in DOCS for m in FENCE.finditer(doc.read_text()) if m.group(1) == language]


def _frontmatter() -> tuple[dict[str, str], str]:
    text = (skill_dir() / "SKILL.md").read_text()
    head, _, body = text.removeprefix("---\n").partition("\n---\n")
    fields = dict(line.split(": ", 1) for line in head.splitlines())
    return fields, body


def test_frontmatter_meets_the_agent_skills_limits():
    fields, body = _frontmatter()
    assert set(fields) == {"name", "description"}
    name, description = fields["name"], fields["description"]
    assert name == skill_dir().name and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) and len(name) <= 64
    assert len(description) <= 1024 and "<" not in description and ">" not in description
    triggers = description[:250]
    assert "OutOfMemoryError" in triggers and "VRAM" in triggers and "diffusers" in triggers
    assert "fit" in triggers and "faster" in triggers
    assert len(body.splitlines()) < 500


def test_every_reference_file_is_linked_and_every_link_resolves():
    linked = set()
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
            assert not target.startswith(("http://", "https://")) or doc.name != "SKILL.md", target
            if target.startswith(("http://", "https://")):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_file(), f"{doc.name}: broken link {target}"
            linked.add(path)
    assert {d.resolve() for d in DOCS if d.name != "SKILL.md"} <= linked  # no orphan reference


@pytest.mark.parametrize(("doc", "code"), _blocks("python"), ids=lambda v: v if v.endswith(".md") else "")
def test_python_blocks_compile_and_name_only_what_exists(doc, code):
    tree = ast.parse(code, filename=doc)  # a SyntaxError fails here
    compile(tree, doc, "exec")
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in LIBRARIES:
                    importlib.import_module(a.name)
                    aliases[a.asname or a.name.split(".")[0]] = a.name.split(".")[0] if not a.asname else a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            module = importlib.import_module(node.module)
            for a in node.names:
                assert hasattr(module, a.name), f"{doc}: from {node.module} import {a.name}"
                aliases[a.asname or a.name] = f"{node.module}:{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            _assert_exists(ast.unparse(node), aliases, doc)


def _assert_exists(dotted: str, aliases: dict[str, str], where: str) -> None:
    """``torch.float8_e4m3fn``, ``transformers.TorchAoConfig``, ``pipe.vae.enable_tiling``: each part exists."""
    root, *parts = dotted.split(".")
    if root == "pipe":
        from diffusers import AutoencoderKL, AutoencoderKLWan, DiffusionPipeline, FluxTransformer2DModel, ModelMixin

        # every VAE named must have it; a denoiser method may be a mixin's (enable_cache: CacheMixin's)
        owners = {"vae": (AutoencoderKL, AutoencoderKLWan), "transformer": (FluxTransformer2DModel,), "unet": (ModelMixin,)}
        if parts and parts[0] in owners and len(parts) > 1:
            for owner in owners[parts[0]]:
                assert hasattr(owner, parts[1]), f"{where}: {owner.__name__} has no {parts[1]} ({dotted})"
        elif parts and parts[0] not in owners:
            assert hasattr(DiffusionPipeline, parts[0]), f"{where}: DiffusionPipeline has no {parts[0]} ({dotted})"
        return
    if root not in aliases:
        return  # a local variable (image.images, ...)
    module, _, name = aliases[root].partition(":")
    obj = importlib.import_module(module)
    if name:
        obj = getattr(obj, name)
    for part in parts:
        if not hasattr(obj, part):
            submodule = f"{obj.__name__}.{part}" if isinstance(obj, type(importlib)) else None
            assert submodule and importlib.util.find_spec(submodule), f"{where}: {dotted} does not exist"
            obj = importlib.import_module(submodule)
        else:
            obj = getattr(obj, part)


def _sentences(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text())
    return [s for para in re.split(r"\n\s*\n", text) for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split()))]


def test_apis_named_in_the_text_exist_unless_the_sentence_says_they_do_not():
    checked = 0
    for doc in DOCS:
        for sentence in _sentences(doc):
            for span in re.findall(r"`([^`]+)`", sentence):
                dotted = re.match(r"((?:diffusers|torch|torchao|transformers|pipe)(?:\.\w+)+)", span)
                if dotted and not NEGATED.search(sentence):
                    root = dotted.group(1).split(".")[0]
                    _assert_exists(dotted.group(1), {root: root} if root != "pipe" else {}, f"{doc.name}: {sentence}")
                    checked += 1
    assert checked >= 10


def test_quantization_configs_in_the_docs_are_accepted(tmp_path):
    """Each PipelineQuantizationConfig(...) the docs show is built, imports and all, as written."""
    built = 0
    for doc, code in _blocks("python"):
        tree = ast.parse(code)
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in tree.body:
            call = getattr(node, "value", None)
            if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("PipelineQuantizationConfig"):
                namespace = {}
                module = ast.Module(body=[*imports, node], type_ignores=[])
                exec(compile(module, doc, "exec"), namespace)  # noqa: S102 (our own docs)
                built += 1
    assert built >= 2
    from diffusers import PipelineQuantizationConfig

    with pytest.raises(ValueError, match="signatures"):  # what the docs warn about, still true
        PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"})


def _first_column(doc: str, header: str) -> list[str]:
    """Backticked values in the first column of the table whose first header cell is ``header``."""
    rows, inside = [], False
    for line in (skill_dir() / "references" / doc).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            inside = False
        elif cells[0] == header:
            inside = True
        elif inside and not set(cells[0]) <= set("-: "):
            rows += re.findall(r"`([^`]+)`", cells[0])
    return rows


def test_strategies_and_backends_named_in_tables_exist_in_tools():
    import diffusers

    from pipefit.tools.plan import OffloadKind, Plan, QuantBackendName

    offload = _first_column("offloading.md", "plan `offload`")
    assert set(offload) == set(typing.get_args(OffloadKind))  # every placement, and only those
    backends = _first_column("quantization.md", "plan backend")
    assert backends and set(backends) <= set(typing.get_args(QuantBackendName))
    compile_modes = _first_column("torch-compile.md", "plan `compile`")
    assert set(compile_modes) == set(typing.get_args(Plan.model_fields["compile"].annotation)) - {"none"}
    methods = _first_column("step-caching.md", "plan `cache.method`")
    from pipefit.tools.strategies.cache import CONFIG_CLASS

    assert set(methods) == set(CONFIG_CLASS)  # every cache pipefit plans, and only those
    attention = [n for cell in _first_column("attention.md", "backend name") for n in cell.split(", ")]
    known = {b.value for b in diffusers.AttentionBackendName}
    assert attention and set(attention) <= known, set(attention) - known
