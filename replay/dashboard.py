"""The post-mortem dashboard: the live Dash app (``traceml.drivers.web``) mounted over recordings.

A recording is loaded once into the same StoreView the aggregator fills, and the app's source
hands that view back (its figures are then cached per view).  ``compare`` overlays a second
recording as "B".  ``follow`` tails a file still being written: each refresh polls it for new
records (under a lock: a reader is single-threaded) and the app runs in live mode.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from replay.engine import META_RECORDING_BYTES, META_STATUS, Recording
from replay.engine import open as open_recording
from replay.player import apply_batches
from traceml.store import StoreView

if TYPE_CHECKING:
    import dash

Source = Callable[[], StoreView]


def recording_source(rec: Recording) -> Source:
    """A source over a finished (or crashed) recording: loaded once, the same view every call."""
    view = rec.view()
    return lambda: view


class FollowSource:
    """A source over a recording still being written: each call polls the file for new rows."""

    def __init__(self, rec: Recording) -> None:
        self._rec = rec
        self._lock = threading.Lock()
        self._store = rec.store()
        self._view = self._store.snapshot()

    def __call__(self) -> StoreView:
        with self._lock:
            if self._rec.finished:
                return self._view
            batches = self._rec.poll()
            meta = self._rec.meta
            apply_batches(self._rec, self._store, batches)
            if self._rec.finished:
                for info in self._rec.rank_infos().values():
                    self._store.set_rank(info)
                for name, data in self._rec.attachments.items():
                    self._store.attach(name, data)
            self._store.set_meta(**{META_STATUS: meta[META_STATUS], META_RECORDING_BYTES: meta[META_RECORDING_BYTES]})
            self._store.set_integrity(self._rec.integrity)
            self._view = self._store.snapshot()
            return self._view


def build_dashboard(
    path: str | os.PathLike[str],
    compare: str | os.PathLike[str] | None = None,
    *,
    follow: bool = False,
    progress: bool | None = None,
) -> tuple[dash.Dash, Callable[[], None]]:
    """The Dash app over ``path`` (and ``compare``); returns ``(app, close)``."""
    from traceml.drivers.web import build_app

    recs: list[Recording] = []
    try:
        main = open_recording(path, follow=follow, progress=progress)
        recs.append(main)
        source: Source = FollowSource(main) if follow else recording_source(main)
        compare_source: Source | None = None
        if compare is not None:
            other = open_recording(compare, progress=progress)
            recs.append(other)
            compare_source = recording_source(other)
        app = build_app(source, live=follow, compare_source=compare_source)
    except BaseException:
        for r in recs:
            r.close()
        raise

    def close() -> None:
        for r in recs:
            r.close()

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
    import sys

    from traceml.drivers.web import WebServer, is_loopback, listen

    say = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sock = listen(host, port)  # a busy port fails before the recording is loaded
    try:
        app, close = build_dashboard(path, compare, follow=follow, progress=progress)
    except BaseException:
        sock.close()
        raise
    try:
        server = WebServer(app, sock=sock)
        if not is_loopback(host):
            say(f"warning: the dashboard has no authentication and is reachable on {host}:{server.port}")
        say(f"traceml dashboard for {path}: {server.url}  (Ctrl-C to stop)")
        if stop is None:
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
        else:
            server.start()
            try:
                stop.wait()
            finally:
                server.stop()
    finally:
        close()
