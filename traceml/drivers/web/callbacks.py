"""The dashboard's callbacks, module-level functions over one :class:`AppContext`, and
:func:`register`, which wires them into an app.

``data-version`` moves only when the data did and no chart is in flight (see docs/internals.md, "Web driver").
"""

from __future__ import annotations

import json
import time
from typing import Any

import dash
from dash import Input, Output, State, ctx

from traceml import views
from traceml.drivers.web.context import AppContext
from traceml.drivers.web.layout import (
    BADGE,
    DIAGNOSIS_EVERY_S,
    FIG_GPU,
    FIG_MEMORY,
    FIG_RANK_HEATMAP,
    FIG_RANK_STEPS,
    FIG_STEP_BREAKDOWN,
    FIG_SYSTEM,
    FIG_THROUGHPUT,
    RANK_CHECKLIST_MAX,
    STEP_AXIS_FIGURES,
)
from traceml.drivers.web.panels import diagnosis_children, notice, now_children, run_panels, stats_children
from traceml.drivers.web.zoom import range_event_update, rank_spec_update, uirevision, zoom_js
from traceml.renderers import figures
from traceml.schema import PHASES
from traceml.store import StoreView


def data_version(c: AppContext, _tick: Any, current: Any) -> tuple[Any, Any]:
    """Each tick: the data's version (moves when rows, ranks, attachments or status did) and
    whether the clock stops (a replay stops polling once loaded)."""
    pending = c.still_loading()
    stop = dash.no_update if c.live or pending else True
    if c.busy():
        return dash.no_update, dash.no_update
    if c.drawn and c.on_charts_drawn is not None:
        c.on_charts_drawn()
    view = c.main()
    states = sorted((r, i.state, i.exit_status) for r, i in view.rank_info.items())
    integrity = view.integrity.get("status") if view.integrity else None
    key = [
        view.total_rows(),
        view.latest_ns,
        states,
        len(view.attachments),
        view.meta.get("status"),
        integrity,
        pending,
    ]
    key = json.loads(json.dumps(key, default=str))
    return (dash.no_update if key == current else key), stop


def step_range(_c: AppContext, zoom: Any, _reset: Any, current: Any) -> Any:
    """A zoom / brush on any step axis (kept by the browser in ``step-zoom``), or the reset
    button -> the shared step range."""
    triggered = {t["prop_id"].rsplit(".", 1)[0] for t in ctx.triggered}
    return range_event_update(triggered, zoom, current)


def _keep_view(rng: tuple[int, int] | None, *figs: Any) -> None:
    for fig in figs:
        fig.layout.uirevision = uirevision(rng)


def breakdown(
    c: AppContext, rank_value: Any, phases: Any, region_value: Any, range_data: Any, _tick: Any, first_sent: Any
) -> tuple[Any, Any, Any, Any]:
    """The step breakdown, the statistics and the range label: the page's first chart."""
    view, other, ranks, rng = c.params(rank_value, range_data)
    mp = c.max_points
    bd = c.cache.get(view, ("bd", ranks, rng), lambda: views.step_breakdown(view, ranks, rng, max_buckets=mp))
    rs = c.cache.get(view, ("rs", ranks, rng), lambda: views.rank_steps(view, ranks, rng, max_points=mp))
    bd_b = None
    if other is not None:
        bd_b = c.cache.get(other, ("bd", ranks, rng), lambda: views.step_breakdown(other, ranks, rng, max_buckets=mp))
    shown = [p for p in PHASES if p in (phases or [])]
    fig = figures.step_breakdown_figure(
        bd, shown, compare=bd_b, labels=c.plot_labels, regions="regions" in (region_value or [])
    )
    if rng is None:
        label = "all steps" + ("" if bd.bucket_steps == 1 else f" (reduced: {bd.bucket_steps} steps per point)")
    else:
        res = "full resolution" if bd.bucket_steps == 1 else f"{bd.bucket_steps} steps per point"
        label = f"steps {rng[0]} .. {rng[1]} ({res})"
    if not bd.exact:
        label += "; drawn from the recording's rollup while its rows load"
    _keep_view(rng, fig)
    # the page's other charts are requested once this one arrived (it is drawn first): the
    # store moves once per page, so later changes do not ask for them twice
    first = 1 if not first_sent else dash.no_update
    return fig, stats_children(bd, rs, bd_b, c.labels), label, first


