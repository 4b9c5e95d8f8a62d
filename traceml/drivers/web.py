"""Web driver: the Dash dashboard, shared by ``traceml run --ui web`` (live) and ``traceml replay --ui web``.

:func:`build_app` takes a *source*, a callable returning the current :class:`StoreView`
(``ColumnStore.snapshot`` live, a recording's view in replay), and draws it with the pure
series views and figure renderers.  The driver owns time (``dcc.Interval`` in live mode) and
the socket (:class:`WebServer`, 127.0.0.1 unless told otherwise).  Long series are reduced
on the server; a step range chosen in the browser (zoom / brush on any step axis) is
re-queried at full resolution.  Chart element ids are stable (``FIGURE_IDS``) for tests.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from traceml import escape as esc
from traceml.config import ENV_PLOTLY_JS
from traceml.errors import ConfigError, MissingDependencyError
from traceml.renderers import figures
from traceml.schema import PHASES
from traceml.store import StoreView
from traceml.transport import listening_socket
from traceml.views import series
from traceml.views.final import FindingLine, findings_from_summary
from traceml.views.spread import parse_rank_filter

try:
    import dash
    from dash import Input, Output, State, ctx, dcc, html
    from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
except ImportError as exc:  # pragma: no cover - dash is a core dependency, but be explicit
    raise MissingDependencyError(
        f"the web dashboard needs dash (found: {exc}); install it with `pip install 'dash>=2.16'`"
    ) from exc

Source = Callable[[], StoreView]
T = TypeVar("T")

#: DOM ids of the charts, stable for tests and bookmarks
FIG_STEP_BREAKDOWN = "fig-step-breakdown"
FIG_RANK_STEPS = "fig-rank-steps"
FIG_RANK_HEATMAP = "fig-rank-heatmap"
FIG_THROUGHPUT = "fig-throughput"
FIG_MEMORY = "fig-memory"
FIG_SYSTEM = "fig-system"
FIG_GPU = "fig-gpu"
FIGURE_IDS: tuple[str, ...] = (
    FIG_STEP_BREAKDOWN,
    FIG_RANK_STEPS,
    FIG_RANK_HEATMAP,
    FIG_THROUGHPUT,
    FIG_MEMORY,
    FIG_SYSTEM,
    FIG_GPU,
)
#: the charts whose x axis is the step: zooming any of them sets the shared step range
STEP_AXIS_FIGURES: tuple[str, ...] = (FIG_STEP_BREAKDOWN, FIG_RANK_STEPS, FIG_RANK_HEATMAP)

DEFAULT_PORT = 8050
DEFAULT_REFRESH_S = 2.0
#: live mode diagnoses the window at most this often
DIAGNOSIS_EVERY_S = 10.0
#: how often a replay page asks whether the recording finished loading
LOADING_POLL_S = 0.5

_CSS = {
    "app": {"fontFamily": "system-ui, sans-serif", "margin": "0 auto", "maxWidth": "1400px", "padding": "12px"},
    "row": {"display": "flex", "flexWrap": "wrap", "gap": "12px", "alignItems": "center", "margin": "6px 0"},
    "card": {"border": "1px solid #e5e7eb", "borderRadius": "8px", "padding": "8px 12px", "margin": "8px 0"},
    "grid": {"display": "grid", "gridTemplateColumns": "repeat(auto-fit, minmax(620px, 1fr))", "gap": "8px"},
    "table": {"borderCollapse": "collapse", "fontSize": "13px"},
    "cell": {"padding": "2px 10px 2px 0", "verticalAlign": "top"},
}
_BADGE = {"live": "#2563eb", "complete": "#16a34a", "recovered": "#d97706", "damaged": "#dc2626"}


# --- caching -----------------------------------------------------------------------------------


class _ModelCache:
    """Small LRU of view models keyed by (view identity, what, parameters).

    A replay source hands back the same view object every time, so repeated callbacks (other
    charts, the same range again) reuse the models; a live source gives a fresh snapshot each
    tick and so misses, as it should.  Entries keep their view alive so ``id`` cannot be reused.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[Hashable, ...], tuple[StoreView, Any]] = OrderedDict()

    def get(self, view: StoreView, key: tuple[Hashable, ...], build: Callable[[], T]) -> T:
        full = (id(view), *key)
        with self._lock:
            hit = self._items.get(full)
            if hit is not None and hit[0] is view:
                self._items.move_to_end(full)
                value: T = hit[1]
                return value
        value = build()
        with self._lock:
            self._items[full] = (view, value)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


# --- input parsing (pure, tested directly) -----------------------------------------------------


