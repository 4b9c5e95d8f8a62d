"""Figure renderers: series view models -> Plotly figures.  Pure: no I/O, no clock, no dash.

Every trace carries ``meta = {"rank": ..., "points": ...}`` (the rows it stands for), so a
test or a user can tell a reduced trace from a full one.  Figures for data that was not
recorded say so in the plot instead of drawing empty axes.  In compare mode the second
recording ("B") is drawn dashed over the first ("A").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from traceml.schema import PHASES
from traceml.views.series import MemorySeries, RankSteps, StepBreakdown, SystemSeries, Throughput, Trace

PALETTE: tuple[str, ...] = tuple(qualitative.D3)
PHASE_COLORS: dict[str, str] = dict(zip(PHASES, qualitative.Set2, strict=False))
SLOWEST_COLOR = "#d62728"
MUTED = "#9aa5b1"
HEIGHT = 340

STEP_AXIS = "step"
TIME_AXIS = "time since start (s)"


def _base(title: str, x_title: str, y_title: str, height: int = HEIGHT) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title={"text": title, "x": 0.01, "font": {"size": 15}},
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 45},
        legend={"orientation": "h", "y": -0.22, "font": {"size": 11}},
        hovermode="x unified",
        uirevision="keep",
        xaxis={"title": {"text": x_title}},
        yaxis={"title": {"text": y_title}},
    )
    return fig


def _not_recorded(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font={"size": 14, "color": "#6b7280"},
        name="not-recorded",
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _rank_color(rank: int | None) -> str:
    return PALETTE[(rank or 0) % len(PALETTE)]


def _fmt_ms(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"


def _line(
    trace: Trace, *, color: str, width: float = 1.2, dash: str | None = None, name: str | None = None
) -> go.Scatter:
    return go.Scatter(
        x=trace.x,
        y=trace.y,
        mode="lines",
        name=name or trace.name,
        line={"color": color, "width": width, "dash": dash},
        meta={"rank": trace.rank, "points": trace.points, "group": trace.group},
        legendgroup=trace.group or trace.name,
    )


def _hline(fig: go.Figure, x0: float, x1: float, y: float, name: str, color: str, dash: str) -> None:
    if not math.isfinite(y):
        return
    fig.add_trace(
        go.Scatter(
            x=[x0, x1],
            y=[y, y],
            mode="lines",
            name=name,
            line={"color": color, "width": 1.5, "dash": dash},
            hoverinfo="name",
            meta={"rank": None, "points": 0, "group": "stat"},
        )
    )


# --- step figures ------------------------------------------------------------------------------


def step_breakdown_figure(
    model: StepBreakdown,
    phases: Sequence[str] | None = None,
    compare: StepBreakdown | None = None,
    labels: tuple[str, str] = ("A", "B"),
) -> go.Figure:
    """Stacked phase times per step (mean over the selected ranks), with the range's median and p95."""
    shown = [p for p in (phases if phases is not None else PHASES) if p in model.phases]
    per = "" if model.bucket_steps == 1 else f" (mean per {model.bucket_steps} steps)"
    fig = _base(f"Step time breakdown{per}", STEP_AXIS, "ms")
    if model.empty:
        return _not_recorded(fig, "no steps recorded")
    a = f"{labels[0]} · " if compare is not None else ""
    for p in shown:
        fig.add_trace(
            go.Scatter(
                x=model.steps,
                y=model.phases[p],
                mode="lines",
                name=f"{a}{p}",
                stackgroup="phases",
                line={"width": 0.5, "color": PHASE_COLORS.get(p)},
                meta={"rank": None, "points": model.rows, "group": p},
            )
        )
    x0, x1 = float(model.steps[0]), float(model.steps[-1])
    _hline(fig, x0, x1, model.median_ms, f"{a}median {_fmt_ms(model.median_ms)}", "#111827", "dash")
    _hline(fig, x0, x1, model.p95_ms, f"{a}p95 {_fmt_ms(model.p95_ms)}", "#b91c1c", "dot")
    if compare is not None and not compare.empty:
        b = f"{labels[1]} · "
        fig.add_trace(
            go.Scatter(
                x=compare.steps,
                y=compare.total_ms,
                mode="lines",
                name=f"{b}step (mean)",
                line={"color": "#7c3aed", "width": 1.5, "dash": "dash"},
                meta={"rank": None, "points": compare.rows, "group": "compare"},
            )
        )
        _hline(fig, x0, x1, compare.median_ms, f"{b}median {_fmt_ms(compare.median_ms)}", "#7c3aed", "dashdot")
    return fig


