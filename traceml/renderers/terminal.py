"""Terminal renderers: view model -> Rich renderable.  Pure: no console, no clock, no I/O.

``render_live`` draws the live dashboard (:class:`~traceml.views.LiveModel`); ``render_final``
the end-of-run summary (:class:`~traceml.views.FinalModel`).  Only the terminal driver prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from traceml import escape as esc
from traceml import units
from traceml.views import FinalModel, LiveModel, NodeRow, PhaseRow, RankRow, RecordingInfo
from traceml.views.spread import rank_spread

#: rank rows shown before the table is cut to the slowest / unhealthy ranks
MAX_RANK_ROWS = 8
DASH = "-"
_STATE_STYLE = {
    "connected": "green",
    "finished": "cyan",
    "disconnected": "yellow",
    "died": "bold red",
    "waiting": "dim",
    "unknown": "dim",
}
_SEVERITY_STYLE = {"critical": "bold red", "warn": "yellow", "info": "cyan"}


# --- number formatting (shared by both screens) ----------------------------------------


def fmt_us(us: float) -> str:
    """Microseconds as a short duration: ``850us``, ``12.3ms``, ``1.23s``."""
    if us is None or math.isnan(us) or us < 0:
        return DASH
    if us < 1_000:
        return f"{us:.0f}us"
    ms = us / 1_000
    if ms < 10:
        return f"{ms:.2f}ms"
    if ms < 100:
        return f"{ms:.1f}ms"
    if ms < 1_000:
        return f"{ms:.0f}ms"
    return f"{ms / 1_000:.2f}s"


def fmt_bytes(n: int) -> str:
    if n is None or n < 0:
        return DASH
    return units.fmt_bytes(n, space=False)


def fmt_pct(p: float, digits: int = 0) -> str:
    if p is None or math.isnan(p):
        return DASH
    return f"{p:.{digits}f}%"


def fmt_float(x: float, digits: int = 1) -> str:
    if x is None or math.isnan(x):
        return DASH
    return f"{x:.{digits}f}"


def fmt_seconds(s: float) -> str:
    if s is None or math.isnan(s) or s < 0:
        return DASH
    if s < 60:
        return f"{s:.1f}s"
    minutes, sec = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# --- building blocks -------------------------------------------------------------------


def _shown(value: object, max_chars: int = esc.MAX_CHARS) -> str:
    """Text from a recording or a peer, as the terminal should show it: control characters (ANSI,
    OSC) as visible escapes, bounded.  Built into ``Text`` (never markup), so brackets are literal."""
    return esc.visible(value, max_chars)


def _phase_table(phases: tuple[PhaseRow, ...], title: str, regions: tuple[PhaseRow, ...] = ()) -> Table:
    """Phases, then the named regions (their share may overlap the phases), then the step row."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("phase")
    table.add_column("median", justify="right")
    table.add_column("share", justify="right")
    table.add_column("worst rank", justify="right")
    table.add_column("worst", justify="right")
    rows = [r for r in phases if r.phase != "step"]
    total = [r for r in phases if r.phase == "step"]
    for row in rows:
        table.add_row(
            Text(_shown(row.phase)),
            fmt_us(row.median_us),
            fmt_pct(row.share_pct),
            str(row.worst_rank) if row.worst_rank >= 0 else DASH,
            fmt_us(row.worst_us),
            end_section=row.phase == "residual" and not regions,
        )
    for i, row in enumerate(regions):
        table.add_row(
            Text(_shown(row.phase, 40), style="italic"),
            fmt_us(row.median_us),
            fmt_pct(row.share_pct),
            str(row.worst_rank) if row.worst_rank >= 0 else DASH,
            fmt_us(row.worst_us),
            end_section=i == len(regions) - 1,
        )
    for row in total:
        table.add_row(
            Text("step (job)", style="bold"),
            fmt_us(row.median_us),
            "",
            str(row.worst_rank) if row.worst_rank >= 0 else DASH,
            fmt_us(row.worst_us),
        )
    table.caption = "median: per step, of the job; share: of summed step time"
    if regions:
        table.caption += "\nitalic: your trace_time regions (time outside the phases is not in residual)"
    table.caption_justify = "left"
    return table


def _pick_ranks(ranks: tuple[RankRow, ...], limit: int) -> tuple[list[RankRow], int]:
    """All ranks when they fit; else the unhealthy ones, then the slowest, in rank order."""
    if len(ranks) <= limit:
        return list(ranks), 0
    unhealthy = [r for r in ranks if r.state not in ("connected", "finished")]
    healthy = sorted(
        (r for r in ranks if r.state in ("connected", "finished")),
        key=lambda r: (-(r.step_median_us if not math.isnan(r.step_median_us) else -1.0), r.rank),
    )
    chosen = (unhealthy + healthy)[:limit]
    return sorted(chosen, key=lambda r: r.rank), len(ranks) - len(chosen)