def parse_step_range(relayout: Mapping[str, Any] | None) -> tuple[int, int] | None | bool:
    """A relayout event on a step axis -> ``(lo, hi)`` steps, ``None`` (full range), or False (not about x).

    Plotly sends ``{"xaxis.range[0]": a, "xaxis.range[1]": b}`` for a zoom or brush,
    ``{"xaxis.range": [a, b]}`` from ``Plotly.relayout``, ``{"xaxis.autorange": true}`` on
    double-click, and unrelated keys (``autosize``, ``yaxis.*``, ``dragmode``) otherwise.
    """
    if not relayout:
        return False
    if relayout.get("xaxis.autorange"):
        return None
    rng = relayout.get("xaxis.range")
    if isinstance(rng, (list, tuple)) and len(rng) == 2:
        a, b = rng
    elif "xaxis.range[0]" in relayout and "xaxis.range[1]" in relayout:
        a, b = relayout["xaxis.range[0]"], relayout["xaxis.range[1]"]
    else:
        return False
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(fa) and math.isfinite(fb)):
        return False
    lo, hi = math.ceil(min(fa, fb)), math.floor(max(fa, fb))
    if hi < lo:  # a zoom narrower than one step: keep the step under it
        lo = hi = round((fa + fb) / 2)
    return (lo, hi)


def step_range_update(relayouts: Sequence[Mapping[str, Any] | None], current: Any) -> Any:
    """The new step range from the relayout events that came in together, or ``dash.no_update``.

    Plotly reports a redraw of any chart as a relayout too (``{"autosize": true}``): when one comes
    in with the user's zoom on another chart, the zoom must win, so every event is looked at."""
    for relayout in relayouts:
        parsed = parse_step_range(relayout)
        if parsed is False:
            continue
        new = list(parsed) if isinstance(parsed, tuple) else None
        return dash.no_update if new == current else new
    return dash.no_update


def _as_range(data: Any) -> tuple[int, int] | None:
    if isinstance(data, (list, tuple)) and len(data) == 2:
        return (int(data[0]), int(data[1]))
    return None


#: beyond this many ranks the rank filter is a text box taking ``0-15,300`` (as TRACEML_RANKS), not checkboxes
RANK_CHECKLIST_MAX = 32


def rank_spec_update(spec: Any, available: Sequence[int]) -> tuple[Any, str]:
    """The rank filter's new value for the text typed in the wide-run rank box, and the inline message.
    Empty text: every rank.  Text that does not parse, or names no rank of this run: the value is
    left as it was (``dash.no_update``) and the message says what was expected."""
    text = str(spec or "").strip()[:1000]
    if not text:
        return list(available), f"all {len(available):,} ranks"
    try:
        wanted = parse_rank_filter(text)
    except ConfigError as exc:
        return dash.no_update, str(exc)
    chosen = [r for r in available if r in wanted]
    if not chosen:
        last = max(available) if available else -1
        return (
            dash.no_update,
            f"rank filter {text!r} names no rank of this run (ranks 0-{last}); expected e.g. 0-15,300",
        )
    return chosen, f"{len(chosen):,} of {len(available):,} ranks"


def _ranks_arg(value: Any, available: Sequence[int]) -> tuple[int, ...]:
    if value is None:
        return tuple(available)
    return tuple(sorted(int(v) for v in value))


# --- panels ---------------------------------------------------------------------------------


def _kv_table(rows: Sequence[tuple[str, str]], id_: str | None = None) -> html.Table:
    body = [
        html.Tr([html.Td(k, style={**_CSS["cell"], "color": "#6b7280"}), html.Td(v, style=_CSS["cell"])])
        for k, v in rows
    ]
    if id_:
        return html.Table(html.Tbody(body), style=_CSS["table"], id=id_)
    return html.Table(html.Tbody(body), style=_CSS["table"])


def _rank_table(rows: Sequence[tuple[str, ...]]) -> html.Table:
    head = html.Tr(
        [
            html.Th(h, style={**_CSS["cell"], "textAlign": "left"})
            for h in ("rank", "host", "state", "exit", "steps", "dropped")
        ]
    )
    body = [html.Tr([html.Td(c, style=_CSS["cell"]) for c in row]) for row in rows]
    return html.Table([html.Thead(head), html.Tbody(body)], style=_CSS["table"], id="rank-table")


def diagnosis_lines(view: StoreView, *, use_summary: bool) -> tuple[list[FindingLine], tuple[str, ...], str]:
    """``(findings, missing signals, where they come from)``: the primary diagnosis first.

    A finished recording carries the diagnosis of its whole run in the ``summary`` attachment, so
    replay shows that one (no need to diagnose millions of rows again); otherwise (live, crashed
    file) the view is diagnosed here.
    """
    if use_summary:
        recorded = findings_from_summary(view.attachments.get("summary"))
        if recorded:
            return recorded, (), "the run's summary, written when it ended"
    try:
        from traceml.diagnosis import diagnose
    except ImportError:
        return [], (), "diagnosis is not available in this installation"
    try:
        result = diagnose(view)
    except Exception as exc:  # a diagnosis bug must not take the dashboard down
        logging.getLogger(__name__).warning("diagnosis failed: %s", exc, exc_info=True)
        return [], (), f"diagnosis failed: {exc}"
    lines = findings_from_summary(result.to_dict())
    return lines, tuple(getattr(result, "missing", ())), "diagnosed from the rows shown"


