"""The fault corpus, tests/fixtures/faults/cases.json: bad and odd input through the CLI and through a
real MCP client over stdio and over HTTP.

Each case names a tool and its MCP arguments, the CLI's argv where the CLI has the same input, and
what the answer says: one clear error (``says``; ``cli_says`` where the CLI words it with its flags),
or a right answer (``says`` null, with the trial ``outcome`` where there is one). After every case:
the server still answers, no process the case started is left, and no file was written but the one
a case asks for (``writes``). Placeholders: {ws} a workspace of awkward files (a FIFO, a 5 MiB file,
binary bytes, a folder, a broken model_index.json), {out} a folder for what the scripts write,
{fixtures} tests/fixtures, {transport} cli, stdio or http; text "@PATH" is that file's contents.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
from mcp import Client, StdioServerParameters
from processes import alive, cmdline

from pipefit.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
CASES = json.loads((FIXTURES / "faults" / "cases.json").read_text())
TRACEBACK = (FIXTURES / "tracebacks" / "flux_denoise_torch2_5.txt").read_text()
ROOT = Path(__file__).resolve().parents[1]


def _has_gpu() -> bool:
    from pipefit.tools.sampler import Nvml

    nvml = Nvml()
    nvml.close()
    return nvml.available


def _workspace(root: Path) -> tuple[Path, Path]:
    ws, out = root / "ws", root / "out"
    ws.mkdir()
    out.mkdir()
    (ws / "script.py").write_text((FIXTURES / "scripts" / "flux_chained_to.py").read_text())
    (ws / "mine.txt").write_text("mine")
    (ws / "big.log").write_bytes(b"x" * (5 * 2**20))
    (ws / "binary.py").write_bytes(b"\xff\xfe\x00\x01 not text")
    (ws / "folder").mkdir()
    (ws / "broken").mkdir()
    (ws / "broken" / "model_index.json").write_text("{not json")
    os.mkfifo(ws / "fifo")
    return ws, out


def _fill(value, ws: Path, out: Path, transport: str):
    if isinstance(value, dict):
        return {k: _fill(v, ws, out, transport) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ws, out, transport) for v in value]
    if not isinstance(value, str):
        return value
    text = value.replace("{ws}/../", f"{out}/").replace("{ws}", str(ws)).replace("{out}", str(out))
    text = text.replace("{fixtures}", str(FIXTURES)).replace("{transport}", transport)
    return Path(text[1:]).read_text() if text.startswith("@") else text


def _snapshot(ws: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(ws)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in ws.rglob("*")}


def _runnable(case: dict, gpu: bool) -> bool:
    return case.get("needs") != "no_gpu" or not gpu


def _cli_words(case: dict) -> str:
    if "cli_says" in case:
        return case["cli_says"]
    import re

    return re.sub(r"`([a-z_]+)`", lambda m: "--" + m.group(1).replace("_", "-"), case["says"])


def _written(before: dict, after: dict, case: dict, transport: str) -> list[str]:
    allowed = {case["writes"].replace("{transport}", transport)} if case.get("writes") else set()
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    return sorted(changed - allowed)


# ---- the CLI ----------------------------------------------------------------------------------------


def test_every_fault_through_the_cli(tmp_path, monkeypatch):
    ws, out = _workspace(tmp_path)
    monkeypatch.chdir(ws)
    gpu, problems, ran = _has_gpu(), [], 0
    for case in CASES:
        if not case["cli"] or not _runnable(case, gpu):
            continue
        ran += 1
        argv = _fill(case["cli"], ws, out, "cli")
        before, children_before = _snapshot(ws), {p.pid for p in psutil.Process().children(recursive=True)}
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
        err_lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before and alive(p.pid)]
        says = None if case["says"] is None and "cli_says" not in case else _cli_words(case)
        why = []
        if says is None:
            expected = 0 if case.get("outcome", "ok") == "ok" else 1
            if code != expected:
                why.append(f"exit {code}, not {expected}: {stderr.getvalue()[-500:]}")
        else:
            if code != 2:
                why.append(f"exit {code}, not 2")
            if not err_lines or says not in err_lines[-1] or "error" not in err_lines[-1]:
                why.append(f"last line {err_lines[-1:]!r} does not say {says!r}")
            if len(err_lines) > 1 and not err_lines[0].startswith("usage:"):  # argparse's usage line is its own
                why.append(f"{len(err_lines)} lines on stderr")
        if "Traceback" in stderr.getvalue():
            why.append("a traceback")
        if written := _written(before, _snapshot(ws), case, "cli"):
            why.append(f"wrote {written}")
        if left:
            why.append(f"left processes {[p.pid for p in left]}")
        problems += [f"{case['id']}: {w}" for w in why]
    assert ran >= 80 and not problems, "\n".join(problems)


# ---- MCP over stdio and HTTP ------------------------------------------------------------------------


async def _through(client: Client, server_pid: int, ws: Path, out: Path, transport: str) -> tuple[int, list[str]]:
    gpu, problems, ran = _has_gpu(), [], 0
    for case in CASES:
        if case["arguments"] is None or not _runnable(case, gpu):
            continue
        ran += 1
        before = _snapshot(ws)
        result = await client.call_tool(case["tool"], _fill(case["arguments"], ws, out, transport))
        text = " ".join(getattr(c, "text", "") for c in result.content)
        why = []
        if case["says"] is None:
            if result.is_error:
                why.append(f"an error: {text[:300]}")
            elif case.get("outcome") and result.structured_content["outcome"] != case["outcome"]:
                why.append(f"outcome {result.structured_content['outcome']}, not {case['outcome']}")
        elif not result.is_error or case["says"] not in text:
            why.append(f"{'an answer' if not result.is_error else 'an error'} that does not say {case['says']!r}: {text[:300]}")
        if "Traceback" in text or (result.is_error and "\n" in text):
            why.append(f"not one clear message: {text[:300]}")
        alive_after = await client.call_tool("triage_oom", {"text": TRACEBACK})
        if alive_after.is_error or alive_after.structured_content["kind"] != "cuda_oom":
            why.append("the server did not answer correctly after it")
        left = [p.pid for p in psutil.Process(server_pid).children(recursive=True) if alive(p.pid)]
        if left:
            why.append(f"left processes {left}")
        if written := _written(before, _snapshot(ws), case, transport):
            why.append(f"wrote {written}")
        problems += [f"{transport} {case['id']}: {w}" for w in why]
    return ran, problems


def _env(tmp_path: Path) -> dict[str, str]:
    keep = ("PYTHONPATH", "VIRTUAL_ENV", "HF_HOME", "PATH")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "HF_HUB_OFFLINE": "1",
            "PIPEFIT_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip


def test_every_fault_through_mcp_over_stdio(tmp_path):
    ws, out = _workspace(tmp_path)
    params = StdioServerParameters(command=sys.executable, args=["-m", "pipefit", "serve"], env=_env(tmp_path), cwd=ws)

    async def run():
        async with Client(params) as client:
            (server,) = [p for p in psutil.Process().children() if alive(p.pid) and "serve" in cmdline(p)]
            return await _through(client, server.pid, ws, out, "stdio")

    ran, problems = anyio.run(run)
    assert ran >= 80 and not problems, "\n".join(problems)


@pytest.mark.slow  # the same faults and tools as over stdio; HTTP itself: test_mcp_server.test_http_server_on_localhost
def test_every_fault_through_mcp_over_http(tmp_path):
    ws, out = _workspace(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "pipefit", "serve", "--http", str(port)], cwd=ws, env={**os.environ, **_env(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(c.status == psutil.CONN_LISTEN for c in psutil.Process(server.pid).net_connections()):
            assert server.poll() is None and time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.2)

        async def run():
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                return await _through(client, server.pid, ws, out, "http")

        ran, problems = anyio.run(run)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert ran >= 80 and not problems, "\n".join(problems)
