"""A consumer that cannot keep up never slows the spool or the ranks.

At the aggregator-module level, with a real TelemetryServer on 127.0.0.1 and a real recording:
the terminal the live view draws on stops accepting bytes (a paused terminal, Ctrl-S), a thread
keeps taking snapshots and building the live view model slowly, and browsers open the live
dashboard and never finish their requests.  Meanwhile a rank streams steps, a peer with a
wrong token is refused (a warning for the stuck UI) and the training prints thousands of lines.
Every row still reaches the recording while the terminal is stuck, and the rank's client never
has to drop or wait.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, cast

import pytest
from rich.console import Console

from traceml.aggregator.service import Aggregator, AggregatorOptions
from traceml.drivers.terminal import TerminalDriver
from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, encode_frame, hello, rank_finished
from traceml.views import live_model

TOKEN = "slow-token"
RUN_ID = "slow-run"
BATCHES = 60
ROWS_PER_BATCH = 200
TOTAL = BATCHES * ROWS_PER_BATCH
#: how long the test waits for rows that should arrive at once (a deadline, not a measurement)
DEADLINE_S = 60


class StuckFile(io.TextIOBase):
    """A terminal that stops taking bytes once ``stick()`` is called, until ``release()``."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.blocked_writes = 0
        self.chars = 0

    def stick(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def write(self, s: str) -> int:
        if not self._open.is_set():
            self.blocked_writes += 1
            self._open.wait()
        self.chars += len(s)
        return len(s)

    def flush(self) -> None:
        self._open.wait()

    def isatty(self) -> bool:
        return True


def ident() -> RankIdentity:
    return RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, host="h", pid=os.getpid())


def stream_steps(port: int) -> TelemetryClient:
    client = TelemetryClient("127.0.0.1", port, hello(RUN_ID, TOKEN, ident()), buffer_messages=BATCHES + 10)
    for b in range(BATCHES):
        start = b * ROWS_PER_BATCH
        rows = [(s, 10**18 + s, 0, 900, *([100] * len(PHASES))) for s in range(start, start + ROWS_PER_BATCH)]
        client.send(batch(b + 1, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}))
    return client


def refused_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(encode_frame(hello(RUN_ID, "wrong", ident())))
        s.settimeout(10)
        assert s.recv(1) == b""


def rows_on_disk(path: str | Path | None) -> int:
    assert path is not None
    try:
        with open_recording(path, follow=True) as rec:
            return len(rec.read_table("step_time").get(0, {}).get("step", ()))
    except Exception:
        return 0


def wait_until(what: str, cond: Any) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def make_aggregator(tmp_path: Path) -> Aggregator:
    opts = AggregatorOptions(
        token=TOKEN, run_id=RUN_ID, out=str(tmp_path / "run.tml"), expected_ranks=1, finish_timeout_s=5
    )
    return Aggregator(opts)


def finish(agg: Aggregator, client: TelemetryClient) -> None:
    client.send(rank_finished("ok"))
    client.close(drain_timeout_s=20)
    agg.request_stop()


def test_a_stuck_terminal_and_slow_viewers_do_not_slow_the_spool(tmp_path: Path) -> None:
    agg = make_aggregator(tmp_path)
    terminal = StuckFile()
    driver = TerminalDriver(
        agg.store.snapshot,
        console=Console(file=cast(IO[str], terminal), force_terminal=True, width=100),
        refresh_s=0.05,
    )
    agg.ui = driver
    driver.start()
    runner = threading.Thread(target=agg.run, name="aggregator", daemon=True)
    stop_viewers = threading.Event()
    snapshots = {"n": 0}

    def slow_viewer() -> None:  # a consumer that builds the view model and takes its time
        while not stop_viewers.is_set():
            live_model(agg.store.snapshot())
            snapshots["n"] += 1
            stop_viewers.wait(0.3)

    viewer = threading.Thread(target=slow_viewer, name="slow-viewer", daemon=True)
    from traceml.drivers.web import serve_live

    web = serve_live(agg.store.snapshot, port=0)
    browsers: list[socket.socket] = []
    client: TelemetryClient | None = None
    try:
        runner.start()
        wait_until("the aggregator listens", lambda: agg.server.port > 0)
        viewer.start()
        for _ in range(8):  # browsers that send half a request and never read
            b = socket.create_connection(("127.0.0.1", web.port), timeout=5)
            b.sendall(b"GET /_dash-layout HTTP/1.1\r\nHost: x\r\n")
            browsers.append(b)
        wait_until("the live view drew once", lambda: driver.refreshes > 0)
        terminal.stick()

        def print_lines() -> None:  # the training is chatty while the terminal is stuck
            for i in range(5000):
                agg.on_output("stdout", f"training line {i}\n")

        printer = threading.Thread(target=print_lines, name="printer", daemon=True)
        printer.start()
        refused_once(agg.server.port)
        client = stream_steps(agg.server.port)
        assert client.flush(timeout_s=DEADLINE_S), "the rank's client had to wait for the aggregator"
        wait_until(
            f"{TOTAL} rows in the recording while the terminal is stuck", lambda: rows_on_disk(agg.opts.out) >= TOTAL
        )
        printer.join(DEADLINE_S)
        assert not printer.is_alive(), "printing training output blocked on the stuck terminal"
        assert terminal.blocked_writes > 0, "the terminal was really stuck"
        assert snapshots["n"] > 0
        assert client.dropped_messages == 0
    finally:
        stop_viewers.set()
        terminal.release()
        for b in browsers:
            b.close()
        if client is not None:
            finish(agg, client)
        else:
            agg.request_stop()
        runner.join(DEADLINE_S)
        viewer.join(10)
        web.stop()
    assert agg.finished.is_set()
    assert agg.opts.out is not None
    rec = open_recording(agg.opts.out)
    assert rec.integrity["status"] == "complete"
    assert rec.read_table("step_time")[0]["step"].tolist() == list(range(TOTAL))


def test_a_stuck_stderr_without_a_live_view_does_not_slow_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agg = make_aggregator(tmp_path)  # --ui none: notices go to stderr
    stderr = StuckFile()
    runner = threading.Thread(target=agg.run, name="aggregator", daemon=True)
    client: TelemetryClient | None = None
    try:
        monkeypatch.setattr(sys, "stderr", stderr)
        runner.start()
        wait_until("the aggregator listens", lambda: agg.server.port > 0)
        stderr.stick()
        with socket.create_connection(("127.0.0.1", agg.server.port), timeout=10) as bad:  # warned about on stderr
            bad.sendall(encode_frame(hello(RUN_ID, "wrong", ident())))
        client = stream_steps(agg.server.port)
        assert client.flush(timeout_s=DEADLINE_S), "the rank's client had to wait for the aggregator"
        wait_until(f"{TOTAL} rows in the recording while stderr is stuck", lambda: rows_on_disk(agg.opts.out) >= TOTAL)
        wait_until("the refusal notice reached the stuck stderr", lambda: stderr.blocked_writes > 0)
        assert client.dropped_messages == 0
    finally:
        stderr.release()
        if client is not None:
            finish(agg, client)
        else:
            agg.request_stop()
        runner.join(DEADLINE_S)
        monkeypatch.undo()