def _diagnosis_children(view: StoreView, *, use_summary: bool = False) -> list[Any]:
    lines, missing, source = diagnosis_lines(view, use_summary=use_summary)
    children: list[Any] = [html.H4("Diagnosis")]
    if not lines:
        return [*children, html.P(source, style={"color": "#6b7280"})]
    primary = lines[0]
    rank = "" if primary.rank is None else f" (rank {primary.rank})"
    children.append(html.P([html.B(primary.kind, id="diagnosis-primary"), html.Span(f"{rank} — {primary.text}")]))
    items = []
    for f in lines:
        colour = {"critical": "#dc2626", "warn": "#d97706"}.get(f.severity, "#2563eb")
        where = "" if f.rank is None else f" (rank {f.rank})"
        items.append(
            html.Li(
                [
                    html.B(f"{f.kind}{where}", style={"color": colour}),
                    html.Span(f" [{f.severity}] "),
                    html.Span(f.text),
                ],
                className=f"finding finding-{f.severity}",
            )
        )
    children.append(html.Ul(items))
    if missing:
        children.append(
            html.P(f"not recorded, so some rules did not run: {', '.join(missing)}", style={"color": "#6b7280"})
        )
    children.append(html.P(f"source: {source}", style={"color": "#6b7280", "fontSize": "12px"}))
    children += _residual_children(view, use_summary=use_summary)
    return children


def _now_children(view: StoreView) -> list[Any]:
    """Live: the verdict over the last seconds of steps (traceml.diagnosis.live), above the run's."""
    try:
        from traceml.diagnosis.live import live_verdict

        f = live_verdict(view)
    except Exception as exc:  # a diagnosis bug must not take the dashboard down
        logging.getLogger(__name__).warning("live verdict failed: %s", exc, exc_info=True)
        return []
    if f is None:
        return []
    colour = {"critical": "#dc2626", "warn": "#d97706"}.get(f.severity, "#2563eb")
    return [
        html.H4("Now (the last seconds of steps)"),
        html.P(
            [html.B(f.kind, id="diagnosis-now", style={"color": colour}), html.Span(f" [{f.severity}] {f.summary}")]
        ),
    ]


def _residual_children(view: StoreView, *, use_summary: bool) -> list[Any]:
    """The stack sampler's top functions of the residual, as a table (nothing without samples)."""
    residual: Any = None
    summary = view.attachments.get("summary") if use_summary else None
    if isinstance(summary, dict):
        residual = summary.get("residual")
    if residual is None:
        try:
            from traceml.diagnosis.stacks import residual_profile
            from traceml.views.steps import step_data

            profile = residual_profile(view, step_data(view))
            residual = profile.to_dict() if profile is not None else None
        except Exception as exc:  # a diagnosis bug must not take the dashboard down
            logging.getLogger(__name__).warning("residual profile failed: %s", exc, exc_info=True)
            return []
    if not isinstance(residual, dict) or not residual.get("top"):
        return []
    head = html.Tr([html.Th(h) for h in ("residual spent in", "defined at", "samples", "share", "reads data")])
    body = [
        html.Tr(
            [
                html.Td(str(e.get("func", ""))[:96]),
                html.Td(str(e.get("site", ""))[:96]),
                html.Td(str(e.get("samples", ""))),
                html.Td(f"{100 * float(e.get('share') or 0):.0f}%"),
                html.Td("yes" if e.get("reads_data") else ""),
            ]
        )
        for e in list(residual["top"])[:8]
        if isinstance(e, dict)
    ]
    return [
        html.H4("Where the residual goes (stack samples)"),
        html.Table([html.Thead(head), html.Tbody(body)], style=_CSS["table"], id="residual-table"),
    ]


def _stats_children(
    bd: series.StepBreakdown, rs: series.RankSteps, compare: series.StepBreakdown | None, labels: tuple[str, str]
) -> list[Any]:
    def ms(v: float) -> str:
        if not math.isfinite(v):
            return "n/a" if bd.exact else "loading…"
        return f"{v:.3f} ms"

    skew = "n/a" if not math.isfinite(rs.skew_pct) else f"{rs.skew_pct:.1f}%"
    if not rs.exact and math.isfinite(rs.skew_pct):
        skew += " (of means, while loading)"
    tput = f"{bd.steps_per_s:.2f}" if math.isfinite(bd.steps_per_s) else ("n/a" if bd.exact else "loading…")
    outside = f"{100 * bd.outside_share:.1f}%" if math.isfinite(bd.outside_share) else "n/a"
    parts = [
        ("median step (job)", ms(bd.median_ms), "stat-median"),
        ("p95 step", ms(bd.p95_ms), "stat-p95"),
        ("skew (steps all ranks have)", skew, "stat-skew"),
        ("slowest rank", "-" if rs.slowest_rank is None else str(rs.slowest_rank), "stat-slowest"),
        ("steps/s (measured)", tput, "stat-throughput"),
        ("outside steps", outside, "stat-outside"),
        ("rows", f"{bd.rows:,} steps x ranks over {len(bd.ranks)} rank(s)", "stat-rows"),
    ]
    if compare is not None:
        parts.append((f"{labels[1]} median step", ms(compare.median_ms), "stat-compare-median"))
    return [
        html.Span([html.Span(f"{k}: ", style={"color": "#6b7280"}), html.B(v, id=i)], style={"marginRight": "18px"})
        for k, v, i in parts
    ]


