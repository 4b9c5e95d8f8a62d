"""Web driver: the Dash dashboard, shared by ``traceml run --ui web`` (live) and ``traceml replay --ui web``.

The driver owns time and the socket; views and renderers stay pure.  Modules: docs/internals.md ("Web driver").
"""

from __future__ import annotations

from traceml.errors import MissingDependencyError

try:
    import dash  # noqa: F401
    import werkzeug.serving  # noqa: F401
except ImportError as exc:  # pragma: no cover - dash is a core dependency, but be explicit
    raise MissingDependencyError(
        f"the web dashboard needs dash (found: {exc}); install it with `pip install 'dash>=2.16'`"
    ) from exc

from traceml.drivers.web.app import PLOTLY_BUNDLE_ROUTE, build_app
from traceml.drivers.web.context import Source
from traceml.drivers.web.layout import (
    DEFAULT_PORT,
    DEFAULT_REFRESH_S,
    DIAGNOSIS_EVERY_S,
    FIG_GPU,
    FIG_MEMORY,
    FIG_RANK_HEATMAP,
    FIG_RANK_STEPS,
    FIG_STEP_BREAKDOWN,
    FIG_SYSTEM,
    FIG_THROUGHPUT,
    FIGURE_IDS,
    LOADING_POLL_S,
    RANK_CHECKLIST_MAX,
    STEP_AXIS_FIGURES,
)
from traceml.drivers.web.panels import diagnosis_lines
from traceml.drivers.web.server import (
    LOOPBACK_NAMES,
    HostCheck,
    WebServer,
    allowed_hosts,
    is_loopback,
    listen,
    serve,
    serve_app,
    serve_live,
)
from traceml.drivers.web.zoom import parse_step_range, rank_spec_update, step_range_update

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_REFRESH_S",
    "DIAGNOSIS_EVERY_S",
    "FIGURE_IDS",
    "FIG_GPU",
    "FIG_MEMORY",
    "FIG_RANK_HEATMAP",
    "FIG_RANK_STEPS",
    "FIG_STEP_BREAKDOWN",
    "FIG_SYSTEM",
    "FIG_THROUGHPUT",
    "LOADING_POLL_S",
    "LOOPBACK_NAMES",
    "PLOTLY_BUNDLE_ROUTE",
    "RANK_CHECKLIST_MAX",
    "STEP_AXIS_FIGURES",
    "HostCheck",
    "Source",
    "WebServer",
    "allowed_hosts",
    "build_app",
    "diagnosis_lines",
    "is_loopback",
    "listen",
    "parse_step_range",
    "rank_spec_update",
    "serve",
    "serve_app",
    "serve_live",
    "step_range_update",
]
