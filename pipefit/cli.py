"""The ``pipefit`` command: parses arguments, calls a tool function, renders its result.

Tool functions live in ``tools/``; nothing here computes. Errors a user can cause arrive as
PipefitError and leave as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipefit.tools.errors import PipefitError
from pipefit.tools.model_source import builtin_examples

from .quiet import quiet_third_party_imports

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1  # `pipefit trial`: the script ran and did not succeed; the result says how
DTYPES = ("bfloat16", "float16", "float32")  # tools.measure.DTYPES, without importing it at start-up


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # `trial SCRIPT [options] -- ARGS`: what follows -- is the script's, options included
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(passthrough) - 1] if "--" in argv else argv)
    if passthrough and not hasattr(args, "script_args"):
        parser.error("arguments after -- are only for `pipefit trial`")
    if hasattr(args, "script_args"):
        args.script_args = passthrough
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.run(args)
    except PipefitError as exc:
        print(f"pipefit: error: {_in_cli_terms(str(exc), parser)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("pipefit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): the rest goes nowhere, quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _in_cli_terms(message: str, parser: argparse.ArgumentParser) -> str:
    """Errors name arguments as the tools take them (`vram`, what an MCP client sends); here they
    read as the flags a CLI user types (--vram)."""
    import re

    flags = {}
    for action in _actions(parser):
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs:
            flags.setdefault(action.dest, longs[0])
        elif not action.option_strings and isinstance(action.metavar, str):  # a positional: MODEL, SCRIPT
            flags.setdefault(action.dest, action.metavar)
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse has no public walk over sub-commands' options
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipefit",
        description="Measure a diffusers pipeline and this machine, and find the strategy that makes it fit.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    detect = commands.add_parser("detect", help="GPUs, free VRAM, RAM and its container limit, installed stack")
    detect.add_argument("--bandwidth", action="store_true", help="also time host-to-GPU copies (~1 s)")
    detect.add_argument("--json", action="store_true", help="machine-readable output")
    detect.set_defaults(run=_detect)

    measure = commands.add_parser(
        "measure",
        help="exact component sizes, blocks, offload groups, fp8 and quantized sizes (no weights loaded)",
        description="MODEL: a local diffusers folder (configs alone are enough), a hub id, a hub cache entry, "
        f"or builtin:NAME ({', '.join(builtin_examples())}: full-size configs shipped with pipefit).",
    )
    measure.add_argument("model", metavar="MODEL")
    measure.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    measure.add_argument("--no-cache", action="store_true", help="measure again even if a cached result exists")
    measure.add_argument("--json", action="store_true", help="machine-readable output")
    measure.set_defaults(run=_measure)

    triage = commands.add_parser(
        "triage",
        help="read an OOM traceback or log: what failed, where, by how much, and what to run next",
        description="FILE: a traceback or log to read, or - for standard input.",
    )
    triage.add_argument("file", metavar="FILE")
    triage.add_argument("--script", help="the script that failed, for the model id and the image/video sizes")
    triage.add_argument("--json", action="store_true", help="machine-readable output")
    triage.set_defaults(run=_triage)

    patch = commands.add_parser(
        "patch",
        help="rewrite a script so it applies a plan: a reviewable diff, or a new file with -o",
        description="PLAN: inline JSON or a .json file (the plan schema in README.md). Without -o nothing is "
        "written: the edits and the diff are shown for review.",
    )
    patch.add_argument("script", metavar="SCRIPT")
    patch.add_argument("--plan", required=True, metavar="PLAN")
    where = patch.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", metavar="OUT", help="write the patched script here (a new file; see --force)")
    where.add_argument("--diff", action="store_true", help="print only the unified diff (for `patch -p1`/`git apply`)")
    patch.add_argument("--replace", action="store_true",
                       help="make the plan complete: drop the script's own memory and speed settings the plan leaves unset")
    patch.add_argument("--force", action="store_true", dest="overwrite",
                       help="replace OUT if it exists (OUT may be SCRIPT itself: a backup SCRIPT.bak is kept)")
    patch.add_argument("--json", action="store_true", help="machine-readable output")
    patch.set_defaults(run=_patch)

    recommend = commands.add_parser(
        "recommend",
        help="every strategy predicted (peak VRAM, RAM, s/call), what fits and why, ranked",
        description="MODEL as for `pipefit measure`. Without --vram/--ram the detected GPU's free memory and the "
        "usable RAM (container limit included) are used.",
    )
    recommend.add_argument("model", metavar="MODEL")
    recommend.add_argument("--height", type=int, default=1024)
    recommend.add_argument("--width", type=int, default=1024)
    recommend.add_argument("--frames", type=int, help="video pipelines: frames per call")
    recommend.add_argument("--steps", type=int, help="default: the model card's example's, else 28")
    recommend.add_argument("--batch", type=int, default=1, help="images (videos) per call")
    recommend.add_argument("--guidance", type=float, metavar="SCALE", dest="guidance_scale",
                           help="guidance_scale of the call (default: the model card's example's, else the pipeline's own); "
                                "0 or 1 runs no CFG in most pipelines")
    recommend.add_argument("--gpu", metavar="NAME", help="plan for this card, e.g. 'RTX 4090' (its memory unless --vram)")
    recommend.add_argument("--vram", metavar="SIZE", help="plan for this much GPU memory, e.g. 16GiB")
    recommend.add_argument("--ram", metavar="SIZE", help="plan for this much host RAM, e.g. 64GiB")
    recommend.add_argument("--prefer", choices=("speed", "memory", "quality", "balanced"), default="balanced")
    recommend.add_argument("--calls", type=int, default=1, metavar="N",
                           help="calls one process makes (default 1): compiling pays off only over several")
    recommend.add_argument("--plan", metavar="PLAN", help="evaluate this plan only (inline JSON or a .json file)")
    recommend.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    recommend.add_argument("--all", action="store_true", help="list every option, not the best ten of each group")
    recommend.add_argument("--json", action="store_true", help="machine-readable output (every option)")
    recommend.set_defaults(run=_recommend)

    trial = commands.add_parser(
        "trial",
        usage="pipefit trial SCRIPT [options] [-- SCRIPT_ARGS ...]",
        help="run a script (or a plan applied to it) in a child process: real peak VRAM/RAM, step times, outcome",
        description="Runs SCRIPT as `python SCRIPT SCRIPT_ARGS` would, in a child process, and measures it: peak "
        "VRAM as the driver sees it, PyTorch's peaks, peak RSS, time per step. The script is never modified; with "
        "--plan a patched copy runs. Outcome: ok, cuda_oom, host_oom, timeout or error (exit status 0 only for ok).",
    )
    trial.add_argument("script", metavar="SCRIPT")
    trial.add_argument("--plan", metavar="PLAN", help="apply this plan first (inline JSON or a .json file)")
    trial.add_argument("--replace", action="store_true", help="as for `pipefit patch`: the plan complete")
    trial.add_argument("--vram-cap", metavar="SIZE", help="simulate a smaller GPU, e.g. 12GiB (needs an NVIDIA GPU)")
    trial.add_argument("--ram-cap", metavar="SIZE", help="stop the run when the RAM it holds passes SIZE, a simulated host "
                       "(mapped weight files, which the kernel can drop, do not count)")
    trial.add_argument("--timeout", type=float, metavar="S", help="stop it after S seconds (default: 30 min; 0: none)")
    trial.add_argument("--cwd", metavar="DIR", help="run in DIR (default: here)")
    trial.add_argument("--python", metavar="PY", help="the interpreter to run SCRIPT with (default: pipefit's)")
    trial.add_argument("--log-dir", metavar="DIR", help="keep the log here (default: ~/.cache/pipefit/trials)")
    trial.add_argument("--json", action="store_true", help="machine-readable output")
    trial.set_defaults(run=_trial, script_args=[])

    serve = commands.add_parser(
        "serve",
        help="the MCP server for agents: stdio (default) or streamable HTTP on localhost",
        description="Serves detect_hardware, measure_components, recommend, patch_script, run_trial and "
        "triage_oom, the skill's docs as skill://pipefit/ resources and the fix-oom prompt. Register it with "
        "Claude Code: claude mcp add pipefit -- pipefit serve",
    )
    serve.add_argument("--http", type=_port, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT/mcp")
    serve.set_defaults(run=_serve)

    install = commands.add_parser(
        "install-skills",
        help="copy pipefit's Agent Skill into .claude/skills/ (or --target DIR)",
    )
    install.add_argument("--target", metavar="DIR", help="the skills folder (default: .claude/skills)")
    install.add_argument("--force", action="store_true", help="replace a different pipefit skill already there")
    install.add_argument("--json", action="store_true", help="machine-readable output")
    install.set_defaults(run=_install_skills)
    return parser


def _detect(args: argparse.Namespace) -> int:
    from pipefit.tools.hardware import detect_hardware

    return _show(detect_hardware(bandwidth=args.bandwidth), args.json, "hardware")


def _measure(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipefit.tools.measure import measure_components

    quiet_third_party_imports()
    status = Console(stderr=True)
    with status.status("Measuring", spinner="dots") as spinner:
        result = measure_components(
            args.model, dtype=args.dtype, cache=not args.no_cache, progress=lambda message: spinner.update(message)
        )
    return _show(result, args.json, "measurement")


def _recommend(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipefit.tools.recommend import recommend

    quiet_third_party_imports()  # recommend measures, as `pipefit measure` does

    with Console(stderr=True).status("Measuring", spinner="dots") as spinner:
        result = recommend(
            args.model, height=args.height, width=args.width, frames=args.frames, steps=args.steps, batch=args.batch,
            guidance_scale=args.guidance_scale, vram=args.vram, ram=args.ram, prefer=args.prefer, plan=args.plan,
            dtype=args.dtype, gpu=args.gpu, calls=args.calls, progress=spinner.update,
        )  # fmt: skip
    return _show(result, args.json, "recommendation", args.all)


def _triage(args: argparse.Namespace) -> int:
    from pipefit.tools.triage import triage_oom

    text = sys.stdin.read() if args.file == "-" else _read_text(args.file, "log")
    script = _read_text(args.script, "script") if args.script else None
    return _show(triage_oom(text, script=script), args.json, "triage")


def _patch(args: argparse.Namespace) -> int:
    from pipefit.tools.patch import patch_script

    # OUT is a path as typed in the shell: relative to where the command runs
    output = Path(args.output).expanduser().absolute() if args.output else None
    result = patch_script(args.script, args.plan, output=output, overwrite=args.overwrite, replace=args.replace)
    if args.diff and not args.json:
        sys.stdout.write(result.diff)
        return 0
    return _show(result, args.json, "patch", args.script)


def _trial(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipefit.tools.trial import run_trial

    limit = {} if args.timeout is None else {"timeout": args.timeout or None}
    with Console(stderr=True).status("Starting", spinner="dots") as spinner:
        result = run_trial(
            args.script, args.plan, replace=args.replace, args=args.script_args, vram_cap=args.vram_cap, ram_cap=args.ram_cap,
            cwd=args.cwd, python=args.python, log_dir=args.log_dir, progress=spinner.update, **limit,
        )  # fmt: skip
    _show(result, args.json, "trial")
    return 0 if result.outcome == "ok" else EXIT_RUN_FAILED


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _serve(args: argparse.Namespace) -> int:
    import socket

    from pipefit.mcp_server.__main__ import serve

    if args.http is not None:  # a port someone else holds: say so before the server starts
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", args.http))
            except OSError as exc:
                raise PipefitError(f"Cannot serve on 127.0.0.1:{args.http}: {exc.strerror}.", "Pick another --http PORT.") from None
    serve(args.http)
    return 0


def _install_skills(args: argparse.Namespace) -> int:
    from pipefit.tools.skills import install_skills

    return _show(install_skills(args.target, force=args.force), args.json, "skill_install")


def _show(result, as_json: bool, view: str, *context) -> int:
    """JSON for machines, or the table/text ``render.<view>`` draws for people."""
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        from rich.console import Console

        from . import render

        getattr(render, view)(result, Console(), *context)
    return 0


def _read_text(path: str, what: str) -> str:
    from pipefit.tools.files import read_user_text

    return read_user_text(path, what, errors="replace")
