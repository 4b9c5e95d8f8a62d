"""The sender thread: every ~0.5 s, the unsent rows of every table go to the rank's sinks as ONE batch.

Sinks: :class:`StreamSink` (aggregator) and :class:`FileSink` (local ``.tml``).  A failing sink is logged
once and dropped; training never waits on any of this.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from traceml.closing import close_run
from traceml.errors import ConfigError
from traceml.runtime._failopen import disable_piece, log_once
from traceml.schema import TableSchema, rows_to_columns
from traceml.store import BoundedTable, ColumnStore
from traceml.transport import (
    RankIdentity,
    TelemetryClient,
    attachment,
    batch,
    encode_columns,
    heartbeat,
    rank_finished,
)

Columns = dict[str, Any]


class Sink(Protocol):
    name: str

    def write(self, tables: Mapping[str, tuple[TableSchema, Columns]], drops: Mapping[str, int]) -> None: ...
    def attach(self, name: str, data: Mapping[str, Any]) -> None: ...
    def idle(self, now: float) -> None: ...
    def finish(self, status: str, drops: Mapping[str, int], drain_timeout_s: float) -> None: ...


class StreamSink:
    """Batches, attachments, heartbeats and rank_finished over a :class:`TelemetryClient`.

    The client adds the rows it dropped itself to each message's ``drops``; we report the
    rows our bounded tables evicted before the sender took them.
    """

    name = "aggregator"

    def __init__(self, client: TelemetryClient, heartbeat_s: float = 1.0) -> None:
        self.client = client
        self.heartbeat_s = heartbeat_s
        self.seq = 0
        self.rows_sent = 0
        self._last_send = 0.0

    def write(self, tables: Mapping[str, tuple[TableSchema, Columns]], drops: Mapping[str, int]) -> None:
        wire = {name: encode_columns(schema, cols) for name, (schema, cols) in tables.items()}
        self.seq += 1
        self.client.send(batch(self.seq, wire, drops))
        self.rows_sent += sum(w["n"] for w in wire.values())
        self._last_send = time.monotonic()

    def attach(self, name: str, data: Mapping[str, Any]) -> None:
        self.client.send(attachment(name, data))
        self._last_send = time.monotonic()

    def idle(self, now: float) -> None:
        if now - self._last_send >= self.heartbeat_s:
            self.client.send(heartbeat())
            self._last_send = now
        elif self.client.pending:
            self.client.flush(0.05)  # reconnect and retry what is buffered

    def finish(self, status: str, drops: Mapping[str, int], drain_timeout_s: float) -> None:
        self.client.send(rank_finished(status, drops))
        self.client.close(drain_timeout_s=drain_timeout_s)


class FileSink:
    """The rank records its own ``.tml`` (one writer, used only by the sender thread).

    A bounded :class:`ColumnStore` mirrors what was written so that, at the end, the file
    is closed by the same :func:`traceml.closing.close_run` as one written by the aggregator:
    ``exit``, ``ranks`` and the diagnosis ``summary`` (replay and reports treat both alike).
    """

    name = "file"

    def __init__(self, writer: Any, identity: RankIdentity, run_meta: Mapping[str, Any], started_ns: int) -> None:
        self.writer = writer
        self.identity = identity
        self.started_ns = started_ns
        self.store = ColumnStore(capacity=200_000, meta=run_meta)
        self.store.update_rank(
            identity.rank,
            local_rank=identity.local_rank,
            node_rank=identity.node_rank,
            host=identity.host,
            pid=identity.pid,
            state="connected",
        )

    def write(self, tables: Mapping[str, tuple[TableSchema, Columns]], drops: Mapping[str, int]) -> None:
        rank = self.identity.rank
        for name, (schema, cols) in tables.items():
            try:
                self.writer.append(rank, name, cols)
            except ConfigError as exc:  # rows the writer refuses (a name outside traceml.names): only they are lost
                log_once(f"file-table-{name[:40]}", "traceml: the recording left out rows: %s", exc)
                continue
            self.store.append(rank, name, cols, schema)
        self.writer.tick()

    def attach(self, name: str, data: Mapping[str, Any]) -> None:
        self.writer.attach(name, dict(data))
        self.store.attach(name, dict(data))

    def idle(self, now: float) -> None:
        self.writer.tick()

    def finish(self, status: str, drops: Mapping[str, int], drain_timeout_s: float) -> None:
        now = time.time_ns()
        info = self.store.update_rank(
            self.identity.rank, state="finished", exit_status=status, last_seen_ns=now, drops=dict(drops)
        )
        exit_doc = {
            "exit_code": None,  # a rank does not know its own exit code; status says how it ended
            "status": status,
            "duration_s": round((now - self.started_ns) / 1e9, 3),
            "signal": "",
        }
        ranks_doc = {"ranks": [info.to_dict()]}
        close_run(
            self.store,
            self.writer,
            {"exit": exit_doc, "ranks": ranks_doc},
            on_summary_error=lambda: disable_piece("file-summary", "the run summary of the local recording"),
        )


class Sender:
    """Owns the sender thread.  ``resolve`` (the CUDA event resolver) runs before each take."""

    def __init__(
        self,
        tables: Mapping[str, BoundedTable],
        sinks: Sequence[Sink],
        period_s: float = 0.5,
        resolve: Callable[[], None] | None = None,
        name: str = "traceml-sender",
        max_capacity: Mapping[str, int] | None = None,
    ) -> None:
        self.tables = dict(tables)
        #: the most rows each table may grow to (absent: it keeps its capacity)
        self.max_capacity = dict(max_capacity or {})
        self._wake = threading.Event()
        for table in self.tables.values():
            table.on_high_water = self._wake.set
        self.sinks: list[Sink] = list(sinks)
        self.period_s = period_s
        self.resolve = resolve
        self.flushes = 0
        self.rows_taken = 0
        self._attachments: deque[tuple[str, dict[str, Any]]] = deque()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # flush() from the thread and from close() never interleave
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def queue_attachment(self, name: str, data: Mapping[str, Any]) -> None:
        """Send ``data`` as the attachment ``name`` with the next flush (any thread)."""
        self._attachments.append((name, dict(data)))

    def drops(self) -> dict[str, int]:
        return {name: t.lost for name, t in self.tables.items() if t.lost}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.period_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.flush()

    def flush(self) -> int:
        """Take every table's unsent rows and hand them to every sink; returns the rows taken."""
        with self._lock:
            if self.resolve is not None:
                try:
                    self.resolve()
                except Exception:
                    self.resolve = None
                    disable_piece("gpu-resolve", "resolving CUDA events")
            tables: dict[str, tuple[TableSchema, Columns]] = {}
            n = 0
            for name, table in self.tables.items():
                take_tables = getattr(table, "take_tables", None)
                if take_tables is not None:  # a table whose raw rows make several tables (StepRows)
                    got = take_tables()
                    taken = len(next(iter(got[name][1].values()))) if got else 0
                    tables.update(got)
                else:
                    rows = table.take_unsent()
                    taken = len(rows)
                    if rows:
                        tables[name] = (table.schema, rows_to_columns(table.schema, rows))
                if taken:
                    n += taken
                    if 2 * taken >= table.capacity:  # half full between two flushes: make room for bursts
                        table.grow(min(2 * table.capacity, self.max_capacity.get(name, table.capacity)))
            drops = self.drops()
            attachments = []
            while self._attachments:
                attachments.append(self._attachments.popleft())
            for sink in list(self.sinks):
                try:
                    for aname, data in attachments:
                        sink.attach(aname, data)
                    if tables:
                        sink.write(tables, drops)
                    else:
                        sink.idle(time.monotonic())
                except Exception:
                    self.sinks.remove(sink)
                    disable_piece(f"sink-{sink.name}", f"sending telemetry to the {sink.name} sink")
            self.flushes += 1
            self.rows_taken += n
            return n

    def close(self, status: str, drain_timeout_s: float = 2.0, join_timeout_s: float = 5.0) -> None:
        """Stop the thread, flush what is left, finish every sink (rank_finished, close)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(join_timeout_s)
        self.flush()
        drops = self.drops()
        for sink in list(self.sinks):
            try:
                sink.finish(status, drops, drain_timeout_s)
            except Exception:
                disable_piece(f"sink-{sink.name}-finish", f"closing the {sink.name} sink")
        self.sinks.clear()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
