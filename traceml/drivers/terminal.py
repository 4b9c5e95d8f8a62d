"""Terminal driver: owns the Rich ``Live`` region, its clock and the console.

Redraws at most ~10 times a second however chatty the training; beyond :data:`MAX_PENDING_LINES` the
oldest waiting lines are skipped and counted (they are in the run's logs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from traceml.config import ENV_RANKS
from traceml.diagnosis.live import live_verdict
from traceml.errors import ConfigError
from traceml.renderers.terminal import render_final, render_live
from traceml.store import StoreView
from traceml.views import DEFAULT_WINDOW_STEPS, final_model, live_model
from traceml.views.spread import filter_ranks, parse_rank_filter

log = logging.getLogger("traceml.aggregator")

#: seconds between dashboard refreshes (the driver's clock)
REFRESH_S = 0.5
#: seconds between output flushes when training prints
OUTPUT_FLUSH_S = 0.1
#: the live verdict is recomputed at most this often (seconds)
VERDICT_EVERY_S = 2.0
MAX_PENDING_LINES = 2000


def print_final(view: StoreView, console: Console) -> None:
    """Print the end-of-run summary screen for ``view``."""
    console.print(render_final(final_model(view)))


def _rank_filter_from_env() -> frozenset[int] | None:
    spec = os.environ.get(ENV_RANKS, "").strip()
    if not spec:
        return None
    try:
        return parse_rank_filter(spec)
    except ConfigError as exc:  # the live view shows every rank rather than fail
        log.warning("%s=%s ignored: %s", ENV_RANKS, spec[:80], exc)
        return None


class TerminalDriver:
    """Live dashboard over ``snapshot``; thread-safe ``print_output`` / ``notify``."""

    def __init__(
        self,
        snapshot: Callable[[], StoreView],
        console: Console | None = None,
        refresh_s: float = REFRESH_S,
        window: int = DEFAULT_WINDOW_STEPS,
        rank_filter: frozenset[int] | None = None,
    ) -> None:
        self._snapshot = snapshot
        #: ranks shown in the rank table (None: all); default from TRACEML_RANKS
        self.rank_filter = rank_filter if rank_filter is not None else _rank_filter_from_env()
        self.console = console or Console()
        self._refresh_s = refresh_s
        self._window = window
        self._pending: deque[Text] = deque()
        self._skipped = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._live: Live | None = None
        self._thread: threading.Thread | None = None
        self._render_failed = False
        self._verdict_at = -1e9
        self._verdict_now: tuple[str, str, str] = ("", "", "")
        self._verdict_failed = False
        self.refreshes = 0

    # -- called from other threads ---------------------------------------------------------
    def print_output(self, stream: str, text: str) -> None:
        """Queue a chunk of training output (one or more lines) to print above the region."""
        self._enqueue(Text.from_ansi(text.rstrip("\n")))

    def notify(self, message: str) -> None:
        """Queue one traceml notice (styled, prefixed) to print above the region."""
        self._enqueue(Text(f"traceml: {message}", style="bold yellow"))

    def _enqueue(self, line: Text) -> None:
        with self._lock:
            self._pending.append(line)
            while len(self._pending) > MAX_PENDING_LINES:
                self._pending.popleft()
                self._skipped += 1
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._live = Live(
            self._render(),
            console=self.console,
            screen=False,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start(refresh=True)
        self._thread = threading.Thread(target=self._loop, name="traceml-terminal", daemon=True)
        self._thread.start()

    def stop(self, final_view: StoreView | None = None) -> None:
        """Flush pending output, remove the live region, print the summary for ``final_view``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self._flush_output()
        if self._live is not None:
            self._live.stop()
            self._live = None
        if final_view is not None:
            print_final(final_view, self.console)

    # -- the driver's clock ------------------------------------------------------------------
    def _render(self) -> RenderableType:
        try:
            view = self._snapshot()
            model = live_model(view, self._window)
            model = dataclasses.replace(model, verdict=self._verdict(view))
            if self.rank_filter is not None:
                model = filter_ranks(model, self.rank_filter)
            return render_live(model)
        except Exception as exc:  # a drawing bug must not take the aggregator down
            if not self._render_failed:
                self._render_failed = True
                log.exception("live view failed to render")
            return Text(f"traceml: live view unavailable ({exc})", style="red")

    def _verdict(self, view: StoreView) -> tuple[str, str, str]:
        """The live verdict, recomputed at most every VERDICT_EVERY_S (a diagnosis reads every rank)."""
        now = time.monotonic()
        if now - self._verdict_at >= VERDICT_EVERY_S:
            self._verdict_at = now
            try:
                f = live_verdict(view)
                self._verdict_now = ("", "", "") if f is None else (f.kind, f.severity, f.summary)
            except Exception:
                if not self._verdict_failed:
                    self._verdict_failed = True
                    log.exception("live verdict failed")
                self._verdict_now = ("", "", "")
        return self._verdict_now

    def _loop(self) -> None:
        assert self._live is not None
        live = self._live
        next_refresh = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_refresh:
                live.update(self._render(), refresh=True)
                self.refreshes += 1
                next_refresh = now + self._refresh_s
            self._wake.wait(max(0.0, min(next_refresh - time.monotonic(), self._refresh_s)))
            if self._stop.is_set():
                break
            if self._wake.is_set():
                self._wake.clear()
                self._flush_output()
                self._stop.wait(OUTPUT_FLUSH_S)  # batch the next lines instead of one re-draw per line

    def _flush_output(self) -> None:
        with self._lock:
            lines = list(self._pending)
            self._pending.clear()
            skipped, self._skipped = self._skipped, 0
        if not lines and not skipped:
            return
        out = Text()
        if skipped:
            out.append(f"traceml: {skipped} output lines not shown here (see stdout.log / stderr.log)\n", style="dim")
        for i, line in enumerate(lines):
            if i:
                out.append("\n")
            out.append_text(line)
        self.console.print(out, soft_wrap=True, highlight=False, markup=False, emoji=False)