def _rank_table(ranks: tuple[RankRow, ...], show_gpu: bool, limit: int = MAX_RANK_ROWS) -> Table:
    shown, hidden = _pick_ranks(ranks, limit)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("node", justify="right")
    table.add_column("state")
    table.add_column("steps", justify="right")
    table.add_column("step med", justify="right")
    table.add_column("cpu", justify="right")
    table.add_column("rss", justify="right")
    if show_gpu:
        table.add_column("gpu alloc", justify="right")
        table.add_column("gpu peak", justify="right")
    table.add_column("drops", justify="right")
    for r in shown:
        cells: list[RenderableType] = [
            str(r.rank),
            str(r.node_rank) if r.node_rank >= 0 else DASH,
            Text(_shown(r.state), style=_STATE_STYLE.get(r.state, "")),
            str(r.steps),
            fmt_us(r.step_median_us),
            fmt_pct(r.cpu_pct),
            fmt_bytes(r.rss_bytes),
        ]
        if show_gpu:
            cells += [fmt_bytes(r.gpu_alloc_bytes), fmt_bytes(r.gpu_peak_bytes)]
        cells.append(Text(str(r.drops), style="yellow" if r.drops else ""))
        table.add_row(*cells)
    if hidden:
        table.caption = f"{hidden} more ranks not shown (showing unhealthy and slowest)"
    return table


def spread_line(ranks: Sequence[RankRow]) -> str:
    """The ranks' step medians as a distribution: median, p95, the slowest few, the states."""
    spread = rank_spread(ranks)
    worst = ", ".join(f"{rank} {fmt_us(us)}" for rank, us in spread.worst)
    states = ", ".join(f"{n} {_shown(state)}" for state, n in spread.states)
    return (
        f"step median over {spread.measured} ranks: median {fmt_us(spread.median_us)},"
        f" p95 {fmt_us(spread.p95_us)}; slowest {worst or DASH}; {states}"
    )


def _node_lines(nodes: tuple[NodeRow, ...]) -> list[Text]:
    lines = []
    for n in nodes:
        line = Text(f"node {n.node_rank if n.node_rank >= 0 else '?'}: ", style="bold")
        ram = (
            f"{fmt_bytes(n.ram_used_bytes)}/{fmt_bytes(n.ram_total_bytes)}"
            if n.ram_total_bytes > 0
            else fmt_bytes(n.ram_used_bytes)
        )
        line.append(f"cpu {fmt_pct(n.cpu_pct)}  ram {ram}")
        for g in n.gpus:
            line.append(
                f"  gpu{g.gpu_idx} {fmt_pct(g.util_pct)} {fmt_bytes(g.mem_used_bytes)}/{fmt_bytes(g.mem_total_bytes)}"
            )
            if not math.isnan(g.temp_c):
                line.append(f" {g.temp_c:.0f}C")
        lines.append(line)
    return lines


def _recording_line(rec: RecordingInfo) -> Text:
    line = Text("recording: ", style="bold")
    if not rec.path:
        line.append("off (--no-record)", style="dim")
    elif rec.error:
        line.append(f"{_shown(rec.path)} stopped at {fmt_bytes(rec.bytes)}: {_shown(rec.error)}", style="bold red")
    else:
        line.append(f"{_shown(rec.path)} ({fmt_bytes(rec.bytes)})")
    return line


def _skew_text(skew_pct: float, slowest_rank: int) -> Text:
    text = Text("rank skew: ", style="bold")
    if math.isnan(skew_pct):
        text.append(DASH)
    else:
        style = "bold red" if skew_pct >= 20 else "yellow" if skew_pct >= 10 else ""
        text.append(f"{skew_pct:.1f}%", style=style)
        text.append(f" (slowest rank {slowest_rank}, on the steps every rank has)")
    return text


def _between_text(outside_pct: float, between: tuple[tuple[str, float], ...]) -> Text:
    """The share of wall time outside any step, and the named regions that account for it."""
    text = Text("outside steps: ", style="bold")
    if math.isnan(outside_pct):
        text.append(DASH)
        return text
    style = "yellow" if outside_pct >= 10 else ""
    text.append(f"{outside_pct:.0f}% of wall time", style=style)
    if between:
        named = ", ".join(f"{_shown(n, 40)} {p:.0f}%" for n, p in between[:4])
        text.append(f" ({named}{', ...' if len(between) > 4 else ''})")
    return text


# --- the two screens -------------------------------------------------------------------


