"""Readable tables for people; machines get ``--json`` instead."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipefit.tools.units import GiB, format_bytes

if TYPE_CHECKING:  # the models only annotate here; importing them would pull libcst into `pipefit detect`
    from pipefit.tools.hardware import HardwareReport
    from pipefit.tools.measure import PipelineMeasurement
    from pipefit.tools.patch import PatchResult
    from pipefit.tools.recommend import Recommendation
    from pipefit.tools.skills import SkillInstall
    from pipefit.tools.triage import OomTriage
    from pipefit.tools.trial import TrialResult


def hardware(report: HardwareReport, console: Console) -> None:
    if report.gpus:
        table = Table(title=f"GPUs (driver {report.driver_version or '?'}, CUDA {report.cuda_driver_version or '?'})")
        for column in ("#", "name", "total", "free", "used", "other procs", "sm", "bf16", "fp8 compute", "flash attn"):
            table.add_column(column, justify="right" if column not in ("name",) else "left")
        for gpu in report.gpus:
            caps = gpu.capabilities
            flag = lambda ok: "-" if caps is None else ("yes" if ok else "no")  # noqa: E731
            table.add_row(
                str(gpu.index), gpu.name, format_bytes(gpu.total_bytes), format_bytes(gpu.free_bytes),
                format_bytes(gpu.used_bytes), format_bytes(gpu.other_processes_bytes), gpu.compute_capability or "-",
                flag(caps and caps.bf16), flag(caps and caps.fp8_compute), flag(caps and caps.flash_attention),
            )  # fmt: skip
        console.print(table)
    else:
        console.print("[bold]GPU:[/] none")
    ram = report.ram
    limit = f", container limit {format_bytes(ram.container_limit_bytes)}" if ram.container_limit_bytes else ""
    console.print(
        f"[bold]RAM:[/] {format_bytes(ram.total_bytes)} total, {format_bytes(ram.available_bytes)} available{limit}; "
        f"usable {format_bytes(ram.effective_bytes)}; swap {format_bytes(ram.swap_total_bytes)}; "
        f"{report.cpu_count} CPUs"
    )
    if report.bandwidth:
        bw = report.bandwidth
        console.print(
            f"[bold]Host->GPU copies:[/] pinned {bw.pinned_bytes_per_s / 1e9:.1f} GB/s, "
            f"pageable {bw.pageable_bytes_per_s / 1e9:.1f} GB/s"
        )
    stack = ", ".join(f"{name} {version or '[dim]missing[/]'}" for name, version in report.stack.items())
    console.print(f"[bold]Stack:[/] Python {report.python}; {stack}")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")


def measurement(result: PipelineMeasurement, console: Console) -> None:
    table = Table(
        title=f"{result.model} ({result.pipeline_class}) at {result.dtype}, sizes in GiB", box=box.SIMPLE_HEAD, pad_edge=False,
        caption="fp8: layerwise fp8 casting; nf4, int8: bitsandbytes; ao int8: torchao int8 weight-only; "
        "leaf: the largest layer (what leaf-level offloading moves at once)",
        caption_justify="left",
    )
    with_class = console.width >= 100  # on a narrow terminal the sizes matter more; --json has the class
    table.add_column("component", no_wrap=True)
    if with_class:
        table.add_column("class", overflow="ellipsis", max_width=28, no_wrap=True)
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(result.dtype, result.dtype)
    for column in ("params", dtype, "fp8", "nf4", "int8", "ao int8", "leaf"):
        table.add_column(column, justify="right", no_wrap=True)
    unsized = []
    for name, comp in result.components.items():
        if comp.bytes is None:
            unsized.append(name)
            continue
        quant = comp.quantized_bytes or {}
        table.add_row(
            name, *([comp.class_name] if with_class else []), f"{comp.params / 1e9:.3f}B" if comp.params else "-",
            _gib(comp.bytes),
            _gib(comp.layerwise_fp8_bytes), _gib(quant.get("bnb_nf4")), _gib(quant.get("bnb_int8")),
            _gib(quant.get("torchao_int8wo")), _gib(comp.largest_leaf_bytes),
        )  # fmt: skip
    table.add_section()
    table.add_row("total", *([""] if with_class else []), "", _gib(result.total_bytes))
    console.print(table)
    for name, comp in result.components.items():
        groups = comp.block_offload_groups_bytes
        if comp.blocks or len(groups) > 1:
            blocks = ", ".join(f"{b.attr} {b.count} x {format_bytes(b.bytes_each)}" for b in comp.blocks)
            console.print(
                f"[bold]{name}[/]: {blocks or 'no block lists'}; block-level offload makes {len(groups)} "
                f"group(s), largest {format_bytes(max(groups))}"
            )
        elif groups:
            console.print(f"[bold]{name}[/]: block-level offload moves it whole ({format_bytes(groups[0])})")
    if unsized:
        console.print(f"[dim]no weights: {', '.join(unsized)}[/]")
    how = "answered from the cache" if result.from_cache else "measured"
    console.print(f"[dim]{how} in {result.seconds:.2f} s, no weights loaded[/]")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def triage(result: OomTriage, console: Console) -> None:
    console.print(f"[bold]{result.kind}[/]" + (f": {escape(result.error)}" if result.error else ""), highlight=False)
    facts = [
        ("stage", result.stage), ("component", result.component), ("GPU", result.gpu_index),
        ("model", result.model_id),
    ]  # fmt: skip
    sizes = [
        ("tried to allocate", result.tried_to_allocate_bytes), ("free", result.free_bytes),
        ("total", result.total_bytes), ("reserved by PyTorch", result.reserved_bytes),
        ("allocated by PyTorch", result.allocated_bytes), ("reserved, unallocated", result.reserved_unallocated_bytes),
        ("other processes", result.other_processes_bytes), ("short by", result.shortfall_bytes),
    ]  # fmt: skip
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in facts:
        if value is not None:
            table.add_row(label, escape(str(value)))
    for label, value in sizes:
        if value is not None:
            table.add_row(label, format_bytes(value))
    if table.row_count:
        console.print(table)
    for line in result.advice:
        console.print(f"- {escape(line)}", highlight=False)


def skill_install(result: SkillInstall, console: Console) -> None:
    if result.changed:
        files = f"{len(result.files)} file{'' if len(result.files) == 1 else 's'}"
        console.print(f"Installed the pipefit skill ({files}) in {escape(result.path)}")
    else:
        console.print(f"The pipefit skill in {escape(result.path)} is already up to date")
    console.print("Agents that read that folder (Claude Code: .claude/skills/ in a project) load it when relevant.")


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def patch(result: PatchResult, console: Console, script: str) -> None:
    if not result.changed:
        console.print(f"{escape(script)} already applies the plan: nothing to change.")
        return
    for edit in result.edits:
        console.print(f"- {escape(edit)}", soft_wrap=True)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if result.output_path:
        console.print(f"[bold]Wrote[/] {escape(result.output_path)}")
    else:
        styles = {"+++": "bold", "---": "bold", "@@": "cyan", "+": "green", "-": "red"}
        for line in result.diff.splitlines():
            style = next((s for prefix, s in styles.items() if line.startswith(prefix)), None)
            console.print(escape(line), style=style, soft_wrap=True, highlight=False)
        console.print("[dim]Nothing written: add -o OUT to write the patched script.[/]")


def _ram_cell(p) -> str:
    """'LOAD / RUN', with '+ MAPPED' where loading maps weight files the kernel can drop (not counted;
    the process's own libraries, under a GiB, are not worth a mention)."""
    load = format_bytes(p.ram_load_held_bytes)
    mapped = f" (+{format_bytes(p.ram_load_mapped_bytes)} mapped)" if p.ram_load_mapped_bytes > GiB else ""
    return f"{load}{mapped} / {format_bytes(p.ram_run_bytes)}"


def _phases(peak: int, loading: int | None, running: int | None) -> str:
    """'PEAK  (loading X, running Y)' for the phases measured."""
    phases = [(label, value) for label, value in (("loading", loading), ("running", running)) if value is not None]
    split = f"  ({', '.join(f'{label} {format_bytes(value)}' for label, value in phases)})" if phases else ""
    return format_bytes(peak) + split


def trial(result: TrialResult, console: Console) -> None:
    style = "green" if result.outcome == "ok" else "red"
    ran = f" (patched copy: {escape(result.ran)})" if result.ran != result.script else ""
    console.print(f"[bold {style}]{result.outcome}[/] in {result.seconds:.1f} s: {escape(result.script)}{ran}")
    if result.error:
        console.print(escape(result.error), highlight=False)
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    source = {"nvml_process": "NVML, this run's processes", "nvml_device": "NVML, device growth since start"}
    vram = format_bytes(result.peak_vram_bytes) if result.peak_vram_bytes is not None else "- (no GPU)"
    if result.vram_source:
        vram += f"  ({source[result.vram_source]})"
    if result.peak_vram_load_bytes:
        vram += f"; while loading {format_bytes(result.peak_vram_load_bytes)}"
    table.add_row("peak VRAM", vram)
    table.add_row("torch allocated / reserved", f"{format_bytes(result.peak_torch_allocated_bytes)} / "
                  f"{format_bytes(result.peak_torch_reserved_bytes)}")  # fmt: skip
    table.add_row("peak RAM (RSS)", _phases(result.peak_rss_bytes, result.peak_rss_load_bytes, result.peak_rss_run_bytes))
    if result.peak_held_bytes is not None and result.peak_held_bytes != result.peak_rss_bytes:
        held = _phases(result.peak_held_bytes, result.peak_held_load_bytes, result.peak_held_run_bytes)
        table.add_row("RAM held (--ram-cap)", held)  # the RSS less mapped weight files, which the kernel can drop
    if result.vram_cap_bytes is not None:
        table.add_row("VRAM cap", f"{format_bytes(result.vram_cap_bytes)} (simulated)")
    if result.ram_cap_bytes is not None:
        table.add_row("RAM cap", format_bytes(result.ram_cap_bytes))
    if result.oom is not None:
        oom = result.oom
        where = ", ".join(filter(None, (oom.stage, oom.component)))
        if where:
            table.add_row("failed in", escape(where))
        for label, value in (("tried to allocate", oom.tried_to_allocate_bytes), ("free then", oom.free_bytes),
                             ("short by", oom.shortfall_bytes), ("allowed (cap)", oom.allowed_bytes)):  # fmt: skip
            if value is not None:
                table.add_row(label, format_bytes(value))
    if result.seconds_before_first_call is not None:
        table.add_row("before the first call", f"{result.seconds_before_first_call:.1f} s (imports, loading)")
    for number, call in enumerate(result.calls, 1):
        table.add_row(f"call {number}", escape(_call_summary(call)))
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if result.simulation:
        console.print(escape(result.simulation), style="dim")
    for line in (result.oom.advice[:2] if result.oom else []):
        console.print(f"- {escape(line)}", highlight=False)
    if result.outcome in ("error", "timeout", "cancelled") and result.output_tail.strip():
        console.print("[bold]output (tail):[/]")
        console.print(escape("\n".join(result.output_tail.splitlines()[-15:])), highlight=False, soft_wrap=True)
    console.print(f"log: {escape(result.log_path)}", style="dim")


def _call_summary(call) -> str:
    parts = [call.pipeline]
    steps = call.step_seconds
    if steps:
        median = sorted(steps)[len(steps) // 2]
        parts.append(f"{len(steps)}/{call.steps_expected or len(steps)} steps, median {median:.3f} s/step")
    elif not call.ok:
        parts.append("no step completed")
    if call.before_first_step_seconds is not None:
        parts.append(f"{call.before_first_step_seconds:.2f} s before the first step")
    if call.after_last_step_seconds is not None:
        parts.append(f"{call.after_last_step_seconds:.2f} s after the last")
    if call.seconds is not None:
        parts.append(f"{call.seconds:.2f} s in all" if call.ok else "raised")
    return ", ".join(parts)


def recommendation(result: Recommendation, console: Console, show_all: bool = False) -> None:
    hw, w = result.hardware, result.workload
    frames = f"x{w.frames} frames" if w.frames else ""
    console.print(
        f"[bold]{escape(result.model)}[/] ({result.pipeline_class}) at {w.height}x{w.width}{frames}, {w.steps} steps, "
        f"batch {w.batch}; {format_bytes(hw.vram_bytes)} VRAM ({hw.gpu or hw.source}), {format_bytes(hw.ram_bytes)} RAM"
        f"{' (container limit)' if hw.ram_is_container_limit else ''}; prefer {result.prefer}; "
        f"margin {format_bytes(result.margin_bytes)} kept free"
    )
    if result.from_card:
        taken = ", ".join(f"{name} {value:g}" for name, value in result.from_card.items())
        console.print(f"{taken}: as the model card's example calls it (pass --steps/--guidance to plan otherwise)")
    for group, title in (("full_precision", "Full precision: offloading and fp8 casting"), ("quantized", "Quantized"),
                         ("cached", "Step-cached: faster, and the image changes")):  # fmt: skip
        options = [o for o in result.options if o.group == group]
        shown = options if show_all else options[:10]
        if not shown:
            continue
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
        for column, justify in (("#", "right"), ("fits", "left"), ("plan", "left"), ("VRAM", "right"),
                                ("RAM load/run", "right"), ("s/call", "right"), ("why", "left")):  # fmt: skip
            table.add_column(column, justify=justify, overflow="fold")
        for option in shown:
            rank = result.options.index(option) + 1
            p = option.predicted
            why = f"peak: {option.peak_stage}" if option.fits else next(
                (r for r in option.reasons if not r.startswith("Fits")), ""
            )
            table.add_row(
                str(rank), "[green]yes[/]" if option.fits else "[red]no[/]", escape(option.id),
                format_bytes(p.vram_bytes), _ram_cell(p),
                f"{p.seconds:.1f}" + ("" if option.basis == "measured" else "*"), escape(why),
            )  # fmt: skip
        console.print(table)
        if len(options) > len(shown):
            console.print(f"[dim]{len(options) - len(shown)} more; --all lists them[/]")
    best = next((o for o in result.options if o.fits), None)
    if best is None:
        console.print(f"[red]{escape(result.shortfall or 'Nothing fits.')}[/] The closest options are listed; their reasons say what is short.")
        return
    console.print(f"[bold]Best:[/] {escape(best.id)}  plan: {escape(json.dumps(best.plan))}")
    console.print(f"[dim]Guidance: {escape(result.guidance)}. Figures for {escape(result.gpu_profile)}.[/]")
    console.print("[dim]* derived from the pipeline's code alone: no GPU run of this family and plan. Apply with `pipefit patch SCRIPT "
                  "--plan PLAN`, prove with `pipefit trial SCRIPT --plan PLAN`.[/]")  # fmt: skip