def rank_charts(c: AppContext, rank_value: Any, range_data: Any, _tick: Any, _first: Any) -> tuple[Any, Any, int]:
    """Step time per rank and the rank x step heatmap."""
    view, other, ranks, rng = c.params(rank_value, range_data)
    mp = c.max_points
    rs = c.cache.get(view, ("rs", ranks, rng), lambda: views.rank_steps(view, ranks, rng, max_points=mp))
    rs_b = None
    if other is not None:
        rs_b = c.cache.get(other, ("rs", ranks, rng), lambda: views.rank_steps(other, ranks, rng, max_points=mp))
    c.drawn += 1
    per_rank, heat = (
        figures.rank_steps_figure(rs, compare=rs_b, labels=c.plot_labels),
        figures.rank_heatmap_figure(rs),
    )
    _keep_view(rng, per_rank, heat)
    return per_rank, heat, c.drawn


def time_charts(c: AppContext, rank_value: Any, range_data: Any, _tick: Any, _first: Any) -> tuple[Any, Any, Any, Any]:
    """Throughput, memory, system and GPUs over the time the chosen steps took."""
    view, other, ranks, rng = c.params(rank_value, range_data)
    mp = c.max_points

    def models(v: StoreView) -> tuple[views.Throughput, views.MemorySeries, views.SystemSeries]:
        def build() -> tuple[views.Throughput, views.MemorySeries, views.SystemSeries]:
            window = views.step_range_to_time(v, rng, ranks)
            return (
                views.throughput(v, ranks, rng, max_points=mp),
                views.memory_series(v, ranks, window, max_points=mp),
                views.system_series(v, window, max_points=mp),
            )

        return c.cache.get(v, ("time", ranks, rng), build)

    if c.still_loading():  # step_time is in; process and system samples are on their way
        tp = c.cache.get(view, ("tp", ranks, rng), lambda: views.throughput(view, ranks, rng, max_points=mp))
        out = (
            figures.throughput_figure(tp),
            figures.loading_figure("Memory per rank"),
            figures.loading_figure("System (host)"),
            figures.loading_figure("GPUs"),
        )
    else:
        tp, mem, sysm = models(view)
        tp_b = mem_b = None
        if other is not None:
            tp_b, mem_b, _ = models(other)
        out = (
            figures.throughput_figure(tp, compare=tp_b, labels=c.plot_labels),
            figures.memory_figure(mem, compare=mem_b, labels=c.plot_labels),
            figures.system_figure(sysm),
            figures.gpu_figure(sysm),
        )
    _keep_view(rng, *out)
    return out


def diagnosis(c: AppContext, drawn: Any, _version: Any) -> Any:
    """The diagnosis panel; it waits for the first step charts (it is the slowest panel)."""
    if not drawn:
        return notice("Diagnosis", "waiting for the charts…")
    if c.still_loading():
        return notice("Diagnosis", "loading the recording…")
    view = c.main()
    if c.live:  # diagnosing the whole live window on every refresh would cost more than the charts
        now = time.monotonic()
        if c.diagnosis is None or now - c.diagnosis_at >= DIAGNOSIS_EVERY_S:
            c.diagnosis, c.diagnosis_at = [*now_children(view), *diagnosis_children(view)], now
        return c.diagnosis
    return c.cache.get(view, ("diagnosis",), lambda: diagnosis_children(view, use_summary=True))


def run_and_integrity(c: AppContext, _tick: Any) -> tuple[Any, ...]:
    """The run and integrity panels, the integrity badge and the status line."""
    view, other = c.views()
    info = c.cache.get(view, ("info",), lambda: views.run_info(view))
    info_b = None if other is None else c.cache.get(other, ("info",), lambda: views.run_info(other))
    meta, integ = run_panels(info, info_b, c.labels[1])
    colour = BADGE.get(info.integrity_status, "#6b7280")
    badge_style = {"padding": "2px 8px", "borderRadius": "6px", "color": "white", "background": colour}
    status = ""
    if c.live:
        status = f"{view.total_rows():,} rows, refreshed every {c.refresh_s:g} s"
    elif c.still_loading():
        status = "loading the rest of the recording…"
    return meta, integ, info.integrity_status, badge_style, status


