"""The outputs of ``traceml compare``: the terminal table, compare.md (a PR comment), compare.html
(tables and Plotly charts, :mod:`traceml.renderers.html`) and compare.json (``Comparison.to_dict``),
written by :func:`write_outputs`.  Names from the files are escaped per medium.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from replay.compare_model import METHOD_NOTES, Comparison, MetricResult, Side, fmt_change
from replay.stats import EQUIVALENT, IMPROVEMENT, INCONCLUSIVE, REGRESSION
from traceml import escape as esc
from traceml.errors import ReportError
from traceml.outpaths import OutputDir
from traceml.renderers import html
from traceml.units import fmt_bytes

COMPARE_HTML = "compare.html"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"


def _fmt_value(m: MetricResult, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if m.spec.unit == "bytes":
        return fmt_bytes(v)
    if m.spec.additive:
        return f"{v * 100:.1f}% of wall"
    return f"{v:.3f} {m.spec.unit}" if abs(v) < 10 else f"{v:.1f} {m.spec.unit}"


UNDECIDABLE_BY_STEPS = "more steps alone will not settle it: add runs per side"


def _note(m: MetricResult) -> str:
    parts = [m.note] if m.note else []
    if m.verdict == INCONCLUSIVE and m.steps_to_decide:
        parts.append(f"~{m.steps_to_decide} steps per run would decide it")
    elif m.verdict == INCONCLUSIVE and m.ci_low is not None and m.ci_high is not None:
        parts.append(UNDECIDABLE_BY_STEPS)
    return "; ".join(parts)


def table_rows(c: Comparison) -> list[list[str]]:
    return [
        [
            m.spec.label + ("" if m.spec.gated else " (info)"),
            _fmt_value(m, m.base),
            _fmt_value(m, m.new),
            fmt_change(m),
            m.verdict,
            _note(m),
        ]
        for m in c.metrics
    ]


HEADER = ["metric", "base", "new", "change [95% CI]", "verdict", "note"]


def _cost(side: Side) -> str:
    """``; traceml cost X µs per step (Y%)`` when the run measured traceml's own cost."""
    return f"; {side.cost}" if side.cost else ""


def _runs_line(runs: Sequence[Side]) -> str:
    """``3 runs: a.tml (recording, 195 steps), ...`` (the run count first: it decides what is covered)."""
    count = f"{len(runs)} run" + ("s" if len(runs) != 1 else "")
    return f"{count}: " + ", ".join(f"{esc.visible(s.path, 1000)} ({s.kind}, {s.steps} steps{_cost(s)})" for s in runs)


def drift_line(c: Comparison) -> str:
    """Plainly: whether run-to-run drift is in the interval, and the noise floor otherwise."""
    runs = f"{len(c.base_runs)} base run{'s' if len(c.base_runs) != 1 else ''}, {len(c.new_runs)} new"
    if c.drift_covered and c.noise_floor_pct <= 0:
        how = "resamples run pairs (--paired)" if c.paired else "resamples runs"
        return f"run-to-run drift: covered ({runs}: the interval {how}, then blocks of steps)"
    floor = f"{c.noise_floor_pct:.1f}% noise floor ({c.floor_source})"
    if c.drift_covered:
        return f"run-to-run drift: covered ({runs}); a timing regression must also clear the {floor}"
    if len(c.base_runs) == 1 and len(c.new_runs) == 1:
        return (
            f"run-to-run drift: NOT covered (one run per side: the interval only knows this run's step-to-step "
            f"noise); a timing regression must clear the {floor}; record 3 runs per side to cover drift"
        )
    return f"run-to-run drift: covered on one side only ({runs}); a timing regression must clear the {floor}"


def _header_lines(c: Comparison) -> list[str]:
    lines = [
        f"base: {_runs_line(c.base_runs)}",
        f"new:  {_runs_line(c.new_runs)}",
        f"method: {METHOD_NOTES[c.method]}",
    ]
    if c.aligned:
        every = "both runs" if len(c.base_runs) + len(c.new_runs) == 2 else "every run"
        blocks = f"; resampled in circular blocks of {c.block} steps" if c.block else ""
        lines.append(f"aligned steps {c.aligned[0]}..{c.aligned[1]} ({c.aligned[2]} in {every}){blocks}")
    elif c.block:
        lines.append(f"steps resampled in circular blocks of {c.block}")
    lines.append(esc.visible(drift_line(c), 2000))
    return lines


