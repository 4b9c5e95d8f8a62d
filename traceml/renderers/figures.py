"""Figure renderers: series view models -> Plotly figures.  Pure: no I/O, no clock, no dash.

Every trace carries ``meta = {"rank", "points", "group"}``; missing data is said in the plot, not drawn empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from traceml import escape as esc
from traceml.schema import PHASES
from traceml.views import MemorySeries, RankSteps, StepBreakdown, SystemSeries, Throughput, Trace
from traceml.views.spread import WIDE_RANKS, rank_band

PALETTE: tuple[str, ...] = tuple(qualitative.D3)
PHASE_COLORS: dict[str, str] = dict(zip(PHASES, qualitative.Set2, strict=False))
#: named regions (trace_time), stacked beside residual
REGION_COLORS: tuple[str, ...] = tuple(qualitative.Pastel1)
SLOWEST_COLOR = "#d62728"
COMPARE_COLOR = "#7c3aed"
GREY = "#6b7280"
HEIGHT = 340
#: height of the one-line "GPU metrics: not recorded" figure of a CPU run
GPU_NOTE_HEIGHT = 44

STEP_AXIS = "step"
TIME_AXIS = "time since start (s)"

_GRID = "#e5e7eb"
_AXIS = {"gridcolor": _GRID, "zerolinecolor": _GRID, "linecolor": "#d1d5db", "automargin": True}

Dict = dict[str, Any]


def _layout(title: str, height: int = HEIGHT, **extra: Any) -> Dict:
    layout: Dict = {
        "title": {"text": title, "x": 0.01, "font": {"size": 15}},
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 50, "b": 45},
        "legend": {"orientation": "h", "y": -0.22, "font": {"size": 11}},
        "hovermode": "x unified",
        "uirevision": "keep",
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "annotations": [],
    }
    layout.update(extra)
    return layout


def _xy(layout: Dict, x_title: str, y_title: str) -> Dict:
    layout["xaxis"] = {**_AXIS, "title": {"text": x_title}}
    layout["yaxis"] = {**_AXIS, "title": {"text": y_title}}
    return layout


def _grid(layout: Dict, rows: int, cols: int, titles: Sequence[str], hspace: float = 0.1, vspace: float = 0.16) -> Dict:
    """Axes for a rows x cols grid (what make_subplots does, without its cost); titles as annotations."""
    w = (1 - hspace * (cols - 1)) / cols
    h = (1 - vspace * (rows - 1)) / rows
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        n = "" if i == 0 else str(i + 1)
        x0 = c * (w + hspace)
        y1 = 1 - r * (h + vspace)
        layout[f"xaxis{n}"] = {**_AXIS, "domain": [x0, x0 + w], "anchor": f"y{n}"}
        layout[f"yaxis{n}"] = {**_AXIS, "domain": [y1 - h, y1], "anchor": f"x{n}"}
        layout["annotations"].append(
            {
                "text": titles[i],
                "x": x0 + w / 2,
                "y": y1,
                "xref": "paper",
                "yref": "paper",
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 13},
            }
        )
    return layout


def _figure(traces: list[Dict], layout: Dict) -> go.Figure:
    return go.Figure(data=traces, layout=layout)


def _not_recorded(layout: Dict, text: str) -> go.Figure:
    layout["annotations"].append(
        {
            "text": text,
            "xref": "paper",
            "yref": "paper",
            "x": 0.5,
            "y": 0.5,
            "showarrow": False,
            "font": {"size": 14, "color": GREY},
            "name": "not-recorded",
        }
    )
    for key in [k for k in layout if k.startswith(("xaxis", "yaxis"))] or ["xaxis", "yaxis"]:
        layout[key] = {**layout.get(key, {}), "visible": False}
    return _figure([], layout)


def _rank_color(rank: int | None) -> str:
    return PALETTE[(rank or 0) % len(PALETTE)]


def _fmt_ms(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"


def _meta(rank: int | None, points: int, group: str) -> Dict:
    return {"rank": rank, "points": int(points), "group": group}


def _line(
    trace: Trace,
    *,
    color: str,
    width: float = 1.2,
    dash: str | None = None,
    name: str | None = None,
    axis: str = "",
    showlegend: bool = True,
) -> Dict:
    out: Dict = {
        "type": "scatter",
        "x": trace.x,
        "y": trace.y,
        "mode": "lines",
        "name": name or trace.name,
        "line": {"color": color, "width": width, **({"dash": dash} if dash else {})},
        "meta": _meta(trace.rank, trace.points, trace.group),
        "legendgroup": trace.group or trace.name,
        "showlegend": showlegend,
    }
    if axis:
        out["xaxis"], out["yaxis"] = f"x{axis}", f"y{axis}"
    return out


def _hline(x0: float, x1: float, y: float, name: str, color: str, dash: str) -> list[Dict]:
    if not math.isfinite(y):
        return []
    return [
        {
            "type": "scatter",
            "x": [x0, x1],
            "y": [y, y],
            "mode": "lines",
            "name": name,
            "line": {"color": color, "width": 1.5, "dash": dash},
            "hoverinfo": "name",
            "meta": _meta(None, 0, "stat"),
        }
    ]


# --- step figures ------------------------------------------------------------------------------


def step_breakdown_figure(
    model: StepBreakdown,
    phases: Sequence[str] | None = None,
    compare: StepBreakdown | None = None,
    labels: tuple[str, str] = ("A", "B"),
    regions: bool = True,
) -> go.Figure:
    """Stacked phase times per step (mean over the selected ranks), with the job's median and p95.

    With ``regions`` the named regions' time outside the phases is stacked apart from residual;
    without, residual holds it (as recorded).  The bands are drawn as fills with no outline, so
    a band is never painted over by its neighbour's edge when many steps share a pixel."""
    shown = [p for p in (phases if phases is not None else PHASES) if p in model.phases]
    per = "" if model.bucket_steps == 1 else f" (mean per {model.bucket_steps} steps)"
    layout = _xy(_layout(f"Step time breakdown{per}"), STEP_AXIS, "ms")
    if model.empty:
        return _not_recorded(layout, "no steps recorded")
    a = f"{labels[0]} · " if compare is not None else ""
    bands: list[tuple[str, str, np.ndarray, str | None]] = []
    for p in shown:
        values = model.phases[p]
        if p == "residual" and not regions and model.regions:
            values = values + sum(model.regions.values(), np.zeros(len(values)))
        bands.append((p, f"{a}{p}", values, PHASE_COLORS.get(p)))
        if p == "residual" and regions:
            for i, (name, values) in enumerate(sorted(model.regions.items())):
                label = f"{a}region: {esc.html(name, 64)}"
                bands.append((f"region:{name}", label, values, REGION_COLORS[i % len(REGION_COLORS)]))
    traces: list[Dict] = [
        {
            "type": "scatter",
            "x": model.steps,
            "y": values,
            "mode": "lines",
            "name": label,
            "stackgroup": "phases",
            "line": {"width": 0, "color": color},
            "fillcolor": color,
            "meta": _meta(None, model.rows, group),
        }
        for group, label, values, color in bands
    ]
    x0, x1 = float(model.steps[0]), float(model.steps[-1])
    traces += _hline(x0, x1, model.median_ms, f"{a}median step (job) {_fmt_ms(model.median_ms)}", "#111827", "dash")
    traces += _hline(x0, x1, model.p95_ms, f"{a}p95 {_fmt_ms(model.p95_ms)}", "#b91c1c", "dot")
    if compare is not None and not compare.empty:
        b = f"{labels[1]} · "
        traces.append(
            {
                "type": "scatter",
                "x": compare.steps,
                "y": compare.total_ms,
                "mode": "lines",
                "name": f"{b}step (mean)",
                "line": {"color": COMPARE_COLOR, "width": 1.5, "dash": "dash"},
                "meta": _meta(None, compare.rows, "compare"),
            }
        )
        traces += _hline(x0, x1, compare.median_ms, f"{b}median {_fmt_ms(compare.median_ms)}", COMPARE_COLOR, "dashdot")
    return _figure(traces, layout)


