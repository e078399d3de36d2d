"""The Agent Skill shipped with pipefit, and `pipefit install-skills`."""

from __future__ import annotations

import json

from pipefit.cli import EXIT_USER_ERROR, main
from tools.skills import skill_dir, skill_files


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
