"""The page: chart ids (stable for tests and bookmarks), the dashboard's constants and styles,
and :func:`page_layout`, the Dash component tree drawn for one page load (pure: no source, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

from dash import dcc, html

from traceml.schema import PHASES

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
#: beyond this many ranks the rank filter is a text box taking ``0-15,300`` (as TRACEML_RANKS), not checkboxes
RANK_CHECKLIST_MAX = 32

CSS = {
    "app": {"fontFamily": "system-ui, sans-serif", "margin": "0 auto", "maxWidth": "1400px", "padding": "12px"},
    "row": {"display": "flex", "flexWrap": "wrap", "gap": "12px", "alignItems": "center", "margin": "6px 0"},
    "card": {"border": "1px solid #e5e7eb", "borderRadius": "8px", "padding": "8px 12px", "margin": "8px 0"},
    "grid": {"display": "grid", "gridTemplateColumns": "repeat(auto-fit, minmax(620px, 1fr))", "gap": "8px"},
    "table": {"borderCollapse": "collapse", "fontSize": "13px"},
    "cell": {"padding": "2px 10px 2px 0", "verticalAlign": "top"},
}
BADGE = {"live": "#2563eb", "complete": "#16a34a", "recovered": "#d97706", "damaged": "#dc2626"}
GREY = "#6b7280"


def _graph(fig_id: str) -> dcc.Graph:
    return dcc.Graph(id=fig_id, config={"displaylogo": False})


def _controls(ranks: Sequence[int]) -> html.Div:
    """Ranks (checkboxes, or a range box beyond RANK_CHECKLIST_MAX), phases, regions, the step range."""
    wide = len(ranks) > RANK_CHECKLIST_MAX
    return html.Div(
        style={**CSS["card"], **CSS["row"]},
        children=[
            html.B("Ranks"),
            dcc.Checklist(
                id="rank-filter",
                options=[] if wide else [{"label": f" {r}", "value": r} for r in ranks],
                value=list(ranks),
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
            html.Span(id="rank-spec-msg", style={"marginLeft": "8px", "color": GREY}),
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
    )


def page_layout(
    title: str, ranks: Sequence[int], *, mode: str, live: bool, refresh_s: float, polling: bool
) -> html.Div:
    """The page for ``ranks`` (sorted); ``mode`` is the badge (live, replay, compare); ``polling``:
    the interval runs from the start (live, or a replay still loading)."""
    return html.Div(
        id="traceml-app",
        style=CSS["app"],
        children=[
            html.Div(
                style=CSS["row"],
                children=[
                    html.H2(title, id="run-title", style={"margin": "4px 12px 4px 0"}),
                    html.Span(
                        mode,
                        id="mode-badge",
                        style={"padding": "2px 8px", "borderRadius": "6px", "background": "#eef2ff"},
                    ),
                    html.Span(id="integrity-badge"),
                    html.Span(id="live-status", style={"color": GREY}),
                ],
            ),
            _controls(ranks),
            dcc.Store(id="step-zoom", data=None),
            dcc.Store(id="step-range", data=None),
            dcc.Interval(
                id="live-interval",
                interval=int((refresh_s if live else LOADING_POLL_S) * 1000),
                disabled=not polling,
            ),
            dcc.Store(id="charts-drawn", data=0),
            dcc.Store(id="first-chart", data=0),
            dcc.Store(id="data-version", data=None),
            html.Div(id="stats-panel", style={**CSS["card"], **CSS["row"]}),
            html.Div(
                style=CSS["grid"],
                children=[
                    _graph(f)
                    for f in (
                        FIG_STEP_BREAKDOWN,
                        FIG_RANK_STEPS,
                        FIG_RANK_HEATMAP,
                        FIG_THROUGHPUT,
                        FIG_MEMORY,
                        FIG_SYSTEM,
                    )
                ],
            ),
            _graph(FIG_GPU),
            html.Div(
                style=CSS["grid"],
                children=[
                    html.Div(id="diagnosis-panel", style=CSS["card"]),
                    html.Div(id="meta-panel", style=CSS["card"]),
                ],
            ),
            html.Div(id="integrity-panel", style=CSS["card"]),
        ],
    )
