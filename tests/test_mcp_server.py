"""The MCP server through real MCP clients: in memory, over stdio (a child process) and over HTTP.

Every tool runs its real tools/ function on tiny fixtures; run_trial runs real child processes.
"""

from __future__ import annotations

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
from processes import alive, cmdline, gone_within

from pipefit.mcp_server.server import server
from pipefit.tools.skills import skill_dir

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TRIAL = FIXTURES / "trial"
TRACEBACK = (FIXTURES / "tracebacks" / "flux_denoise_torch2_5.txt").read_text()
TOOLS = {"detect_hardware", "measure_components", "recommend", "patch_script", "run_trial", "triage_oom"}
READ_ONLY = {"detect_hardware", "measure_components", "recommend", "triage_oom"}


def run(fn, *args):
    return anyio.run(fn, *args)


def _child_env(tmp_path: Path) -> dict[str, str]:
    """What a stdio client passes on (the SDK starts servers with a minimal environment)."""
    keep = ("PYTHONPATH", "VIRTUAL_ENV", "HF_HUB_OFFLINE", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    return {**env, "HF_HUB_OFFLINE": "1", "PIPEFIT_CACHE_DIR": str(tmp_path / "cache")}


def _text(result) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


# ---- schemas, annotations, descriptions --------------------------------------------------------


def test_tools_have_schemas_annotations_and_descriptions_that_say_what_next():
    async def main():
        async with Client(server) as client:
            return (await client.list_tools()).tools

    tools = {t.name: t for t in run(main)}
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        assert tool.output_schema and tool.output_schema["type"] == "object", name
        assert tool.input_schema["type"] == "object" and "ctx" not in tool.input_schema["properties"], name
        assert tool.input_schema["additionalProperties"] is False, name  # a misspelt argument is refused
        assert 200 < len(tool.description.encode()) < 2048 and not tool.description.startswith(" "), name
        assert tool.annotations.read_only_hint is (name in READ_ONLY), name
        # what reaches beyond the machine: a hub id (measure, recommend), the user's own code (run_trial)
        assert tool.annotations.open_world_hint is (name in ("measure_components", "recommend", "run_trial")), name
    # what an agent chains on: the models' own fields, required inputs, the next step
    assert {"options", "margin_bytes", "hardware", "workload"} <= set(tools["recommend"].output_schema["properties"])
    assert tools["recommend"].input_schema["required"] == ["model"]
    bounds = {k: next(((s.get("minimum"), s.get("maximum")) for s in [v, *v.get("anyOf", [])] if "minimum" in s), (None, None))
              for k, v in tools["recommend"].input_schema["properties"].items()
              if k in ("height", "width", "steps", "batch")}  # fmt: skip  # steps may be omitted (null): the model card's
    assert all(low is not None and high is not None for low, high in bounds.values()), bounds
    assert tools["patch_script"].input_schema["required"] == ["script", "plan"]
    # patch_script replaces a file when told to (overwrite); run_trial runs the user's code
    assert tools["patch_script"].annotations.destructive_hint is True and "overwrite" in tools["patch_script"].input_schema["properties"]
    assert tools["run_trial"].annotations.destructive_hint is True
    assert tools["run_trial"].annotations.idempotent_hint is False
    assert "peak_vram_bytes" in tools["run_trial"].output_schema["properties"]
    assert "Next: recommend" in tools["triage_oom"].description or "then recommend" in tools["triage_oom"].description
    assert "Next: patch_script" in tools["recommend"].description
    assert "Next: run_trial" in tools["patch_script"].description


# ---- every tool on tiny fixtures ---------------------------------------------------------------


def test_every_tool_answers_with_structured_results(tiny_dirs, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text((FIXTURES / "scripts" / "flux_device_var.py").read_text())
    before = script.read_text()
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    async def main():
        async with Client(server) as client:
            hardware = await client.call_tool("detect_hardware", {})
            measured = await client.call_tool(
                "measure_components", {"model": str(tiny_dirs["flux"])}, progress_callback=on_progress
            )
            advice = await client.call_tool(
                "recommend", {"model": "builtin:flux1-dev", "vram": "16GiB", "ram": "64GiB", "steps": 4}
            )
            plan = advice.structured_content["options"][0]["plan"]
            diff = await client.call_tool("patch_script", {"script": str(script), "plan": plan})
            written = await client.call_tool(
                "patch_script", {"script": str(script), "plan": plan, "output": str(tmp_path / "patched.py")}
            )
            triage = await client.call_tool("triage_oom", {"text": TRACEBACK})
            trial = await client.call_tool(
                "run_trial", {"script": str(TRIAL / "exits.py"), "args": ["0"], "timeout": 120},
                progress_callback=on_progress,
            )  # fmt: skip
            return hardware, measured, advice, diff, written, triage, trial

    hardware, measured, advice, diff, written, triage, trial = run(main)
    for result in (hardware, measured, advice, diff, written, triage, trial):
        assert not result.is_error, _text(result)
    assert "ram" in hardware.structured_content
    assert measured.structured_content["components"]["transformer"]["bytes"] > 0
    top = advice.structured_content["options"][0]
    assert top["fits"] and top["predicted"]["vram_bytes"] < 16 * 2**30
    assert diff.structured_content["diff"].startswith("---") and script.read_text() == before  # nothing written
    assert (tmp_path / "patched.py").read_text() == written.structured_content["source"]
    assert triage.structured_content["kind"] == "cuda_oom" and triage.structured_content["stage"] == "denoise"
    assert trial.structured_content["outcome"] == "ok" and trial.structured_content["exit_code"] == 0
    assert any("ok after" in (m or "") for m in progress), progress  # run_trial's progress
    assert len(progress) >= 2  # measure_components' too


def test_measuring_a_hub_id_sends_progress(fake_hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub))
    progress: list[tuple[float, str]] = []

    async def on_progress(value, total, message):
        progress.append((value, message))

    async def main():
        async with Client(server) as client:
            return await client.call_tool(
                "measure_components", {"model": "black-forest-labs/FLUX.1-dev", "refresh": True},
                progress_callback=on_progress,
            )  # fmt: skip

    result = run(main)
    assert not result.is_error, _text(result)
    assert result.structured_content["pipeline_class"] == "FluxPipeline"
    assert len(progress) >= 2 and [v for v, _ in progress] == sorted(v for v, _ in progress)
    assert any("transformer" in (m or "") for _, m in progress), progress


# ---- bad input: a tool error that names the fix, and the server goes on --------------------------


BAD_INPUT = [
    ("detect_hardware", {"bandwidth": "sometimes"}, "bandwidth"),
    ("measure_components", {"model": "/no/such/folder"}, "/no/such/folder"),
    ("recommend", {"model": "builtin:flux1-dev", "vram": "16 potatoes"}, "16 potatoes"),
    ("recommend", {"model": "builtin:flux1-dev", "height": 0}, "height"),
    ("recommend", {"model": "builtin:flux1-dev", "vram": "16GiB", "plan": {"offload": "sideways"}}, "offload"),
    ("patch_script", {"script": "/no/such/script.py", "plan": {"offload": "model"}}, "Check the path"),
    ("patch_script", {"script": str(FIXTURES / "scripts" / "r_syntax.py"), "plan": {"offload": "model"}}, "line"),
    ("run_trial", {"script": "/no/such/script.py"}, "Pass the path"),
    ("run_trial", {"script": str(TRIAL / "exits.py"), "timeout": -1}, "timeout"),
    ("triage_oom", {"text": TRACEBACK, "script_path": "/no/such/script.py"}, "Check the path"),
    ("triage_oom", {"text": TRACEBACK, "script_path": "/dev/zero"}, "not a regular file"),  # would never end
    ("patch_script", {"script": str(FIXTURES / "scripts" / "flux_chained_to.py"), "plan": {"offload": "model"},
                      "output": str(FIXTURES / "scripts" / "sdxl_docs.py")}, "exists; nothing was written"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "named"), BAD_INPUT, ids=[f"{t}-{i}" for i, (t, *_) in enumerate(BAD_INPUT)]
)
def test_bad_input_is_a_tool_error_and_the_server_goes_on(tool, arguments, named):
    async def main():
        async with Client(server) as client:
            bad = await client.call_tool(tool, arguments)
            after = await client.call_tool("triage_oom", {"text": TRACEBACK})
            return bad, after

    bad, after = run(main)
    assert bad.is_error and named in _text(bad), _text(bad)
    assert "Traceback" not in _text(bad)
    assert not after.is_error


def test_a_bug_in_a_tool_is_reported_and_the_server_goes_on(monkeypatch):
    import pipefit.tools.triage

    def broken(text, script=None):
        raise KeyError("stage")

    monkeypatch.setattr(pipefit.tools.triage, "triage_oom", broken)

    async def main():
        async with Client(server) as client:
            bad = await client.call_tool("triage_oom", {"text": TRACEBACK})
            after = await client.call_tool("detect_hardware", {})
            return bad, after

    bad, after = run(main)
    assert bad.is_error and "KeyError" in _text(bad) and "bug in pipefit" in _text(bad)
    assert not after.is_error


# ---- run_trial: timeout and cancellation leave nothing behind ------------------------------------


def test_run_trial_that_times_out_stops_the_tree(tmp_path):
    pid_file = tmp_path / "pids"

    async def main():
        async with Client(server) as client:
            return await client.call_tool(
                "run_trial", {"script": str(TRIAL / "hang.py"), "args": [str(pid_file)], "timeout": 3}
            )

    result = run(main)
    assert result.structured_content["outcome"] == "timeout"
    assert gone_within([int(p) for p in pid_file.read_text().split()], 5)


async def _cancel_once_started(client: Client, pid_file: Path) -> None:
    """Call run_trial on a script that hangs with a helper process, and cancel once both run."""
    async with anyio.create_task_group() as group:

        async def call():
            await client.call_tool("run_trial", {"script": str(TRIAL / "hang.py"), "args": [str(pid_file)]})

        group.start_soon(call)
        with anyio.fail_after(60):
            while not (pid_file.exists() and len(pid_file.read_text().split()) == 2):
                await anyio.sleep(0.1)
        group.cancel_scope.cancel()


def test_cancelled_run_trial_leaves_no_process(tmp_path):
    pid_file = tmp_path / "pids"

    async def main():
        async with Client(server) as client:
            await _cancel_once_started(client, pid_file)
            return await client.call_tool("triage_oom", {"text": TRACEBACK})  # still serving

    after = run(main)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert gone_within(pids, 15), [p for p in pids if alive(p)]
    assert not after.is_error


def test_run_trial_reports_the_scripts_ram_not_the_servers(tmp_path):
    """The server may hold gigabytes after a large request; a small script's peak must not show them."""
    ballast = bytearray(768 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])

    async def main():
        async with Client(server) as client:
            return await client.call_tool("run_trial", {"script": str(TRIAL / "exits.py"), "args": ["0"]})

    result = run(main).structured_content
    assert psutil.Process().memory_info().rss > 768 * 2**20
    assert result["outcome"] == "ok" and result["peak_rss_bytes"] < 256 * 2**20, result["peak_rss_bytes"]
    assert result["containment"] in ("cgroup", "subreaper", "session")
    del ballast


