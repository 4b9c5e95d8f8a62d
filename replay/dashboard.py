"""The post-mortem dashboard: the live Dash app (``traceml.drivers.web``) mounted over recordings.

A recording becomes the same StoreView the aggregator fills; ``compare`` overlays "B", ``follow`` tails a file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from replay.engine import Recording
from replay.engine import open as open_recording
from replay.tail import Tail
from traceml.errors import TracemlError
from traceml.store import StoreView

if TYPE_CHECKING:
    import dash

Source = Callable[[], StoreView]
log = logging.getLogger("traceml.replay")


#: what the first charts draw from; the rest of a recording loads behind them
FIRST_TABLES = ("step_time",)
#: above this many rows in FIRST_TABLES (~0.1 s to load) the first charts draw from their rollups
ROLLUP_FIRST_ROWS = 500_000
#: zoomed views of a bounded recording kept (the app caches its figures per view)
ZOOM_CACHE = 8


class RecordingSource:
    """A source over a finished (or crashed) recording: the step charts' table first, then the rest.

    The first view holds ``step_time`` only, so the step charts can be built from it — or, for a
    long recording (over ``ROLLUP_FIRST_ROWS`` rows), only its rollup (``rollup/step_time``, a
    row per group of steps, read without decoding the rows); once they were drawn
    (:meth:`load_rest`, called by the app), a background thread loads every table, without
    competing with that first render (after a rollup first, ``step_time`` comes in before the rest).  :meth:`loading` is true until the whole view
    replaced the first.  Every call returns the same view object until then (the app caches its
    figures per view).
    """

    def __init__(self, rec: Recording, *, staged: bool = True, row_budget: int | None = None) -> None:
        from replay.bounded import data_rows
        from replay.bounded import row_budget as budget_of

        self._rec = rec
        self._budget = budget_of(row_budget)
        #: beyond the row budget the whole view is the bounded one, and zooms seek the index
        self.bounded = data_rows(rec) > self._budget
        self._zooms: dict[tuple[int, int], StoreView] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.error = ""
        first = [t for t in FIRST_TABLES if t in rec.tables]
        rest = [t for t in rec.tables if t not in first]
        rows = rec.rows
        self._then: list[str] = []  # tables to load (and show) before the rest
        if (
            staged
            and first
            and all(rec.has_rollup(t) for t in first)
            and sum(rows[t] for t in first) > ROLLUP_FIRST_ROWS
        ):
            # a long recording: its first charts draw from the rollups, every row loads behind them
            self._view = self.first_view = rec.rollup_store(first).snapshot()
            self._then = first
        elif staged and first and rest:
            self._view = self.first_view = rec.store(first).snapshot()
        else:
            self._view = self.first_view = rec.bounded_view(self._budget)
            self._done.set()

    def load_rest(self) -> None:
        """Start loading the other tables in the background (once; no-op when everything is in)."""
        with self._lock:
            if self._thread is not None or self._done.is_set():
                return
            self._thread = threading.Thread(target=self._load_rest, name="traceml-replay-load-rest", daemon=True)
            self._thread.start()

    def _load_rest(self) -> None:
        try:
            if self._then and not self.bounded:  # the step charts' rows first: their exact statistics come sooner
                partial = self._rec.store(self._then).snapshot()
                with self._lock:
                    self._view = partial
            view = self._rec.bounded_view(self._budget)
        except TracemlError as exc:  # keep serving what was loaded; say why the rest is missing
            log.warning("could not load the rest of %s: %s", self._rec.path, exc)
            self.error = str(exc)
        else:
            with self._lock:
                self._view = view
        finally:
            self._done.set()

    def loading(self) -> bool:
        return not self._done.is_set()

    def zoomed(self, step_range: tuple[int, int]) -> StoreView | None:
        """A bounded recording's view with every row of the step tables in ``step_range``, read
        by seeking the index (the sample holds only every stride-th step); None when the recording
        fits the budget (its view has every row), while it loads, or when the range's segments hold
        more than a quarter of the budget (the sample is drawn then)."""
        if not self.bounded or not self._done.is_set():
            return None
        key = (int(step_range[0]), int(step_range[1]))
        with self._lock:
            hit = self._zooms.get(key)
            base = self._view
        if hit is not None:
            return hit
        rec = self._rec
        lo, hi = key
        # the rows the range selects, from the index: each overlapping segment's rows in proportion
        # to the share of its step span inside the range
        selected = 0.0
        for seg in rec.segments:
            if seg.step_min is None or seg.step_max is None or seg.step_max < lo or seg.step_min > hi:
                continue
            share = (min(hi, seg.step_max) - max(lo, seg.step_min) + 1) / (seg.step_max - seg.step_min + 1)
            selected += share * sum(seg.rows.values())
        if selected > self._budget // 4:
            return None
        tables = dict(base.tables)
        for table, schema in rec.schemas.items():
            if "step" not in schema.names or table not in rec.tables:
                continue
            for key_ in [k for k in tables if k[0] == table]:
                del tables[key_]
            for rank, cols in rec.columns(table, steps=(lo, hi)).items():
                tables[(table, rank)] = cols
        view = dataclasses.replace(base, tables=tables, digests={})
        with self._lock:
            self._zooms[key] = view
            while len(self._zooms) > ZOOM_CACHE:
                self._zooms.pop(next(iter(self._zooms)))
        return view

    def __call__(self) -> StoreView:
        with self._lock:
            return self._view

    def close(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


def recording_source(rec: Recording) -> Source:
    """A source over a recording, loaded whole before it returns."""
    return RecordingSource(rec, staged=False)


class FollowSource:
    """A source over a recording still being written: each call polls the file (:class:`replay.tail.Tail`,
    bounded by the row budget however long the file grows)."""

    def __init__(self, rec: Recording, *, row_budget: int | None = None) -> None:
        self._lock = threading.Lock()
        self._tail = Tail(rec, budget=row_budget)

    def __call__(self) -> StoreView:
        with self._lock:
            return self._tail.poll()


def build_dashboard(
    path: str | os.PathLike[str],
    compare: str | os.PathLike[str] | None = None,
    *,
    follow: bool = False,
    progress: bool | None = None,
    staged_load: bool = True,
    plotly_js: str | os.PathLike[str] | None = None,
) -> tuple[dash.Dash, Callable[[], None]]:
    """The Dash app over ``path`` (and ``compare``); returns ``(app, close)``.

    ``staged_load``: draw the step charts from ``step_time`` while the rest loads (see
    :class:`RecordingSource`); False loads everything first.  ``plotly_js``: see
    :func:`traceml.drivers.web.build_app` (default ``$TRACEML_PLOTLY_JS``).
    """
    from traceml.drivers.web import build_app

    recs: list[Recording] = []
    sources: list[RecordingSource] = []

    def close() -> None:
        for src in sources:
            src.close()
        for r in recs:
            r.close()

    try:
        main = open_recording(path, follow=follow, progress=progress)
        recs.append(main)
        loading = on_drawn = zoomed = None
        if follow:
            source: Source = FollowSource(main)
        else:
            staged = RecordingSource(main, staged=staged_load)
            sources.append(staged)
            source, loading, on_drawn = staged, staged.loading, staged.load_rest
            zoomed = staged.zoomed
        compare_source: Source | None = None
        if compare is not None:
            other = open_recording(compare, progress=progress)
            recs.append(other)
            compare_source = recording_source(other)
        app = build_app(
            source,
            live=follow,
            compare_source=compare_source,
            loading=loading,
            on_charts_drawn=on_drawn,
            plotly_js=plotly_js,
            zoomed=zoomed,
        )
    except BaseException:
        close()
        raise
    return app, close


def serve(
    path: str | os.PathLike[str],
    *,
    compare: str | os.PathLike[str] | None = None,
    follow: bool = False,
    host: str = "127.0.0.1",
    port: int = 8050,
    stop: threading.Event | None = None,
    announce: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> None:
    """``traceml replay --ui web``: serve the dashboard over ``path`` until Ctrl-C (or ``stop``)."""
    from traceml.drivers.web import listen, serve_app

    sock = listen(host, port)  # a busy port fails before the recording is loaded
    try:
        app, close = build_dashboard(path, compare, follow=follow, progress=progress)
    except BaseException:
        sock.close()
        raise
    try:
        serve_app(app, host=host, sock=sock, stop=stop, announce=announce, what=f"traceml dashboard for {path}")
    finally:
        close()