# --- the app --------------------------------------------------------------------------------

#: where the page loads a plotly.js bundle given with ``plotly_js`` / $TRACEML_PLOTLY_JS
PLOTLY_BUNDLE_ROUTE = "/_traceml/plotly.js"


def _serve_plotly_bundle(app: dash.Dash, path: str | os.PathLike[str] | None) -> None:
    """Serve *path* as the page's plotly.js, loaded before Dash's scripts: the graphs use the
    ``window.Plotly`` it defines and never fetch plotly's own (4.8 MB) bundle."""
    if path is None:
        return
    bundle = Path(path)
    try:
        head = bundle.read_bytes()[:4096]
    except OSError as exc:
        raise ConfigError(
            f"{ENV_PLOTLY_JS}={str(bundle)!r}: cannot read it ({exc.strerror or exc}); expected a plotly.js bundle"
            " such as plotly-cartesian.min.js, or unset it to use plotly's own"
        ) from exc
    if b"plotly" not in head.lower():
        raise ConfigError(
            f"{ENV_PLOTLY_JS}={str(bundle)!r} does not look like a plotly.js bundle (no 'plotly' in its first 4 KiB);"
            " unset it to use plotly's own"
        )
    from flask import send_file

    def plotly_bundle() -> Any:
        return send_file(bundle, mimetype="text/javascript", max_age=24 * 3600)

    app.server.add_url_rule(PLOTLY_BUNDLE_ROUTE, "traceml_plotly_bundle", plotly_bundle)
    app.index_string = app.index_string.replace(
        "{%scripts%}", f'<script src="{PLOTLY_BUNDLE_ROUTE}"></script>\n            {{%scripts%}}', 1
    )


@dataclass(frozen=True)
class _Sources:
    main: Source
    compare: Source | None
    labels: tuple[str, str]


def _labels(source: Source, compare: Source | None) -> tuple[str, str]:
    if compare is None:
        return ("A", "B")
    a = esc.visible(series.run_info(source()).title, 60)
    b = esc.visible(series.run_info(compare()).title, 60)
    return (f"A {a}", f"B {b}") if a != b else ("A", "B")


