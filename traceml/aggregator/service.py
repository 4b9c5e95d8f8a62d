"""The aggregator: one process per run that serves the ranks, keeps the live store, spools the
recording, drives the UI and closes the file with the summary when the training ends.  Nothing
here can stall the training (docs/internals.md, "Aggregator").
"""

from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from traceml._version import __version__
from traceml.aggregator.control import read_control
from traceml.aggregator.ingest import Ingest
from traceml.aggregator.lost import lost_lines, lost_ranks
from traceml.aggregator.spool import Spool, Writer
from traceml.closing import close_run, run_summary
from traceml.config import DEFAULT_MAX_FRAME_BYTES
from traceml.errors import ConfigError, TracemlError
from traceml.schema import STANDARD_TABLES
from traceml.store import ColumnStore, StoreView
from traceml.store.view import (
    META_EXPECTED_RANKS,
    META_RECORDING_BYTES,
    META_RECORDING_ERROR,
    META_RECORDING_PATH,
    META_RUN_NAME,
    META_START_NS,
    META_STATUS,
)
from traceml.transport import TelemetryServer

log = logging.getLogger("traceml.aggregator")

UI_CHOICES = ("terminal", "web", "none")
#: after the training exited, wait this long without news from any rank before closing
QUIET_S = 0.1
#: how often the main loop looks at its conditions when nothing wakes it
POLL_S = 0.05
#: notices and output lines waiting for stderr/stdout without a live view
MAX_QUEUED_NOTICES = 1000
#: seconds the end of the run waits for queued notices to be written
NOTICE_DRAIN_S = 2.0


def _summary_failed() -> None:
    log.exception("the run summary could not be built; the recording is closed without it")


@dataclass
class AggregatorOptions:
    host: str = "127.0.0.1"
    port: int = 0
    token: str = ""
    run_id: str = ""
    run_name: str = ""
    #: the recording path; None for a live-only run (--no-record)
    out: str | None = None
    ui: str = "none"
    web_host: str = "127.0.0.1"
    web_port: int = 8050
    expected_ranks: int = 1
    nnodes: int = 1
    capacity: int = 200_000
    #: seconds to wait for the ranks after the training exited
    finish_timeout_s: float = 10.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    start_ns: int = field(default_factory=time.time_ns)
    command: list[str] = field(default_factory=list)
    #: a listening socket handed over by the launcher (``traceml run`` binds before the ranks
    #: learn the port, so no other process can take it in between); None: bind host:port
    listen_sock: socket.socket | None = None
    #: send the run's metrics over OTLP/HTTP while it runs and at its end (None: don't)
    otlp_endpoint: str | None = None
    otlp_interval_s: float = 15.0

    def check(self) -> None:
        if self.ui not in UI_CHOICES:
            raise ConfigError(f"--ui {self.ui!r}: expected one of {', '.join(UI_CHOICES)}")
        if self.expected_ranks < 1:
            raise ConfigError(f"expected ranks = {self.expected_ranks}; expected at least 1")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"--capacity {self.capacity}: expected at least 1 row per rank and table")
        if not self.token:
            raise ConfigError("the aggregator needs the run's token (TRACEML_TOKEN); `traceml run` generates one")


def exit_status(exit_code: int | None, signal_name: str) -> str:
    if exit_code is None:
        return "unknown"
    if signal_name:
        return "interrupted"
    return "ok" if exit_code == 0 else "failed"