def rank_options(c: AppContext, _tick: Any, options: Any, value: Any, spec: Any) -> tuple[Any, Any]:
    """Live: ranks appear while the run starts (checked when every rank was)."""
    view, other = c.views()
    ranks = c.all_ranks(view, other)
    known = [o["value"] for o in options or []]
    if len(ranks) > RANK_CHECKLIST_MAX:  # the text box chooses; the checklist stays hidden and empty
        if not known and sorted(value or []) == ranks:
            return dash.no_update, dash.no_update
        new, _ = rank_spec_update(spec, ranks)
        return [], (ranks if new is dash.no_update else new)
    if ranks == known:
        return dash.no_update, dash.no_update
    everything = sorted(value or []) == sorted(known)
    new_value = ranks if everything else [r for r in (value or []) if r in ranks]
    return [{"label": f" {r}", "value": r} for r in ranks], new_value


def rank_spec(c: AppContext, spec: Any) -> tuple[Any, str]:
    """Many ranks: the text box with the TRACEML_RANKS syntax chooses them."""
    view, other = c.views()
    return rank_spec_update(spec, c.all_ranks(view, other))


def register(app: dash.Dash, c: AppContext) -> None:
    """Wire the callbacks above into ``app``, each bound to ``c``."""
    app.callback(
        Output("data-version", "data"),
        Output("live-interval", "disabled"),
        Input("live-interval", "n_intervals"),
        State("data-version", "data"),
        prevent_initial_call=True,
    )(c.bind(data_version))
    app.clientside_callback(
        zoom_js(),
        Output("step-zoom", "data"),
        [Input(f, "relayoutData") for f in STEP_AXIS_FIGURES],
        State("step-zoom", "data"),
        prevent_initial_call=True,
    )
    app.callback(
        Output("step-range", "data"),
        Input("step-zoom", "data"),
        Input("range-reset", "n_clicks"),
        State("step-range", "data"),
        prevent_initial_call=True,
    )(c.bind(step_range))
    app.callback(
        Output(FIG_STEP_BREAKDOWN, "figure"),
        Output("stats-panel", "children"),
        Output("range-label", "children"),
        Output("first-chart", "data"),
        Input("rank-filter", "value"),
        Input("phase-toggle", "value"),
        Input("region-toggle", "value"),
        Input("step-range", "data"),
        Input("data-version", "data"),
        State("first-chart", "data"),
    )(c.bind(breakdown, tracked=True))
    app.callback(
        Output(FIG_RANK_STEPS, "figure"),
        Output(FIG_RANK_HEATMAP, "figure"),
        Output("charts-drawn", "data"),
        Input("rank-filter", "value"),
        Input("step-range", "data"),
        Input("data-version", "data"),
        Input("first-chart", "data"),
        prevent_initial_call=True,
    )(c.bind(rank_charts, tracked=True))
    app.callback(
        Output(FIG_THROUGHPUT, "figure"),
        Output(FIG_MEMORY, "figure"),
        Output(FIG_SYSTEM, "figure"),
        Output(FIG_GPU, "figure"),
        Input("rank-filter", "value"),
        Input("step-range", "data"),
        Input("data-version", "data"),
        Input("first-chart", "data"),
        prevent_initial_call=True,
    )(c.bind(time_charts, tracked=True))
    app.callback(
        Output("diagnosis-panel", "children"),
        Input("charts-drawn", "data"),
        Input("data-version", "data"),
    )(c.bind(diagnosis, tracked=True))
    app.callback(
        Output("meta-panel", "children"),
        Output("integrity-panel", "children"),
        Output("integrity-badge", "children"),
        Output("integrity-badge", "style"),
        Output("live-status", "children"),
        Input("data-version", "data"),
    )(c.bind(run_and_integrity, tracked=True))
    app.callback(
        Output("rank-filter", "options"),
        Output("rank-filter", "value"),
        Input("data-version", "data"),
        State("rank-filter", "options"),
        State("rank-filter", "value"),
        State("rank-spec", "value"),
        prevent_initial_call=True,
    )(c.bind(rank_options, tracked=True))
    app.callback(
        Output("rank-filter", "value", allow_duplicate=True),
        Output("rank-spec-msg", "children"),
        Input("rank-spec", "value"),
        prevent_initial_call=True,
    )(c.bind(rank_spec, tracked=True))