def build_app(
    source: Source,
    *,
    live: bool,
    compare_source: Source | None = None,
    title: str | None = None,
    refresh_s: float = DEFAULT_REFRESH_S,
    max_points: int = series.MAX_POINTS,
    loading: Callable[[], bool] | None = None,
    on_charts_drawn: Callable[[], None] | None = None,
    plotly_js: str | os.PathLike[str] | None = None,
) -> dash.Dash:
    """The Dash app over ``source`` (and ``compare_source``, overlaid as "B").  Serve it with :class:`WebServer`.

    ``loading`` (replay): a callable that is true while ``source`` still loads the tables the time
    charts and the diagnosis need; the page polls until it turns false, then stops polling.
    ``plotly_js``: a plotly.js bundle to serve instead of the full one that comes with plotly
    (default: ``$TRACEML_PLOTLY_JS``); it must hold the scatter and heatmap traces.
    ``on_charts_drawn`` is called once the step charts were built and sent, from the page's next
    poll with no chart request in flight (a staged replay source starts loading the rest then, so
    the loading does not compete with the first render, in this process or in the browser).
    """
    if refresh_s <= 0:
        raise ConfigError(f"refresh_s={refresh_s!r}: expected a positive number of seconds")
    src = _Sources(source, compare_source, _labels(source, compare_source))
    cache = _ModelCache()
    first = source()
    # names from the recording: plain text in the page (React escapes it), entities in the <title>
    # (Dash pastes it into the page unescaped) and in plotly strings (plotly reads a subset of HTML)
    app_title = esc.visible(title or f"traceml — {series.run_info(first).title}")
    plot_labels = (esc.html(src.labels[0]), esc.html(src.labels[1]))
    app = dash.Dash(
        __name__,
        title=esc.html(app_title),
        update_title="",
        serve_locally=True,
        suppress_callback_exceptions=False,
        assets_folder="__traceml_no_assets__",
        include_assets_files=False,
    )
    _serve_plotly_bundle(app, plotly_js if plotly_js is not None else os.environ.get(ENV_PLOTLY_JS) or None)
    # plotly builds its validators on first use (~0.4 s): pay it now, not in the first request
    tiny = np.zeros(2)
    figures.step_breakdown_figure(
        series.StepBreakdown(tiny, {p: tiny for p in PHASES}, tiny, 0.0, 0.0, 1, (0,), 2, None)
    )

    def still_loading() -> bool:
        return bool(loading is not None and loading())

    def views() -> tuple[StoreView, StoreView | None]:
        return src.main(), (src.compare() if src.compare is not None else None)

    def all_ranks(view: StoreView, other: StoreView | None) -> list[int]:
        return sorted(set(view.ranks) | set(other.ranks if other is not None else ()))

    def layout() -> html.Div:
        view, other = views()
        ranks = all_ranks(view, other)
        wide = len(ranks) > RANK_CHECKLIST_MAX
        mode = "live" if live else ("compare" if other is not None else "replay")
        return html.Div(
            id="traceml-app",
            style=_CSS["app"],
            children=[
                html.Div(
                    style=_CSS["row"],
                    children=[
                        html.H2(app_title, id="run-title", style={"margin": "4px 12px 4px 0"}),
                        html.Span(
                            mode,
                            id="mode-badge",
                            style={"padding": "2px 8px", "borderRadius": "6px", "background": "#eef2ff"},
                        ),
                        html.Span(id="integrity-badge"),
                        html.Span(id="live-status", style={"color": "#6b7280"}),
                    ],
                ),
                html.Div(
                    style={**_CSS["card"], **_CSS["row"]},
                    children=[
                        html.B("Ranks"),
                        dcc.Checklist(
                            id="rank-filter",
                            options=[] if wide else [{"label": f" {r}", "value": r} for r in ranks],
                            value=ranks,
                            inline=True,
                            inputStyle={"marginLeft": "8px"},
                            style={"display": "none"} if wide else {},
                        ),
                        dcc.Input(
                            id="rank-spec",
                            type="text",
                            placeholder=f"e.g. 0-15,300 (all {len(ranks):,} ranks)",
                            debounce=True,
                            value="",
                            style={"marginLeft": "8px"} if wide else {"display": "none"},
                        ),
                        html.Span(id="rank-spec-msg", style={"marginLeft": "8px", "color": "#6b7280"}),
                        html.B("Phases", style={"marginLeft": "16px"}),
                        dcc.Checklist(
                            id="phase-toggle",
                            options=[{"label": f" {p}", "value": p} for p in PHASES],
                            value=list(PHASES),
                            inline=True,
                            inputStyle={"marginLeft": "8px"},
                        ),
                        dcc.Checklist(
                            id="region-toggle",
                            options=[{"label": " named regions (out of residual)", "value": "regions"}],
                            value=["regions"],
                            inline=True,
                            inputStyle={"marginLeft": "8px"},
                        ),
                        html.Span("all steps", id="range-label", style={"marginLeft": "16px"}),
                        html.Button("Full range", id="range-reset", n_clicks=0),
                    ],
                ),
                dcc.Store(id="step-range", data=None),
                dcc.Interval(
                    id="live-interval",
                    interval=int((refresh_s if live else LOADING_POLL_S) * 1000),
                    disabled=not (live or still_loading()),
                ),
                dcc.Store(id="charts-drawn", data=0),
                dcc.Store(id="first-chart", data=0),
                dcc.Store(id="data-version", data=None),
                html.Div(id="stats-panel", style={**_CSS["card"], **_CSS["row"]}),
                html.Div(
                    style=_CSS["grid"],
                    children=[
                        dcc.Graph(id=FIG_STEP_BREAKDOWN, config={"displaylogo": False}),
                        dcc.Graph(id=FIG_RANK_STEPS, config={"displaylogo": False}),
                        dcc.Graph(id=FIG_RANK_HEATMAP, config={"displaylogo": False}),
                        dcc.Graph(id=FIG_THROUGHPUT, config={"displaylogo": False}),
                        dcc.Graph(id=FIG_MEMORY, config={"displaylogo": False}),
                        dcc.Graph(id=FIG_SYSTEM, config={"displaylogo": False}),
                    ],
                ),
                dcc.Graph(id=FIG_GPU, config={"displaylogo": False}),
                html.Div(
                    style=_CSS["grid"],
                    children=[
                        html.Div(id="diagnosis-panel", style=_CSS["card"]),
                        html.Div(id="meta-panel", style=_CSS["card"]),
                    ],
                ),
                html.Div(id="integrity-panel", style=_CSS["card"]),
            ],
        )

    app.layout = layout

    # -- live: the clock ticks, the data version moves only when the data did ----------------------
    # Dash drops a response when a newer request for the same outputs was sent, so a version that
    # moved faster than the charts are built would never show anything: it waits for them.
    inflight = [0]
    inflight_lock = threading.Lock()
    drawn = [0]  # how many times the step charts were built

    def tracked(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: Any) -> T:
            with inflight_lock:
                inflight[0] += 1
            try:
                return fn(*args)
            finally:
                with inflight_lock:
                    inflight[0] -= 1

        return run

    @app.callback(
        Output("data-version", "data"),
        Output("live-interval", "disabled"),
        Input("live-interval", "n_intervals"),
        State("data-version", "data"),
        prevent_initial_call=True,
    )
    def _version(_tick: Any, current: Any) -> tuple[Any, Any]:
        pending = still_loading()
        stop = dash.no_update if live or pending else True  # a replay stops polling once loaded
        with inflight_lock:
            if inflight[0]:
                return dash.no_update, dash.no_update
        if drawn[0] and on_charts_drawn is not None:
            on_charts_drawn()
        view = src.main()
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

    # -- step range: a zoom / brush on any step axis, or the reset button -------------------------
    @app.callback(
        Output("step-range", "data"),
        [Input(f, "relayoutData") for f in STEP_AXIS_FIGURES] + [Input("range-reset", "n_clicks")],
        State("step-range", "data"),
        prevent_initial_call=True,
    )
    def _on_range(*args: Any) -> Any:
        current = args[-1]
        triggered = {t["prop_id"].rsplit(".", 1)[0] for t in ctx.triggered}
        if "range-reset" in triggered:
            return None if current is not None else dash.no_update
        return step_range_update([args[i] for i, fig in enumerate(STEP_AXIS_FIGURES) if fig in triggered], current)

    def keep_view(rng: tuple[int, int] | None, *figs: Any) -> None:
        """Plotly keeps the user's zoom and legend clicks while ``uirevision`` stays the same: the same
        range refreshed (live) keeps them; a new range (or the full one) shows its data from scratch."""
        for fig in figs:
            fig.layout.uirevision = "all" if rng is None else f"{rng[0]}-{rng[1]}"

    def _params(
        rank_value: Any, range_data: Any
    ) -> tuple[StoreView, StoreView | None, tuple[int, ...], tuple[int, int] | None]:
        view, other = views()
        return view, other, _ranks_arg(rank_value, all_ranks(view, other)), _as_range(range_data)

    # -- step charts ----------------------------------------------------------------------------
    @app.callback(
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
    )
    @tracked
    def _breakdown(
        rank_value: Any, phases: Any, region_value: Any, range_data: Any, _tick: Any, first_sent: Any
    ) -> tuple[Any, Any, Any, Any]:
        view, other, ranks, rng = _params(rank_value, range_data)
        bd = cache.get(
            view, ("bd", ranks, rng), lambda: series.step_breakdown(view, ranks, rng, max_buckets=max_points)
        )
        rs = cache.get(view, ("rs", ranks, rng), lambda: series.rank_steps(view, ranks, rng, max_points=max_points))
        bd_b = None
        if other is not None:
            bd_b = cache.get(
                other, ("bd", ranks, rng), lambda: series.step_breakdown(other, ranks, rng, max_buckets=max_points)
            )
        shown = [p for p in PHASES if p in (phases or [])]
        fig = figures.step_breakdown_figure(
            bd, shown, compare=bd_b, labels=plot_labels, regions="regions" in (region_value or [])
        )
        if rng is None:
            label = "all steps" + ("" if bd.bucket_steps == 1 else f" (reduced: {bd.bucket_steps} steps per point)")
        else:
            res = "full resolution" if bd.bucket_steps == 1 else f"{bd.bucket_steps} steps per point"
            label = f"steps {rng[0]} .. {rng[1]} ({res})"
        if not bd.exact:
            label += "; drawn from the recording's rollup while its rows load"
        keep_view(rng, fig)
        # the page's other charts are requested once this one arrived (it is drawn first): the
        # store moves once per page, so later changes do not ask for them twice
        first = 1 if not first_sent else dash.no_update
        return fig, _stats_children(bd, rs, bd_b, src.labels), label, first

    @app.callback(
        Output(FIG_RANK_STEPS, "figure"),
        Output(FIG_RANK_HEATMAP, "figure"),
        Output("charts-drawn", "data"),
        Input("rank-filter", "value"),
        Input("step-range", "data"),
        Input("data-version", "data"),
        Input("first-chart", "data"),
        prevent_initial_call=True,
    )
    @tracked
    def _ranks(rank_value: Any, range_data: Any, _tick: Any, _first: Any) -> tuple[Any, Any, int]:
        view, other, ranks, rng = _params(rank_value, range_data)
        rs = cache.get(view, ("rs", ranks, rng), lambda: series.rank_steps(view, ranks, rng, max_points=max_points))
        rs_b = None
        if other is not None:
            rs_b = cache.get(
                other, ("rs", ranks, rng), lambda: series.rank_steps(other, ranks, rng, max_points=max_points)
            )
        drawn[0] += 1
        per_rank, heat = (
            figures.rank_steps_figure(rs, compare=rs_b, labels=plot_labels),
            figures.rank_heatmap_figure(rs),
        )
        keep_view(rng, per_rank, heat)
        return per_rank, heat, drawn[0]

    # -- time charts: the step range maps to the time those steps took --------------------------
    @app.callback(
        Output(FIG_THROUGHPUT, "figure"),
        Output(FIG_MEMORY, "figure"),
        Output(FIG_SYSTEM, "figure"),
        Output(FIG_GPU, "figure"),
        Input("rank-filter", "value"),
        Input("step-range", "data"),
        Input("data-version", "data"),
        Input("first-chart", "data"),
        prevent_initial_call=True,
    )
    @tracked
    def _time(rank_value: Any, range_data: Any, _tick: Any, _first: Any) -> tuple[Any, Any, Any, Any]:
        view, other, ranks, rng = _params(rank_value, range_data)

        def models(v: StoreView) -> tuple[series.Throughput, series.MemorySeries, series.SystemSeries]:
            def build() -> tuple[series.Throughput, series.MemorySeries, series.SystemSeries]:
                window = series.step_range_to_time(v, rng, ranks)
                return (
                    series.throughput(v, ranks, rng, max_points=max_points),
                    series.memory_series(v, ranks, window, max_points=max_points),
                    series.system_series(v, window, max_points=max_points),
                )

            return cache.get(v, ("time", ranks, rng), build)

        if still_loading():  # step_time is in; process and system samples are on their way
            tp = cache.get(view, ("tp", ranks, rng), lambda: series.throughput(view, ranks, rng, max_points=max_points))
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
                figures.throughput_figure(tp, compare=tp_b, labels=plot_labels),
                figures.memory_figure(mem, compare=mem_b, labels=plot_labels),
                figures.system_figure(sysm),
                figures.gpu_figure(sysm),
            )
        keep_view(rng, *out)
        return out

    # -- panels ---------------------------------------------------------------------------------
    diag_state: dict[str, Any] = {"children": None, "at": 0.0}

    # the diagnosis waits for the first step charts (it is the slowest panel) and runs on its own
    @app.callback(
        Output("diagnosis-panel", "children"),
        Input("charts-drawn", "data"),
        Input("data-version", "data"),
    )
    @tracked
    def _diagnosis(_drawn: Any, _version: Any) -> Any:
        if not _drawn:
            return [html.H4("Diagnosis"), html.P("waiting for the charts…", style={"color": "#6b7280"})]
        if still_loading():
            return [html.H4("Diagnosis"), html.P("loading the recording…", style={"color": "#6b7280"})]
        view = src.main()
        if live:  # diagnosing the whole live window on every refresh would cost more than the charts
            now = time.monotonic()
            if diag_state["children"] is None or now - diag_state["at"] >= DIAGNOSIS_EVERY_S:
                diag_state["children"], diag_state["at"] = [*_now_children(view), *_diagnosis_children(view)], now
            return diag_state["children"]
        return cache.get(view, ("diagnosis",), lambda: _diagnosis_children(view, use_summary=True))

    @app.callback(
        Output("meta-panel", "children"),
        Output("integrity-panel", "children"),
        Output("integrity-badge", "children"),
        Output("integrity-badge", "style"),
        Output("live-status", "children"),
        Input("data-version", "data"),
    )
    @tracked
    def _panels(_tick: Any) -> tuple[Any, ...]:
        view, other = views()
        info = cache.get(view, ("info",), lambda: series.run_info(view))
        meta: list[Any] = [html.H4("Run"), _kv_table(info.meta, "run-meta"), html.H4("Ranks"), _rank_table(info.ranks)]
        if info.environment:
            meta += [html.H4("Environment"), _kv_table(info.environment, "run-environment")]
        else:
            meta += [html.H4("Environment"), html.P("not recorded", style={"color": "#6b7280"})]
        integ: list[Any] = [html.H4("Recording integrity"), _kv_table(info.integrity, "integrity-table")]
        if other is not None:
            info_b = cache.get(other, ("info",), lambda: series.run_info(other))
            meta += [html.H4(f"Compared with: {src.labels[1]}"), _kv_table(info_b.meta, "compare-meta")]
            integ += [html.H4(f"{src.labels[1]} integrity"), _kv_table(info_b.integrity)]
        colour = _BADGE.get(info.integrity_status, "#6b7280")
        badge_style = {"padding": "2px 8px", "borderRadius": "6px", "color": "white", "background": colour}
        status = ""
        if live:
            status = f"{view.total_rows():,} rows, refreshed every {refresh_s:g} s"
        elif still_loading():
            status = "loading the rest of the recording…"
        return meta, integ, info.integrity_status, badge_style, status

    # -- live: ranks appear while the run starts ---------------------------------------------------
    @app.callback(
        Output("rank-filter", "options"),
        Output("rank-filter", "value"),
        Input("data-version", "data"),
        State("rank-filter", "options"),
        State("rank-filter", "value"),
        State("rank-spec", "value"),
        prevent_initial_call=True,
    )
    @tracked
    def _rank_options(_tick: Any, options: Any, value: Any, spec: Any) -> tuple[Any, Any]:
        view, other = views()
        ranks = all_ranks(view, other)
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

    # -- many ranks: a text box with the TRACEML_RANKS syntax chooses them ----------------------------
    @app.callback(
        Output("rank-filter", "value", allow_duplicate=True),
        Output("rank-spec-msg", "children"),
        Input("rank-spec", "value"),
        prevent_initial_call=True,
    )
    @tracked
    def _rank_spec(spec: Any) -> tuple[Any, str]:
        view, other = views()
        return rank_spec_update(spec, all_ranks(view, other))

    return app


