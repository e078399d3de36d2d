"""The pipefit Agent Skill (``skills/pipefit/``): where its files are, and installing it for an agent."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from .errors import PipefitError

SKILL_NAME = "pipefit"
DEFAULT_TARGET = Path(".claude") / "skills"


class SkillInstall(BaseModel):
    """What ``install_skills`` did."""

    source: str = Field(description="the skill folder copied from")
    path: str = Field(description="the installed skill folder")
    files: list[str] = Field(description="files, relative to the skill folder")
    changed: bool = Field(description="false when an identical copy was already there")


def skill_dir() -> Path:
    """The skill shipped with pipefit (next to ``tools/`` in a checkout and in an installed wheel)."""
    folder = Path(__file__).resolve().parents[1] / "skills" / SKILL_NAME
    if not (folder / "SKILL.md").is_file():
        raise PipefitError(
            f"pipefit's skill is missing: no {folder / 'SKILL.md'}.",
            "Reinstall pipefit (pip install -e . in a checkout).",
        )
    return folder


def skill_files() -> list[str]:
    """The skill's files, relative to its folder, SKILL.md first."""
    root = skill_dir()
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sorted(names, key=lambda name: (name != "SKILL.md", name))


def install_skills(target: str | Path | None = None, force: bool = False) -> SkillInstall:
    """Copy the pipefit skill into ``target``/pipefit (default ``.claude/skills``, Claude Code's project
    skills folder). An existing pipefit folder there is replaced only when identical or with ``force``."""
    source = skill_dir()
    root = Path(target if target is not None else DEFAULT_TARGET).expanduser().resolve()
    dest = root / SKILL_NAME
    files = skill_files()
    if root.exists() and not root.is_dir():
        raise PipefitError(f"The target {str(root)!r} is a file, not a folder.", "Pass a folder as --target.")
    if dest.exists() and not dest.is_dir():
        raise PipefitError(f"{dest} exists and is not a folder.", "Pass another --target.")
    if dest.is_dir():
        same = all((dest / name).is_file() and filecmp.cmp(source / name, dest / name, shallow=False) for name in files)
        extra = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - set(files)
        if same and not extra:
            return SkillInstall(source=str(source), path=str(dest), files=files, changed=False)
        if not force:
            raise PipefitError(
                f"{dest} already holds a different pipefit skill (edited, or from another version).",
                "Pass --force to replace it, or --target another folder.",
            )
        shutil.rmtree(dest)
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dest / name)
    return SkillInstall(source=str(source), path=str(dest), files=files, changed=True)