def render_text(c: Comparison) -> str:
    rows = [HEADER, *table_rows(c)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [*_header_lines(c), ""]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    lines += ["", f"verdict: {c.verdict} — {c.reason} (exit {c.exit_code})"]
    return "\n".join(lines) + "\n"


def render_markdown(c: Comparison) -> str:
    icon = {REGRESSION: "🔴", INCONCLUSIVE: "🟠", IMPROVEMENT: "🟢", EQUIVALENT: "🟢"}[c.verdict]

    def runs(side: Sequence[Side]) -> str:
        return ", ".join(f"{esc.markdown_code(s.path, 1000)} ({s.kind}, {s.steps} steps{_cost(s)})" for s in side)

    def count(side: Sequence[Side], label: str) -> str:
        return f"{len(side)} {label} run{'s' if len(side) != 1 else ''}"

    lines = [
        f"## traceml compare — {icon} {c.verdict}",
        "",
        f"> {c.reason}. Gate: {c.gate_pct:g}%.",
        "",
        f"Base {runs(c.base_runs)} · new {runs(c.new_runs)}.",
        "",
        f"{count(c.base_runs, 'base')}, {count(c.new_runs, 'new')}.",
        "",
        f"{esc.markdown(drift_line(c))}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in table_rows(c)]
    lines += ["", f"_{METHOD_NOTES[c.method]}._"]
    return "\n".join(lines) + "\n"


def _figures(c: Comparison) -> list[tuple[str, go.Figure]]:
    figs: list[tuple[str, go.Figure]] = []
    bars = [m for m in c.metrics if m.change_pct is not None]
    fig = go.Figure()
    colors = {REGRESSION: "#b91c1c", IMPROVEMENT: "#15803d", EQUIVALENT: "#6b7280", INCONCLUSIVE: "#b45309"}
    err_hi = [((m.ci_high or m.ratio or 1) - (m.ratio or 1)) * 100 for m in bars]
    err_lo = [((m.ratio or 1) - (m.ci_low or m.ratio or 1)) * 100 for m in bars]
    fig.add_trace(
        go.Bar(
            x=[m.spec.label for m in bars],
            y=[m.change_pct for m in bars],
            marker_color=[colors[m.verdict] for m in bars],
            error_y={"type": "data", "array": err_hi, "arrayminus": err_lo, "visible": True},
            text=[m.verdict for m in bars],
            name="change %",
        )
    )
    for y in (c.gate_pct, -c.gate_pct):
        fig.add_hline(y=y, line_dash="dash", line_color="#9ca3af")
    fig.update_layout(
        title={"text": f"Change NEW vs BASE (%), 95% interval; gate ±{c.gate_pct:g}%", "x": 0.01},
        template="plotly_white",
        height=380,
        yaxis_title="%",
        margin={"l": 60, "r": 20, "t": 50, "b": 80},
    )
    figs.append(("changes", fig))
    if c.method == "bootstrap":
        dist = go.Figure()
        for label, side in (("base", c.base_runs), ("new", c.new_runs)):
            v = np.concatenate([r.series.get("step_time", np.empty(0)) for r in side])
            v = v[np.isfinite(v)]
            if len(v) > 20_000:
                v = np.sort(v)[:: int(math.ceil(len(v) / 20_000))]
            dist.add_trace(go.Box(x=v, name=label, boxpoints=False))
        dist.update_layout(
            title={"text": "Step time distribution (ms), aligned steps", "x": 0.01},
            template="plotly_white",
            height=300,
            xaxis_title="ms",
            margin={"l": 60, "r": 20, "t": 50, "b": 45},
        )
        figs.append(("steps", dist))
    return figs


def render_html(c: Comparison) -> str:
    color = {REGRESSION: html.SEVERITY_COLOR["critical"], INCONCLUSIVE: html.SEVERITY_COLOR["warn"]}.get(
        c.verdict, "#15803d"
    )
    e = html.text
    parts = [
        "<h1>traceml compare</h1>",
        f"<div class=sub>base {e(_runs_line(c.base_runs))} · new {e(_runs_line(c.new_runs))}</div>",
        f"<div class=sub>{e(drift_line(c))}</div>",
        f"<div class=verdict style='border-color:{color}'><b style='color:{color}'>{e(c.verdict)}</b> "
        f"(exit {c.exit_code})<br>{e(c.reason)}; gate {c.gate_pct:g}%</div>",
        html.table(HEADER, [[e(x) for x in r] for r in table_rows(c)], numeric_from=1),
        f"<p class=sub>{e(METHOD_NOTES[c.method])}"
        + (f"; aligned steps {c.aligned[0]}–{c.aligned[1]} ({c.aligned[2]})" if c.aligned else "")
        + "</p>",
    ]
    parts += [html.chart(name, fig) for name, fig in _figures(c)]
    return html.page("traceml compare", parts, html.plotly_inline())


def write_outputs(c: Comparison, out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write compare.html/json/md into ``out_dir``; existing ones are refused unless ``overwrite``."""
    out = OutputDir(out_dir, overwrite=overwrite, option="--out")
    paths = [out.claim(COMPARE_HTML), out.claim(COMPARE_JSON), out.claim(COMPARE_MD)]
    try:
        out.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(
            f"cannot write the comparison into {str(out.root)!r}: {exc}; choose another --out directory"
        ) from exc
    out.check(paths)
    texts = (render_html(c), json.dumps(c.to_dict(), indent=2, allow_nan=False) + "\n", render_markdown(c))
    try:
        out.write_texts(paths, texts)
    except OSError as exc:
        raise ReportError(
            f"cannot write the comparison into {str(out.root)!r}: {exc}; choose another --out directory"
        ) from exc
    return paths
