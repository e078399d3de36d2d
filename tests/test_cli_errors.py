"""Bad input at the command line: one line naming the fix, a non-zero exit, no traceback, nothing written."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "fixtures" / "scripts" / "flux_chained_to.py"


def _pipefit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipefit", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


CASES = [
    # (argv, what the one line says); {tmp} is the test's folder
    (["recommend", "builtin:sdxl-base", "--vram", "16", "--ram", "64GiB"], "has no unit. Write 16GiB"),
    (["recommend", "builtin:sdxl-base", "--vram", "0GiB", "--ram", "64GiB"], "not more than zero"),
    (["patch", "/bin/ls", "--plan", "{}"], "not a UTF-8 text file"),
    (["patch", "script.py", "--plan", '{"offload": "model"}', "-o", "{tmp}/no/such/x.py"], "does not exist"),
    (["patch", "script.py", "--plan", '{"offload": "model"}', "-o", "mine.txt"], "exists; nothing was written"),
    (["install-skills", "--target", "mine.txt"], "is a file, not a folder"),
    (["serve", "--http", "99999"], "is not a TCP port"),
    # files that would block, never end, or cost gigabytes to read
    (["triage", "fifo"], "is not a regular file"),
    (["triage", "/dev/zero"], "is not a regular file"),
    (["triage", "big.log"], "pipefit reads at most 4 MiB"),
    (["triage", "script.py", "--script", "fifo"], "is not a regular file"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "says"), CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line(argv, says, tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT.read_text())
    (tmp_path / "mine.txt").write_text("mine")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.log").write_bytes(b"x" * (5 * 2**20))
    before = sorted(p.name for p in tmp_path.iterdir())
    run = _pipefit(*(a.replace("{tmp}", str(tmp_path)) for a in argv), cwd=tmp_path)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "mine.txt").read_text() == "mine"


def test_a_port_in_use_is_said_before_the_server_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = _pipefit("serve", "--http", str(taken.getsockname()[1]), cwd=tmp_path)
    assert run.returncode == 2 and "Cannot serve on 127.0.0.1" in run.stderr and "Traceback" not in run.stderr