def rank_steps_figure(
    model: RankSteps, compare: RankSteps | None = None, labels: tuple[str, str] = ("A", "B")
) -> go.Figure:
    """One step-time line per rank; the slowest rank (highest median) drawn thick and red, on top."""
    skew = "" if not math.isfinite(model.skew_pct) else f" — skew {model.skew_pct:.1f}%"
    slow = "" if model.slowest_rank is None else f", slowest rank {model.slowest_rank}"
    layout = _xy(_layout(f"Step time per rank{skew}{slow}"), STEP_AXIS, "ms")
    if model.empty:
        return _not_recorded(layout, "no steps recorded")
    if len(model.traces) > WIDE_RANKS and compare is None:
        return _rank_band_figure(model, layout)
    a = f"{labels[0]} · " if compare is not None else ""
    medians = {s.rank: s.median_ms for s in model.stats}
    traces = []
    for t in sorted(model.traces, key=lambda t: t.rank == model.slowest_rank):
        slowest = t.rank == model.slowest_rank and len(model.traces) > 1
        name = f"{a}{t.name} (median {_fmt_ms(medians.get(t.rank or 0, math.nan))})"
        if slowest:
            name += " — slowest"
        color = SLOWEST_COLOR if slowest else _rank_color(t.rank)
        traces.append(_line(t, color=color, width=2.6 if slowest else 1.0, name=name))
    if compare is not None:
        for t in compare.traces:
            traces.append(_line(t, color=_rank_color(t.rank), width=1.0, dash="dash", name=f"{labels[1]} · {t.name}"))
    return _figure(traces, layout)