# ---- resources and the prompt ------------------------------------------------------------------


def test_skill_resources_and_fix_oom_prompt_are_readable():
    async def main():
        async with Client(server) as client:
            resources = (await client.list_resources()).resources
            skill = await client.read_resource("skill://pipefit/SKILL.md")
            prompts = (await client.list_prompts()).prompts
            prompt = await client.get_prompt("fix-oom", {"traceback": TRACEBACK, "script_path": "gen.py"})
            return resources, skill, prompts, prompt

    resources, skill, prompts, prompt = run(main)
    shipped = {p.relative_to(skill_dir()).as_posix() for p in skill_dir().rglob("*") if p.is_file()}
    assert {str(r.uri) for r in resources} == {f"skill://pipefit/{name}" for name in shipped}
    assert skill.contents[0].text == (skill_dir() / "SKILL.md").read_text()
    assert skill.contents[0].mime_type == "text/markdown"
    fix = next(p for p in prompts if p.name == "fix-oom")
    assert {a.name: a.required for a in fix.arguments}["traceback"] is True
    text = prompt.messages[0].content.text
    assert "Tried to allocate" in text and "gen.py" in text
    assert text.index("triage_oom") < text.index("recommend") < text.index("patch_script") < text.index("run_trial")


# ---- the real transports -------------------------------------------------------------------------