# --- serving --------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """No access log; one request per connection, so no handler thread waits on an idle browser
    connection after the server stopped (the dashboard talks to 127.0.0.1: reconnecting is cheap)."""

    protocol_version = "HTTP/1.0"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: names a browser on this machine uses for a loopback server (IP literals are checked apart)
LOOPBACK_NAMES = frozenset({"localhost"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_FORBIDDEN_BODY = (
    b"403 Forbidden: this traceml dashboard answers only requests addressed to it by a loopback name\n"
    b"(127.0.0.1, localhost, [::1]) or by the address it was started with (--host).\n"
)


def _host_of(header: str) -> str:
    """The host name of a ``Host`` header, without the port, brackets or a final dot, lower-case."""
    host = header.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".").lower()


def _machine_names() -> set[str]:
    """Every address of this machine's interfaces, and its host name (for a wildcard bind)."""
    names = {socket.gethostname().lower()}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            names.update(
                a.address.split("%")[0].lower() for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)
            )
    except Exception:
        pass
    return names


def allowed_hosts(host: str, bound: str) -> frozenset[str]:
    """The ``Host`` names a dashboard bound to ``bound`` (asked as ``host``) answers (DNS rebinding).

    Loopback names always; the name or address it was started with; for a wildcard bind
    (``0.0.0.0``, ``::``) also this machine's addresses and host name.  Any other name, the kind
    a rebinding attacker's domain has, gets 403.
    """
    names = set(LOOPBACK_NAMES) | {_host_of(host), _host_of(f"[{bound}]" if ":" in bound else bound)}
    if host in _WILDCARDS or bound in _WILDCARDS:
        names |= _machine_names()
    return frozenset(n for n in names if n and n not in _WILDCARDS)