class _UI:
    """No live view: notices and output go to stderr/stdout from a thread of their own.

    ``notify`` is called from the server's I/O thread (through the log handler), so it only
    queues: a stderr nobody drains must never stall ingest or the spool.  When more than
    :data:`MAX_QUEUED_NOTICES` wait, new ones are counted and dropped.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue(MAX_QUEUED_NOTICES)
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def print_output(self, stream: str, text: str) -> None:
        self._put(stream, text)

    def notify(self, message: str) -> None:
        self._put("stderr", f"traceml: {message}\n")

    def _put(self, stream: str, text: str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="traceml-notices", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((stream, text))
        except queue.Full:
            self._dropped += 1

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            out = sys.stdout if item[0] == "stdout" else sys.stderr
            try:
                out.write(item[1])
                out.flush()
            except (OSError, ValueError):
                pass

    def stop(self, final_view: StoreView | None) -> None:
        thread = self._thread
        if thread is not None:
            # a stuck stderr is not worth more than NOTICE_DRAIN_S at the end
            last: list[tuple[str, str] | None] = [None]
            if self._dropped:
                last.insert(0, ("stderr", f"traceml: {self._dropped} notices were not shown (stderr was stuck)\n"))
            try:
                for item in last:
                    self._queue.put(item, timeout=NOTICE_DRAIN_S)
            except queue.Full:
                pass
            thread.join(NOTICE_DRAIN_S)
        if final_view is not None:
            from rich.console import Console

            from traceml.drivers.terminal import print_final

            sys.stdout.flush()
            print_final(final_view, Console(file=sys.stdout, highlight=False))


class _NotifyHandler(logging.Handler):
    """Routes warnings of the ``traceml`` loggers to the UI: above the live region in the
    terminal, else to stderr (prefixed ``traceml:``)."""

    def __init__(self, notify: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self._notify = notify

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._notify(record.getMessage())
        except Exception:
            self.handleError(record)


def _warm_up() -> None:
    try:
        import rich.console  # noqa: F401  (the summary screen)

        import traceml.diagnosis.summary
        import traceml.drivers.terminal  # noqa: F401
    except Exception:  # the end of the run imports them again and reports properly
        pass


class Aggregator:
    def __init__(self, opts: AggregatorOptions, open_writer: Callable[[], Writer] | None = None) -> None:
        opts.check()
        self.opts = opts
        self.store = ColumnStore(
            capacity=opts.capacity,
            meta={
                "run_id": opts.run_id,
                META_RUN_NAME: opts.run_name,
                META_START_NS: opts.start_ns,
                META_EXPECTED_RANKS: opts.expected_ranks,
                "world_size": opts.expected_ranks,
                META_STATUS: "running",
                META_RECORDING_PATH: opts.out or "",
                META_RECORDING_BYTES: 0,
                "host": socket.gethostname(),
            },
        )
        self.spool: Spool | None = None
        if opts.out is not None:
            self.spool = Spool(
                open_writer or self._open_tml_writer,
                opts.out,
                on_error=self._recording_failed,
                on_progress=lambda n: self.store.set_meta(**{META_RECORDING_BYTES: n}),
            )
        self.ingest = Ingest(self.store, self.spool)
        self.server = TelemetryServer(
            opts.host,
            opts.port,
            opts.token,
            self.ingest,
            run_id=opts.run_id or None,
            max_frame_bytes=opts.max_frame_bytes,
            name="traceml-aggregator-server",
            sock=opts.listen_sock,
        )
        self.ui: Any = _UI()
        self._log_handler: logging.Handler | None = None
        self._exited = threading.Event()
        self._stop = threading.Event()
        self._exit_info: dict[str, Any] | None = None
        self._exit_seen_ns = 0
        self._web: Any = None
        #: no control channel: the run is over once every expected rank finished or died
        self._standalone = True
        #: the control channel ended without an exit line
        self._cli_gone = False
        self.finished = threading.Event()
        self.otlp: Any = None

    # -- pieces --------------------------------------------------------------------------
    def _run_meta(self) -> dict[str, Any]:
        o = self.opts
        return {
            "run_id": o.run_id,
            "run_name": o.run_name,
            "start_ns": o.start_ns,
            "world_size": o.expected_ranks,
            "hosts": [socket.gethostname()],
            "command": list(o.command),
            "expected_ranks": o.expected_ranks,
            "nnodes": o.nnodes,
            "traceml_version": __version__,
        }

    def _open_tml_writer(self) -> Writer:
        from traceml.format import TmlWriter

        assert self.opts.out is not None
        Path(self.opts.out).parent.mkdir(parents=True, exist_ok=True)
        writer: Writer = TmlWriter(self.opts.out, run_meta=self._run_meta(), schemas=list(STANDARD_TABLES.values()))
        return writer

    def _recording_failed(self, reason: str) -> None:
        self.store.set_meta(**{META_RECORDING_ERROR: reason})
        self.ui.notify(f"recording stopped ({reason}); the live view and the training continue")

    def _start_ui(self) -> None:
        if self.opts.ui == "terminal":
            from traceml.drivers.terminal import TerminalDriver

            driver = TerminalDriver(self.store.snapshot)
            driver.start()
            self.ui = driver
        elif self.opts.ui == "web":
            try:
                from traceml.drivers.web import serve_live

                self._web = serve_live(self.store.snapshot, host=self.opts.web_host, port=self.opts.web_port)
            except (ImportError, TracemlError) as exc:
                # the recording matters more than the dashboard: say why and carry on without it
                self.ui.notify(f"live dashboard unavailable ({exc}); recording continues")
                return
            self.ui.notify(f"live dashboard on {self._web.url}")

    def start(self) -> None:
        """Spool, server, UI.  The server listens before this returns."""
        if self.spool is not None:
            self.spool.start()
        self.server.start()
        self._start_ui()
        # what the end of the run needs is imported while the training runs, not after it
        threading.Thread(target=_warm_up, name="traceml-warm-up", daemon=True).start()
        self._log_handler = _NotifyHandler(self.ui.notify)
        logging.getLogger("traceml").addHandler(self._log_handler)
        self._start_otlp()

    def _start_otlp(self) -> None:
        if self.opts.otlp_endpoint is None:
            return
        try:
            from traceml.exports.otlp import LivePusher

            self.otlp = LivePusher(
                lambda: run_summary(self.store.snapshot(), _summary_failed),
                self.opts.otlp_endpoint or None,
                interval_s=self.opts.otlp_interval_s,
            )
            self.otlp.start()
        except Exception as exc:  # fail-open: no OTLP export, the run goes on
            log.warning("no OTLP export for this run: %s", exc)
            self.otlp = None

    # -- control channel -----------------------------------------------------------------
    def on_output(self, stream: str, text: str) -> None:
        self.ui.print_output(stream, text)

    def on_exit(self, info: dict[str, Any] | None) -> None:
        """The training is over (``info`` from the CLI; None when the CLI went away)."""
        if self._exited.is_set():
            return
        self._exit_info = dict(info) if info is not None else None
        self._exit_seen_ns = time.monotonic_ns()
        self.store.set_meta(**{META_STATUS: "finishing"})
        self._exited.set()
        self.ingest.activity.set()

    def _on_control_end(self, info: dict[str, Any] | None) -> None:
        if info is not None:
            self.on_exit(info)
        else:
            # the CLI died without saying how the training ended: the training may well go on
            # (it has its own session), so serve it until its ranks are done and quiet
            self._cli_gone = True
            self.ingest.activity.set()

    def request_stop(self) -> None:
        """Finish now (SIGTERM/SIGINT to the aggregator): close the file with what is there."""
        self._stop.set()
        self.ingest.activity.set()

    def attach_control(self, stream: IO[bytes]) -> threading.Thread:
        self._standalone = False
        thread = threading.Thread(
            target=read_control,
            args=(stream, self.on_output, self._on_control_end),
            name="traceml-control",
            daemon=True,
        )
        thread.start()
        return thread

    # -- when to finish --------------------------------------------------------------------
    def _idle_s(self) -> float:
        """Seconds since the last hello, message or close, while no connection is open."""
        if self.ingest.open_connections or self.server.pending_connections:
            return 0.0
        return (time.time_ns() - self.ingest.last_activity_ns) / 1e9

    def _ranks_done(self) -> bool:
        """After the exit: no connection open and nothing heard for QUIET_S (a frame or a
        connection still in flight gets in), and with several nodes every expected rank done."""
        since_exit_s = (time.monotonic_ns() - self._exit_seen_ns) / 1e9
        if min(self._idle_s(), since_exit_s) < QUIET_S:
            return False
        if self.opts.nnodes > 1:
            # other nodes' ranks may still be running or flushing: wait for every expected rank
            return set(range(self.opts.expected_ranks)) <= self.ingest.done_ranks()
        return True

    def wait(self) -> None:
        """Block until the run is over by the rules in the module docstring."""
        expected = set(range(self.opts.expected_ranks))
        while not self._stop.is_set():
            if (self._standalone or self._cli_gone) and not self._exited.is_set():
                every_rank_done = expected <= self.ingest.done_ranks()
                idle_orphan = self._cli_gone and self._idle_s() > self.opts.finish_timeout_s
                if every_rank_done or idle_orphan:
                    self.on_exit(None)
            if self._exited.is_set():
                if self._ranks_done():
                    return
                waited_s = (time.monotonic_ns() - self._exit_seen_ns) / 1e9
                if waited_s > self.opts.finish_timeout_s:
                    pending = sorted(set(range(self.opts.expected_ranks)) - self.ingest.done_ranks())
                    log.warning(
                        "closing the recording %.0f s after the training exited; ranks %s had not finished",
                        waited_s,
                        pending,
                    )
                    return
            self.ingest.activity.wait(POLL_S)
            self.ingest.activity.clear()

    # -- the end -----------------------------------------------------------------------------
    def finalize(self) -> StoreView:
        """Stop serving, record exit status, rank table and summary, close the file."""
        self.server.stop()  # closes what is still open: on_close marks those ranks died
        now_ns = time.time_ns()
        info = self._exit_info or {}
        code = info.get("exit_code")
        signal_name = str(info.get("signal", "") or "")
        duration = info.get("duration_s")
        if not isinstance(duration, (int, float)):
            duration = (now_ns - self.opts.start_ns) / 1e9
        exit_attachment = {
            "exit_code": code,
            "status": exit_status(code, signal_name) if self._exit_info is not None else "unknown",
            "duration_s": round(float(duration), 3),
            "signal": signal_name,
        }
        view = self.store.snapshot()
        expected = set(range(self.opts.expected_ranks))
        ranks = [view.rank_info[r].to_dict() for r in sorted(view.rank_info)]
        ranks += [{"rank": r, "state": "unknown"} for r in sorted(expected - set(view.rank_info))]
        try:  # which ranks vanished, at which step and when (docs/cli.md, "Lost ranks")
            lost: dict[str, Any] | None = lost_ranks(view, self.opts.expected_ranks)
        except Exception:  # never costs the recording its close
            log.exception("the lost-ranks record could not be built")
            lost = None
        if lost is not None and not (lost["ranks"] or lost["never_connected"]):
            lost = None
        if lost is not None:
            for line in lost_lines(lost):
                log.warning("%s", line)
        documents: dict[str, Mapping[str, Any]] = {"exit": exit_attachment, "ranks": {"ranks": ranks}}
        if lost is not None:
            documents["lost"] = lost
        summary, closed = close_run(
            self.store,
            self.spool,
            documents,
            on_summary_error=_summary_failed,
        )
        if self.spool is not None:
            if not closed:
                log.warning("the recording thread did not finish closing %s in time", self.spool.path)
            self.store.set_meta(**{META_RECORDING_BYTES: self.spool.bytes_on_disk})
        if self.otlp is not None:
            self.otlp.stop(summary)
        return self.store.snapshot()

    def close_ui(self, final_view: StoreView | None) -> None:
        if self._log_handler is not None:
            logging.getLogger("traceml").removeHandler(self._log_handler)
            self._log_handler = None
        if self._web is not None:
            self._web.stop()
            self._web = None
        self.ui.stop(final_view)

    def run(self, control: IO[bytes] | None = None, on_started: Callable[[], None] | None = None) -> None:
        """Serve one run end to end: start, wait for its end, close the file, print the summary."""
        started = False
        try:
            self.start()
            started = True
            if on_started is not None:
                on_started()
            if control is not None:
                self.attach_control(control)
            self.wait()
        finally:
            view = self.finalize()
            self.close_ui(view if started else None)
            self.finished.set()