def render_live(model: LiveModel) -> RenderableType:
    """The live dashboard: header, phase table, ranks, system, recording."""
    header = Text()
    header.append(_shown(model.run_name) or "traceml", style="bold")
    header.append(f"  {_shown(model.status)}  {fmt_seconds(model.elapsed_s)}")
    header.append(f"  step {model.last_step if model.last_step >= 0 else DASH}")
    header.append(f"  {fmt_float(model.steps_per_s)} steps/s")
    seen = sum(1 for r in model.ranks if r.state != "waiting")
    if model.expected_ranks:
        header.append(f"  ranks {seen}/{model.expected_ranks}")
    parts: list[RenderableType] = [header]
    if model.phases:
        parts.append(
            _phase_table(
                model.phases,
                f"step time, the job's last {model.window_steps} steps",
                model.regions,
            )
        )
        parts.append(_skew_text(model.skew_pct, model.slowest_rank))
        parts.append(_between_text(model.outside_pct, model.between_regions))
        if model.verdict[0]:
            parts.append(_verdict_text(*model.verdict))
    else:
        parts.append(Text("waiting for the first step...", style="dim"))
    if model.ranks:
        show_gpu = any(r.gpu_alloc_bytes >= 0 or r.gpu_peak_bytes >= 0 for r in model.ranks)
        parts.append(_rank_table(model.ranks, show_gpu))
        if len(model.ranks) > MAX_RANK_ROWS:  # Text, not markup: the states may come from a recording
            parts.append(Text(spread_line(model.ranks)))
    parts.extend(_node_lines(model.nodes))
    footer = _recording_line(model.recording)
    if model.drops_total:
        footer.append(f"   rows dropped: {model.drops_total}", style="yellow")
    parts.append(footer)
    return Panel(Group(*parts), title="traceml", title_align="left", box=box.ROUNDED, expand=True)


def _verdict_text(kind: str, severity: str, summary: str) -> Text:
    """``now: STRAGGLER [warn] rank 1 is a straggler ...`` (Text, not markup: names come from the run)."""
    style = {"critical": "bold red", "warn": "yellow"}.get(severity, "")
    text = Text("now: ", style="bold")
    text.append(_shown(kind), style=style or "bold")
    text.append(f" [{_shown(severity)}] ")
    text.append(_shown(summary))
    return text


def _status_text(model: FinalModel) -> Text:
    style = {"ok": "bold green", "failed": "bold red", "interrupted": "bold yellow"}.get(model.status, "bold")
    text = Text(_shown(model.status), style=style)
    if model.exit_code is not None:
        text.append(f" (exit {model.exit_code}", style=style)
        text.append(f", {_shown(model.signal)})" if model.signal else ")", style=style)
    return text


def render_final(model: FinalModel) -> RenderableType:
    """The end-of-run summary: status, phases over the whole run, ranks, findings, the file."""
    header = Text()
    header.append(_shown(model.run_name) or "traceml", style="bold")
    header.append("  ")
    header.append_text(_status_text(model))
    header.append(f"  {fmt_seconds(model.duration_s)}  {model.total_steps} rank-steps")
    if model.phases:
        header.append(f"  {fmt_float(model.steps_per_s)} steps/s")
    parts: list[RenderableType] = [header]
    if model.phases:
        parts.append(
            _phase_table(
                model.phases,
                f"step time over the run ({model.analysed_steps} steps after warm-up)",
                model.regions,
            )
        )
        parts.append(_skew_text(model.skew_pct, model.slowest_rank))
        parts.append(_between_text(model.outside_pct, model.between_regions))
    elif model.status in ("failed", "interrupted"):
        how = _shown(model.status) + (f", exit status {model.exit_code}" if model.exit_code is not None else "")
        parts.append(Text(f"the run ended ({how}) before its first step finished", style="bold red"))
    else:
        parts.append(Text("no steps were recorded", style="yellow"))
    problems = [r for r in model.ranks if r.state in ("died", "disconnected", "waiting") or r.drops]
    for r in problems:
        what = "never connected" if r.state == "waiting" else r.state
        line = Text(f"rank {r.rank}: {_shown(what)}", style=_STATE_STYLE.get(r.state, "yellow"))
        if r.drops:
            line.append(f", {r.drops} rows dropped")
        parts.append(line)
    if model.findings:
        findings = Table(box=None, show_header=False, pad_edge=False)
        findings.add_column("severity")
        findings.add_column("finding")
        for f in model.findings:
            findings.add_row(
                Text(f.severity, style=_SEVERITY_STYLE.get(f.severity, "")), Text(_shown(f"{f.kind}: {f.text}", 1000))
            )
        if model.more_findings:
            findings.add_row("", Text(f"... {model.more_findings} more in the report", style="dim"))
        parts.append(findings)
    if model.cost:
        parts.append(Text(model.cost, style="dim"))
    parts.append(_recording_line(model.recording))
    return Panel(Group(*parts), title="traceml summary", title_align="left", box=box.ROUNDED, expand=True)