def _rank_band_figure(model: RankSteps, layout: Dict) -> go.Figure:
    """Many ranks: the median and p95 across ranks per step bucket as a band, the slowest ranks as lines."""
    band = rank_band(model)
    per = "" if model.bucket_steps == 1 else f", mean per {model.bucket_steps} steps"
    layout["title"]["text"] = layout["title"]["text"].replace("per rank", f"across {band.ranks} ranks{per}")
    x = band.x.tolist()
    fill = {"type": "scattergl", "mode": "lines", "x": x, "hoverinfo": "skip", "showlegend": False}
    traces: list[Dict] = [
        {**fill, "y": band.median_ms, "line": {"width": 0}},
        {
            **fill,
            "y": band.p95_ms,
            "fill": "tonexty",
            "fillcolor": "rgba(99,110,250,0.25)",
            "line": {"width": 0},
            "name": "median..p95 of ranks",
            "showlegend": True,
            "meta": _meta(None, int(np.isfinite(model.heat_ms).sum()), "band"),
        },
        {
            "type": "scattergl",
            "mode": "lines",
            "x": x,
            "y": band.median_ms,
            "name": "median of ranks",
            "line": {"color": "#636efa", "width": 2.0},
            "meta": _meta(None, int(np.isfinite(model.heat_ms).sum()), "median"),
        },
    ]
    medians = {s.rank: s.median_ms for s in model.stats}
    for i, t in enumerate(band.worst):
        name = f"{t.name} (median {_fmt_ms(medians.get(t.rank or 0, math.nan))})"
        slowest = i == 0
        traces.append(
            _line(t, color=SLOWEST_COLOR if slowest else _rank_color(t.rank), width=2.0 if slowest else 1.0, name=name)
        )
    return _figure(traces, layout)


#: the heatmap grows with the ranks up to this height; beyond it the rows get thinner
MAX_HEATMAP_HEIGHT = 900


def rank_heatmap_figure(model: RankSteps) -> go.Figure:
    """Ranks x step buckets, colour = mean step time (ms)."""
    per = "" if model.bucket_steps == 1 else f" (mean per {model.bucket_steps} steps)"
    height = min(MAX_HEATMAP_HEIGHT, max(220, 90 + 28 * len(model.heat_ranks)))
    layout = _xy(_layout(f"Step time heatmap, ranks x steps{per}", height, hovermode="closest"), STEP_AXIS, "rank")
    layout["yaxis"]["autorange"] = "reversed"
    if model.empty:
        return _not_recorded(layout, "no steps recorded")
    heat = {
        "type": "heatmap",
        "z": model.heat_ms,
        "x": model.heat_steps,
        "y": [f"rank {r}" for r in model.heat_ranks],
        "colorscale": "Viridis",
        "colorbar": {"title": {"text": "ms"}},
        "hovertemplate": "%{y} step %{x:.0f}: %{z:.3g} ms<extra></extra>",
        "meta": {"ranks": list(model.heat_ranks), "points": int(np.isfinite(model.heat_ms).sum())},
    }
    return _figure([heat], layout)


def throughput_figure(
    model: Throughput, compare: Throughput | None = None, labels: tuple[str, str] = ("A", "B")
) -> go.Figure:
    mean = "" if not math.isfinite(model.mean_steps_per_s) else f" — mean {model.mean_steps_per_s:.3g} steps/s"
    layout = _xy(_layout(f"Throughput{mean}"), TIME_AXIS, "steps/s")
    if model.empty:
        return _not_recorded(layout, "no steps recorded")
    a = f"{labels[0]} · " if compare is not None else ""
    traces: list[Dict] = [
        {
            "type": "scatter",
            "x": model.x_s,
            "y": model.steps_per_s,
            "mode": "lines",
            "name": f"{a}steps/s",
            "line": {"color": "#2563eb", "width": 1.5},
            "meta": _meta(None, model.steps, "throughput"),
        }
    ]
    if compare is not None and not compare.empty:
        traces.append(
            {
                "type": "scatter",
                "x": compare.x_s,
                "y": compare.steps_per_s,
                "mode": "lines",
                "name": f"{labels[1]} · steps/s",
                "line": {"color": COMPARE_COLOR, "width": 1.5, "dash": "dash"},
                "meta": _meta(None, compare.steps, "compare"),
            }
        )
    return _figure(traces, layout)