def test_stdio_server_in_a_child_process(tmp_path):
    """`python -m pipefit.mcp_server` as a client starts it: the same tools, real calls, a cancelled trial."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "pipefit.mcp_server"], cwd=str(ROOT), env=_child_env(tmp_path)
    )
    pid_file = tmp_path / "pids"

    async def main():
        async with Client(params) as client:
            tools = (await client.list_tools()).tools
            # before any tool asks for it, the server imports torch in the background (mcp_server/imports.py)
            assert await _loads_within(_server_process(), "libtorch", 60)
            triage = await client.call_tool("triage_oom", {"text": TRACEBACK})
            # recommend over stdio: tests/test_faults.py (34 cases, one a fitting answer)
            bad = await client.call_tool("measure_components", {"model": "/no/such/folder"})
            await _cancel_once_started(client, pid_file)
            after = await client.call_tool("detect_hardware", {})
            return tools, triage, bad, after

    tools, triage, bad, after = run(main)

    async def in_memory():
        async with Client(server) as client:
            return (await client.list_tools()).tools

    assert {t.name: t.input_schema for t in tools} == {t.name: t.input_schema for t in run(in_memory)}
    assert triage.structured_content["kind"] == "cuda_oom"
    assert bad.is_error and "/no/such/folder" in _text(bad)
    assert gone_within([int(p) for p in pid_file.read_text().split()], 15)
    assert not after.is_error


def _server_process() -> psutil.Process:
    # past an earlier test's children, exited (zombies) or gone
    return next(p for p in psutil.Process().children(recursive=True) if "pipefit.mcp_server" in " ".join(cmdline(p)))


async def _loads_within(process: psutil.Process, library: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(library in m.path for m in process.memory_maps()):
            return True
        await anyio.sleep(0.2)
    return False


def test_stdio_output_is_only_protocol_messages(tmp_path):
    """Raw JSON-RPC over the pipes: every line the server writes to stdout is a protocol message,
    also while a tool imports torch and diffusers (libraries that like to print)."""
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "measure_components", "arguments": {"model": "builtin:wan2.1-t2v-1.3b"}}},
    ]  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "pipefit.mcp_server"], cwd=ROOT, env={**os.environ, **_child_env(tmp_path)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for message in messages:
            child.stdin.write((json.dumps(message) + "\n").encode())
        child.stdin.flush()
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(json.loads(line))  # fails the test on anything that is not JSON
            if lines[-1].get("id") == 2:
                break
    finally:
        child.stdin.close()
        child.wait(timeout=20)
    assert all(m["jsonrpc"] == "2.0" for m in lines)
    answer = next(m for m in lines if m.get("id") == 2)
    assert answer["result"]["structuredContent"]["pipeline_class"].startswith("Wan")


def test_http_server_on_localhost(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "wb")  # a file, not a pipe nobody reads: a full pipe would stall the server
    child = subprocess.Popen(
        [sys.executable, "-m", "pipefit", "serve", "--http", str(port)], cwd=ROOT,
        env={**os.environ, **_child_env(tmp_path)}, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            connections = [c for c in psutil.Process(child.pid).net_connections() if c.status == psutil.CONN_LISTEN]
            if connections:
                break
            assert child.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        assert {c.laddr.ip for c in connections} == {"127.0.0.1"}  # not reachable from other machines

        pid_file = tmp_path / "pids"

        async def main():
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                tools = (await client.list_tools()).tools
                triage = await client.call_tool("triage_oom", {"text": TRACEBACK})
                await _cancel_once_started(client, pid_file)  # closes the request's stream: the cancel
                cancelled = time.monotonic()
                pids = [int(p) for p in pid_file.read_text().split()]
                while any(alive(p) for p in pids) and time.monotonic() - cancelled < 10:
                    await anyio.sleep(0.02)  # not time.sleep: the client closes the stream on this loop
                return tools, triage, not any(alive(p) for p in pids), time.monotonic() - cancelled

        tools, triage, gone, seconds = run(main)
        assert {t.name for t in tools} == TOOLS and triage.structured_content["kind"] == "cuda_oom"
        assert gone and seconds < 2, seconds  # the tree stops within about a second of the cancel
    finally:
        child.terminate()
        child.wait(timeout=20)
        log.close()
