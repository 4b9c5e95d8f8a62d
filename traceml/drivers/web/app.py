"""The Dash app over a *source* (a callable returning the current :class:`StoreView`:
``ColumnStore.snapshot`` live, a recording's view in replay): :func:`build_app` makes the context,
the page and the callbacks; serve it with :class:`traceml.drivers.web.server.WebServer`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dash
import numpy as np

from traceml import escape as esc
from traceml import views
from traceml.config import ENV_PLOTLY_JS
from traceml.drivers.web import callbacks
from traceml.drivers.web.context import AppContext, Source
from traceml.drivers.web.layout import DEFAULT_REFRESH_S, page_layout
from traceml.errors import ConfigError
from traceml.renderers import figures
from traceml.schema import PHASES
from traceml.store import StoreView

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


def _labels(source: Source, compare: Source | None) -> tuple[str, str]:
    if compare is None:
        return ("A", "B")
    a = esc.visible(views.run_info(source()).title, 60)
    b = esc.visible(views.run_info(compare()).title, 60)
    return (f"A {a}", f"B {b}") if a != b else ("A", "B")


def build_app(
    source: Source,
    *,
    live: bool,
    compare_source: Source | None = None,
    title: str | None = None,
    refresh_s: float = DEFAULT_REFRESH_S,
    max_points: int = views.MAX_POINTS,
    loading: Callable[[], bool] | None = None,
    on_charts_drawn: Callable[[], None] | None = None,
    plotly_js: str | os.PathLike[str] | None = None,
    zoomed: Callable[[tuple[int, int]], StoreView | None] | None = None,
) -> dash.Dash:
    """The Dash app over ``source`` (and ``compare_source``, overlaid as "B").  Serve it with :class:`WebServer`.

    ``loading`` (replay): a callable that is true while ``source`` still loads the tables the time
    charts and the diagnosis need; the page polls until it turns false, then stops polling.
    ``plotly_js``: a plotly.js bundle to serve instead of the full one that comes with plotly
    (default: ``$TRACEML_PLOTLY_JS``); it must hold the scatter and heatmap traces.
    ``on_charts_drawn`` is called once the step charts were built and sent, from the page's next
    poll with no chart request in flight (a staged replay source starts loading the rest then, so
    the loading does not compete with the first render, in this process or in the browser).
    ``zoomed`` (replay of a long recording): a step range -> a view with every row of that range,
    read through the file's index, or None to draw the source's own view.
    """
    if refresh_s <= 0:
        raise ConfigError(f"refresh_s={refresh_s!r}: expected a positive number of seconds")
    labels = _labels(source, compare_source)
    c = AppContext(
        main=source,
        compare=compare_source,
        labels=labels,
        # names from the recording: plain text in the page (React escapes it), entities in the <title>
        # (Dash pastes it into the page unescaped) and in plotly strings (plotly reads a subset of HTML)
        plot_labels=(esc.html(labels[0]), esc.html(labels[1])),
        live=live,
        refresh_s=refresh_s,
        max_points=max_points,
        loading=loading,
        on_charts_drawn=on_charts_drawn,
        zoomed=zoomed,
    )
    app_title = esc.visible(title or f"traceml — {views.run_info(source()).title}")
    app = dash.Dash(
        "traceml.drivers.web",
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
        views.StepBreakdown(tiny, {p: tiny for p in PHASES}, tiny, 0.0, 0.0, 1, (0,), 2, None)
    )

    def layout() -> Any:
        view, other = c.views()
        mode = "live" if live else ("compare" if other is not None else "replay")
        return page_layout(
            app_title,
            c.all_ranks(view, other),
            mode=mode,
            live=live,
            refresh_s=refresh_s,
            polling=live or c.still_loading(),
        )

    app.layout = layout
    callbacks.register(app, c)
    return app