# --- memory and system ------------------------------------------------------------------------


def memory_figure(
    model: MemorySeries, compare: MemorySeries | None = None, labels: tuple[str, str] = ("A", "B")
) -> go.Figure:
    """RSS (solid), GPU allocated (dashed) and per-step GPU peak (dotted) per rank, GiB."""
    cap = f" — GPU capacity {model.gpu_total_gib:.0f} GiB" if model.gpu_total_gib > 0 else ""
    if (model.rss and not (model.gpu_alloc or model.gpu_peak)) and not cap:
        cap = " — GPU memory: not recorded"  # in the title: a note inside the plot would sit on a line
    layout = _xy(_layout(f"Memory per rank{cap}"), TIME_AXIS, "GiB")
    if not (model.rss or model.gpu_alloc or model.gpu_peak):
        return _not_recorded(layout, "memory: not recorded")
    a = f"{labels[0]} · " if compare is not None else ""
    traces = [_line(t, color=_rank_color(t.rank), name=f"{a}{t.name}") for t in model.rss]
    traces += [_line(t, color=_rank_color(t.rank), dash="dash", name=f"{a}{t.name}") for t in model.gpu_alloc]
    traces += [_line(t, color=_rank_color(t.rank), dash="dot", width=1.0, name=f"{a}{t.name}") for t in model.gpu_peak]
    if compare is not None:
        for t in (*compare.rss, *compare.gpu_alloc):
            traces.append(
                _line(t, color=_rank_color(t.rank), dash="longdashdot", width=1.0, name=f"{labels[1]} · {t.name}")
            )
    return _figure(traces, layout)


def system_figure(model: SystemSeries) -> go.Figure:
    """Host CPU (%) and RAM (GiB) per node."""
    ram = "RAM used (GiB)" + (f" of {model.ram_total_gib:.0f} GiB" if model.ram_total_gib > 0 else "")
    layout = _grid(_layout("System (host)", margin={"l": 60, "r": 20, "t": 70, "b": 45}), 1, 2, ("CPU (%)", ram))
    if not model.host_recorded:
        return _not_recorded(layout, "system CPU / RAM: not recorded")
    for key in ("xaxis", "xaxis2"):
        layout[key]["title"] = {"text": TIME_AXIS}
    traces = [_line(t, color=_rank_color(t.rank)) for t in model.cpu_pct]
    traces += [_line(t, color=_rank_color(t.rank), axis="2") for t in model.ram_used_gib]
    return _figure(traces, layout)


def gpu_figure(model: SystemSeries) -> go.Figure:
    """Utilisation, memory, temperature and power per GPU, or "not recorded"."""
    titles = ("utilisation (%)", "memory used (GiB)", "temperature (°C)", "power (W)")
    if not model.gpu_recorded:
        # a CPU run: one line, not four empty panels
        line = _layout("", GPU_NOTE_HEIGHT, margin={"l": 10, "r": 10, "t": 5, "b": 5}, showlegend=False)
        return _not_recorded(line, "GPU metrics: not recorded (no NVML GPUs in this run)")
    layout = _layout("GPUs", HEIGHT * 2 - 60, margin={"l": 60, "r": 20, "t": 70, "b": 45})
    layout["legend"] = {"orientation": "h", "y": -0.1}
    _grid(layout, 2, 2, titles)
    groups = sorted({t.group for t in (*model.gpu_util_pct, *model.gpu_mem_gib, *model.gpu_temp_c, *model.gpu_power_w)})
    colors = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    seen: set[str] = set()
    traces = []
    panels = (model.gpu_util_pct, model.gpu_mem_gib, model.gpu_temp_c, model.gpu_power_w)
    for i, panel in enumerate(panels):
        axis = "" if i == 0 else str(i + 1)
        for t in panel:
            traces.append(_line(t, color=colors[t.group], axis=axis, showlegend=t.group not in seen))
            seen.add(t.group)
        if not panel:
            layout["annotations"].append(
                {
                    "text": "not recorded",
                    "xref": f"x{axis} domain",
                    "yref": f"y{axis} domain",
                    "x": 0.5,
                    "y": 0.5,
                    "showarrow": False,
                    "font": {"color": GREY},
                }
            )
    for axis in ("xaxis3", "xaxis4"):
        layout[axis]["title"] = {"text": TIME_AXIS}
    return _figure(traces, layout)


def loading_figure(title: str, text: str = "loading the recording…") -> go.Figure:
    """A placeholder while the data behind ``title`` is still being read."""
    return _not_recorded(_xy(_layout(title), "", ""), text)


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