def rank_steps_figure(
    model: RankSteps, compare: RankSteps | None = None, labels: tuple[str, str] = ("A", "B")
) -> go.Figure:
    """One step-time line per rank; the slowest rank (highest median) drawn thick and red."""
    skew = "" if not math.isfinite(model.skew_pct) else f" — skew {model.skew_pct:.1f}%"
    slow = "" if model.slowest_rank is None else f", slowest rank {model.slowest_rank}"
    fig = _base(f"Step time per rank{skew}{slow}", STEP_AXIS, "ms")
    if model.empty:
        return _not_recorded(fig, "no steps recorded")
    a = f"{labels[0]} · " if compare is not None else ""
    medians = {s.rank: s.median_ms for s in model.stats}
    # the slowest last, so it is drawn on top
    for t in sorted(model.traces, key=lambda t: t.rank == model.slowest_rank):
        slowest = t.rank == model.slowest_rank and len(model.traces) > 1
        name = f"{a}{t.name} (median {_fmt_ms(medians.get(t.rank or 0, math.nan))})"
        if slowest:
            name += " — slowest"
        fig.add_trace(
            _line(
                t,
                color=SLOWEST_COLOR if slowest else _rank_color(t.rank),
                width=2.6 if slowest else 1.0,
                name=name,
            )
        )
    if compare is not None:
        for t in compare.traces:
            fig.add_trace(_line(t, color=_rank_color(t.rank), width=1.0, dash="dash", name=f"{labels[1]} · {t.name}"))
    return fig


def rank_heatmap_figure(model: RankSteps) -> go.Figure:
    """Ranks x step buckets, colour = mean step time (ms)."""
    per = "" if model.bucket_steps == 1 else f" (mean per {model.bucket_steps} steps)"
    fig = _base(
        f"Step time heatmap, ranks x steps{per}", STEP_AXIS, "rank", height=max(220, 90 + 28 * len(model.heat_ranks))
    )
    if model.empty:
        return _not_recorded(fig, "no steps recorded")
    fig.add_trace(
        go.Heatmap(
            z=model.heat_ms,
            x=model.heat_steps,
            y=[f"rank {r}" for r in model.heat_ranks],
            colorscale="Viridis",
            colorbar={"title": {"text": "ms"}},
            hovertemplate="%{y} step %{x:.0f}: %{z:.3g} ms<extra></extra>",
            meta={"ranks": list(model.heat_ranks), "points": int(np.isfinite(model.heat_ms).sum())},
        )
    )
    fig.update_layout(hovermode="closest")
    fig.update_yaxes(autorange="reversed")
    return fig


def throughput_figure(
    model: Throughput, compare: Throughput | None = None, labels: tuple[str, str] = ("A", "B")
) -> go.Figure:
    mean = "" if not math.isfinite(model.mean_steps_per_s) else f" — mean {model.mean_steps_per_s:.3g} steps/s"
    fig = _base(f"Throughput{mean}", TIME_AXIS, "steps/s")
    if model.empty:
        return _not_recorded(fig, "no steps recorded")
    a = f"{labels[0]} · " if compare is not None else ""
    fig.add_trace(
        go.Scatter(
            x=model.x_s,
            y=model.steps_per_s,
            mode="lines",
            name=f"{a}steps/s",
            line={"color": "#2563eb", "width": 1.5},
            meta={"rank": None, "points": model.steps, "group": "throughput"},
        )
    )
    if compare is not None and not compare.empty:
        fig.add_trace(
            go.Scatter(
                x=compare.x_s,
                y=compare.steps_per_s,
                mode="lines",
                name=f"{labels[1]} · steps/s",
                line={"color": "#7c3aed", "width": 1.5, "dash": "dash"},
                meta={"rank": None, "points": compare.steps, "group": "compare"},
            )
        )
    return fig


# --- memory and system ------------------------------------------------------------------------


