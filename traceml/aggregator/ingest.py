"""Ingest: the TelemetryServer's handler.  Each rank's batches are decoded, name-checked, appended
to the live :class:`ColumnStore` and spooled in one call; a bad batch is that rank's alone, counted
and skipped (docs/internals.md, "Aggregator").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from traceml import names
from traceml.errors import MalformedFrameError, TracemlError
from traceml.schema import STANDARD_TABLES, STR, TableSchema
from traceml.store import ColumnStore
from traceml.transport import ATTACHMENT, BATCH, HEARTBEAT, RANK_FINISHED, Connection, RankIdentity, decode_columns

log = logging.getLogger("traceml.aggregator")

#: attachment names the aggregator writes itself; a rank cannot overwrite them
RESERVED_ATTACHMENTS = frozenset({"exit", "ranks", "summary"})


class SpoolSink(Protocol):
    def append(self, rank: int, table: str, columns: Any, schema: TableSchema | None = None) -> None: ...
    def attach(self, name: str, data: Any) -> None: ...


def conn_identity(conn: Connection) -> RankIdentity:
    """The rank identity a server connection was admitted with (its validated hello)."""
    if conn.identity is None:
        raise TypeError(f"{conn.describe()} has not said hello; the server hands over admitted connections only")
    return conn.identity


@dataclass
class IngestStats:
    batches: int = 0
    rows: int = 0
    bad_batches: int = 0
    connections: int = 0
    last_error: str = ""
    rows_by_rank: dict[int, int] = field(default_factory=dict)


class Ingest:
    """Server handler: hello / messages / close -> live store + spool."""

    def __init__(
        self,
        store: ColumnStore,
        spool: SpoolSink | None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.store = store
        self.spool = spool
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        #: rank -> the connection currently speaking for it
        self._current: dict[int, Connection] = {}
        self._finished: set[int] = set()
        self._seen: set[int] = set()
        self._open = 0
        self.stats = IngestStats()
        #: custom (non-standard) tables: the schema of their first batch
        self._custom_schemas: dict[str, TableSchema] = {}
        #: set on every hello, message and close (the lifecycle waits on it)
        self.activity = threading.Event()
        self.last_activity_ns = clock_ns()

    # -- the server's handler interface ----------------------------------------------------
    def on_hello(self, conn: Connection) -> None:
        ident = conn_identity(conn)
        now = self._clock_ns()
        with self._lock:
            self._current[ident.rank] = conn
            self._seen.add(ident.rank)
            self._open += 1
            self.stats.connections += 1
            self._finished.discard(ident.rank)
        self.store.update_rank(
            ident.rank,
            local_rank=ident.local_rank,
            node_rank=ident.node_rank,
            host=ident.host,
            pid=ident.pid,
            state="connected",
            exit_status="",
            last_seen_ns=now,
            died_ns=0,
        )
        self._touch(now)

    def on_message(self, conn: Connection, msg: dict[str, Any]) -> None:
        rank = conn_identity(conn).rank
        kind = msg.get("kind")
        now = self._clock_ns()
        if kind == BATCH:
            self._batch(rank, msg)
            self.store.update_rank(rank, last_seen_ns=now)
        elif kind == HEARTBEAT:
            self.store.update_rank(rank, last_seen_ns=now)
        elif kind == RANK_FINISHED:
            status = msg.get("status") if msg.get("status") in ("ok", "failed") else "failed"
            with self._lock:
                self._finished.add(rank)
            changes: dict[str, Any] = {"state": "finished", "exit_status": status, "last_seen_ns": now}
            drops = self._drops(msg)
            if drops is not None:
                changes["drops"] = drops
            self.store.update_rank(rank, **changes)
        elif kind == ATTACHMENT:
            self._attachment(rank, msg)
        self._touch(now)

    def on_close(self, conn: Connection, reason: str = "") -> None:
        try:
            rank = conn_identity(conn).rank
        except TypeError:
            return  # never said hello: nothing was registered
        now = self._clock_ns()
        with self._lock:
            self._open = max(0, self._open - 1)
            current = self._current.get(rank) is conn
            if current:
                del self._current[rank]
            finished = rank in self._finished
        if current and not finished:
            self.store.update_rank(rank, state="died", died_ns=now)
            log.warning("rank %d disconnected without finishing (%s)", rank, reason or "connection closed")
        self._touch(now)

    # -- queries for the lifecycle ---------------------------------------------------------
    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def seen_ranks(self) -> set[int]:
        """Ranks that said hello at least once."""
        with self._lock:
            return set(self._seen)

    def done_ranks(self) -> set[int]:
        """Ranks that finished, or whose connection is gone (died)."""
        with self._lock:
            return self._seen - set(self._current) | self._finished

    # -- helpers -----------------------------------------------------------------------------
    def _touch(self, now: int) -> None:
        self.last_activity_ns = now
        self.activity.set()

    def _drops(self, msg: dict[str, Any]) -> dict[str, int] | None:
        drops = msg.get("drops")
        if not isinstance(drops, dict) or not drops:
            return None
        # keys are table names from the wire: ones outside the name grammar are dropped
        return {str(k): int(v) for k, v in drops.items() if isinstance(v, int) and names.name_problem(k) is None}

    def _batch(self, rank: int, msg: dict[str, Any]) -> None:
        tables = msg.get("tables")
        if not isinstance(tables, dict):
            self._bad(rank, f"batch without a tables map ({type(tables).__name__})")
            return
        rows = 0
        for name, wire in tables.items():
            table = str(name)
            problem = names.name_problem(name, "table") or names.reserved_problem(table)
            if problem is not None:
                self._bad(rank, problem)
                continue
            try:
                schema, cols = decode_columns(wire, table)
                _check_names(schema, cols)
                expected = self._table_schema(table, schema)
                if set(schema.columns) != set(expected.columns):
                    # the writer would refuse it and stop the recording for every rank
                    raise MalformedFrameError(
                        f"table {table!r} arrived with columns {_columns(schema)}; this run's {table!r} has "
                        f"{_columns(expected)} (a rank of another traceml version, or a custom table redefined)"
                    )
                n = self.store.append(rank, table, cols, expected)
            except TracemlError as exc:
                self._bad(rank, str(exc))
                continue
            if n and self.spool is not None:
                self.spool.append(rank, table, cols, None if table in STANDARD_TABLES else schema)
            rows += n
        drops = self._drops(msg)
        if drops is not None:
            self.store.update_rank(rank, drops=drops)
        with self._lock:
            self.stats.batches += 1
            self.stats.rows += rows
            self.stats.rows_by_rank[rank] = self.stats.rows_by_rank.get(rank, 0) + rows

    def _table_schema(self, table: str, schema: TableSchema) -> TableSchema:
        """The schema every batch of ``table`` must have: the standard one, or the first seen."""
        standard = STANDARD_TABLES.get(table)
        if standard is not None:
            return standard
        with self._lock:
            return self._custom_schemas.setdefault(table, schema)

    def _attachment(self, rank: int, msg: dict[str, Any]) -> None:
        name, data = msg.get("name"), msg.get("data")
        if not isinstance(name, str) or not isinstance(data, dict):
            self._bad(rank, "attachment without a str name and a map")
            return
        if name in RESERVED_ATTACHMENTS or not name.endswith(f"/rank{rank}"):
            name = f"{name}/rank{rank}"
        problem = names.name_problem(name, "attachment")  # the name it would be stored under
        if problem is not None:
            self._bad(rank, problem)
            return
        self.store.attach(name, data)
        if self.spool is not None:
            self.spool.attach(name, data)

    def _bad(self, rank: int, why: str) -> None:
        with self._lock:
            self.stats.bad_batches += 1
            first = self.stats.bad_batches == 1
            self.stats.last_error = f"rank {rank}: {why}"
        if first:
            log.warning("skipped a malformed batch from rank %d: %s", rank, why)


def _check_names(schema: TableSchema, cols: dict[str, Any]) -> None:
    """Raise MalformedFrameError unless every column name and str value of a decoded table is valid."""
    for column in schema.columns:
        problem = names.column_problem(column.name)
        if problem is None and column.dtype == STR:
            problem = names.labels_problem(cols[column.name], f"column {schema.name}.{column.name}", names.MAX_ARG)
        if problem is not None:
            raise MalformedFrameError(f"table {names.shown(schema.name)}: {problem}")


def _columns(schema: TableSchema) -> str:
    return ", ".join(f"{c.name}:{c.dtype}" for c in schema.columns)[:200]