class HostCheck:
    """WSGI middleware: a request whose ``Host`` is not an allowed name gets 403 (DNS rebinding)."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    def permits(self, header: str) -> bool:
        name = _host_of(header)
        if name in self.allowed:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self.permits(str(environ.get("HTTP_HOST", ""))):
            start_response(
                "403 Forbidden",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(_FORBIDDEN_BODY)))],
            )
            return [_FORBIDDEN_BODY]
        return self.app(environ, start_response)


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on ``host:port``; a busy or bad address is a ConfigError that says what to change.

    Bind before loading anything heavy, then hand the socket to :class:`WebServer`.
    """
    try:
        return listening_socket(host, port)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}; "
            "choose another --port (0 picks a free one) or --host"
        ) from exc


class WebServer:
    """A threaded WSGI server for a Dash app; ``port=0`` picks a free port.  ``stop()`` joins everything.

    ``sock`` is a socket from :func:`listen` (the server takes it over); without it the server binds
    ``host:port`` itself.  Requests are answered only when their ``Host`` names this server by a
    loopback name or by ``host`` (:func:`allowed_hosts`); others get 403.
    """

    def __init__(
        self, app: dash.Dash, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        # bind ourselves so a busy port is an error we can word (werkzeug would print and sys.exit)
        sock = sock if sock is not None else listen(host, port)
        try:
            bound_host = sock.getsockname()[0]
            guarded = HostCheck(app.server, allowed_hosts(host, str(bound_host)))
            self._server: BaseWSGIServer = make_server(
                bound_host, 0, guarded, threaded=True, request_handler=_QuietHandler, fd=sock.fileno()
            )
        finally:
            sock.close()  # the server holds its own duplicate of the descriptor
        self.host = str(bound_host)
        self.port: int = int(self._server.port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> WebServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="traceml-web", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (from another thread) or Ctrl-C."""
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    source: Source,
    *,
    live: bool,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    compare_source: Source | None = None,
    title: str | None = None,
    refresh_s: float = DEFAULT_REFRESH_S,
    stop: threading.Event | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Build the app and serve it until Ctrl-C (or ``stop`` is set).  Binds 127.0.0.1 unless ``host`` says otherwise."""
    say = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    app = build_app(source, live=live, compare_source=compare_source, title=title, refresh_s=refresh_s)
    server = WebServer(app, host, port)
    if not is_loopback(host):
        say(f"warning: the dashboard has no authentication and is reachable on {host}:{server.port}")
    say(f"traceml dashboard: {server.url}  (Ctrl-C to stop)")
    if stop is None:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return
    server.start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def serve_live(
    snapshot: Source, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, refresh_s: float = DEFAULT_REFRESH_S
) -> WebServer:
    """Start the live dashboard over ``snapshot`` (``ColumnStore.snapshot``) in a thread; ``.stop()`` ends it."""
    app = build_app(snapshot, live=True, refresh_s=refresh_s)
    return WebServer(app, host, port).start()