def memory_figure(
    model: MemorySeries, compare: MemorySeries | None = None, labels: tuple[str, str] = ("A", "B")
) -> go.Figure:
    """RSS (solid), GPU allocated (dashed) and per-step GPU peak (dotted) per rank, GiB."""
    cap = f" — GPU capacity {model.gpu_total_gib:.0f} GiB" if model.gpu_total_gib > 0 else ""
    fig = _base(f"Memory per rank{cap}", TIME_AXIS, "GiB")
    if not (model.rss or model.gpu_alloc or model.gpu_peak):
        return _not_recorded(fig, "memory: not recorded")
    a = f"{labels[0]} · " if compare is not None else ""
    for t in model.rss:
        fig.add_trace(_line(t, color=_rank_color(t.rank), name=f"{a}{t.name}"))
    for t in model.gpu_alloc:
        fig.add_trace(_line(t, color=_rank_color(t.rank), dash="dash", name=f"{a}{t.name}"))
    for t in model.gpu_peak:
        fig.add_trace(_line(t, color=_rank_color(t.rank), dash="dot", width=1.0, name=f"{a}{t.name}"))
    if not (model.gpu_alloc or model.gpu_peak):
        fig.add_annotation(
            text="GPU memory: not recorded",
            xref="paper",
            yref="paper",
            x=0.99,
            y=0.98,
            showarrow=False,
            xanchor="right",
            font={"color": "#6b7280"},
        )
    if compare is not None:
        for t in (*compare.rss, *compare.gpu_alloc):
            fig.add_trace(
                _line(t, color=_rank_color(t.rank), dash="longdashdot", width=1.0, name=f"{labels[1]} · {t.name}")
            )
    return fig


def system_figure(model: SystemSeries) -> go.Figure:
    """Host CPU (%) and RAM (GiB) per node."""
    ram = "RAM used (GiB)" + (f" of {model.ram_total_gib:.0f} GiB" if model.ram_total_gib > 0 else "")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("CPU (%)", ram), horizontal_spacing=0.1)
    fig.update_layout(
        title={"text": "System (host)", "x": 0.01, "font": {"size": 15}},
        template="plotly_white",
        height=HEIGHT,
        margin={"l": 60, "r": 20, "t": 70, "b": 45},
        legend={"orientation": "h", "y": -0.22},
        hovermode="x unified",
        uirevision="keep",
    )
    if not model.host_recorded:
        return _not_recorded(fig, "system CPU / RAM: not recorded")
    for t in model.cpu_pct:
        fig.add_trace(_line(t, color=_rank_color(t.rank)), row=1, col=1)
    for t in model.ram_used_gib:
        fig.add_trace(_line(t, color=_rank_color(t.rank)), row=1, col=2)
    fig.update_xaxes(title_text=TIME_AXIS)
    return fig


def gpu_figure(model: SystemSeries) -> go.Figure:
    """Utilisation, memory, temperature and power per GPU, or "not recorded"."""
    titles = ("utilisation (%)", "memory used (GiB)", "temperature (°C)", "power (W)")
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, vertical_spacing=0.16, horizontal_spacing=0.1)
    fig.update_layout(
        title={"text": "GPUs", "x": 0.01, "font": {"size": 15}},
        template="plotly_white",
        height=HEIGHT * 2 - 60,
        margin={"l": 60, "r": 20, "t": 70, "b": 45},
        legend={"orientation": "h", "y": -0.1},
        hovermode="x unified",
        uirevision="keep",
    )
    if not model.gpu_recorded:
        return _not_recorded(fig, "GPU metrics: not recorded (no NVML GPUs in this run)")
    seen: set[str] = set()
    groups = sorted({t.group for t in (*model.gpu_util_pct, *model.gpu_mem_gib, *model.gpu_temp_c, *model.gpu_power_w)})
    colors = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    for (row, col), traces in zip(
        ((1, 1), (1, 2), (2, 1), (2, 2)),
        (model.gpu_util_pct, model.gpu_mem_gib, model.gpu_temp_c, model.gpu_power_w),
        strict=True,
    ):
        for t in traces:
            tr = _line(t, color=colors[t.group])
            tr.showlegend = t.group not in seen
            seen.add(t.group)
            fig.add_trace(tr, row=row, col=col)
        if not traces:
            fig.add_annotation(
                text="not recorded", row=row, col=col, x=0.5, y=0.5, xref="x domain", yref="y domain", showarrow=False
            )
    fig.update_xaxes(title_text=TIME_AXIS, row=2)
    return fig


def max_points(fig: go.Figure) -> int:
    """The largest number of points any trace of ``fig`` sends to the browser."""
    most = 0
    for tr in fig.data:
        z = getattr(tr, "z", None)
        if z is not None:
            most = max(most, int(np.size(z)))
            continue
        x = getattr(tr, "x", None)
        most = max(most, 0 if x is None else len(x))
    return most
