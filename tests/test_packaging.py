"""The install is one import package, pipefit: a wheel holds only pipefit/ (tools, mcp_server and
skills mapped into it), and a user's own tools/ folder does not shadow it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    return next(out.glob("pipefit-*.whl"))


def test_the_wheel_holds_only_pipefit(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pipefit", wheel.name.split("-py")[0] + ".dist-info"}
    for needed in ("pipefit/tools/recommend.py", "pipefit/tools/strategies/loading.py", "pipefit/mcp_server/server.py",
                   "pipefit/skills/pipefit/SKILL.md", "pipefit/tools/gpus.json", "pipefit/tools/calibration.json",
                   "pipefit/tools/examples/flux1-dev/model_index.json"):  # fmt: skip
        assert needed in names, needed


def test_a_users_own_tools_package_does_not_break_pipefit(wheel, tmp_path):
    """Installed from the wheel, run from a project with its own tools/ (and skills/): the CLI, the
    server's module and the skill files are pipefit's."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    project = tmp_path / "project"
    for name in ("tools", "skills", "mcp_server"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("raise ImportError('the user project, not pipefit')\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import pipefit, pipefit.tools.recommend, pipefit.mcp_server.server\n"
            "from pipefit.tools.skills import skill_dir\n"
            "print(pipefit.tools.recommend.__file__, skill_dir() / 'SKILL.md')")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    module, skill = run.stdout.split()
    assert module.startswith(str(target)) and Path(skill).is_file() and skill.startswith(str(target))
    cli = subprocess.run([sys.executable, "-m", "pipefit", "--help"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert cli.returncode == 0 and "recommend" in cli.stdout
