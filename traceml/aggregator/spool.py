"""The spool: every batch the aggregator receives goes to the ``.tml`` file as it arrives.

One dedicated thread owns the :class:`~traceml.format.TmlWriter`; the ingest path only puts
items on a bounded queue (a slow disk pushes back on ingest, never on the live view, and a slow
terminal never touches the spool).  The thread calls ``writer.tick()`` about every 0.2 s so
segments close on time.  A writer error (disk full, unwritable path) is reported once through
``on_error`` (with the reason, e.g. ``"writing run.tml: [Errno 28] No space left on device"``);
from then on the spool discards what it is given, and the live view and training
carry on.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from traceml.schema import TableSchema

#: how often the spool thread calls ``writer.tick()`` and refreshes the byte count
TICK_S = 0.2
#: queued items before ``append`` blocks the caller (back-pressure on ingest)
DEFAULT_MAX_QUEUED = 8192


class Writer(Protocol):
    """What the spool needs of a recording writer (``traceml.format.TmlWriter``)."""

    def append(self, rank: int, table: str, columns: Mapping[str, Any]) -> Any: ...
    def attach(self, name: str, data: Any) -> Any: ...
    def add_schema(self, schema: TableSchema) -> Any: ...
    def tick(self) -> Any: ...
    def close(self, summary: Any = None) -> Any: ...


_APPEND = 0
_ATTACH = 1
_SCHEMA = 2
_CLOSE = 3


class Spool:
    """A writer behind a queue and a thread.  ``append``/``attach`` never raise."""

    def __init__(
        self,
        open_writer: Callable[[], Writer],
        path: str,
        on_error: Callable[[str], None],
        on_progress: Callable[[int], None] | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        tick_s: float = TICK_S,
    ) -> None:
        self.path = path
        self._open_writer = open_writer
        self._on_error = on_error
        self._on_progress = on_progress
        self._tick_s = tick_s
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._run, name="traceml-spool", daemon=True)
        self._known_schemas: set[str] = set()
        self.error = ""
        self.rows_written = 0
        self.batches_written = 0
        self.bytes_on_disk = 0
        self._closed = threading.Event()

    # -- producer side (ingest thread) ---------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def append(self, rank: int, table: str, columns: Mapping[str, Any], schema: TableSchema | None = None) -> None:
        if self.error or self._closed.is_set():
            return
        if schema is not None and table not in self._known_schemas:
            self._known_schemas.add(table)
            self._put((_SCHEMA, schema))
        self._put((_APPEND, rank, table, columns))

    def attach(self, name: str, data: Any) -> None:
        if not self.error and not self._closed.is_set():
            self._put((_ATTACH, name, data))

    def _put(self, item: tuple[Any, ...]) -> None:
        # Blocks when the disk is behind; gives up once the writer has failed (the thread drains).
        while not self.error:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def close(self, summary: Any = None, timeout_s: float = 60.0) -> bool:
        """Write what is queued, close the file with ``summary``; True when the thread finished."""
        if self._closed.is_set():
            return True
        self._closed.set()
        if self._thread.is_alive():
            self._queue.put((_CLOSE, summary))
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the spool thread ----------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> None:
        if not self.error:
            self.error = f"{what}: {exc}"
            self._on_error(self.error)

    def _run(self) -> None:
        writer: Writer | None = None
        try:
            writer = self._open_writer()
        except Exception as exc:
            self._fail(f"cannot open {self.path}", exc)
        next_tick = time.monotonic() + self._tick_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = None
            if item is not None and item[0] == _CLOSE:
                if writer is not None and not self.error:
                    try:
                        writer.close(summary=item[1])
                    except Exception as exc:
                        self._fail(f"closing {self.path}", exc)
                    self._refresh_size()
                return
            if item is not None and writer is not None and not self.error:
                try:
                    self._write(writer, item)
                except Exception as exc:
                    self._fail(f"writing {self.path}", exc)
                    self._abandon(writer)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_s
                if writer is not None and not self.error:
                    try:
                        writer.tick()
                    except Exception as exc:
                        self._fail(f"writing {self.path}", exc)
                        self._abandon(writer)
                    self._refresh_size()

    def _write(self, writer: Writer, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == _APPEND:
            _, rank, table, columns = item
            writer.append(rank, table, columns)
            self.batches_written += 1
            self.rows_written += len(next(iter(columns.values()), ()))
        elif kind == _ATTACH:
            writer.attach(item[1], item[2])
        elif kind == _SCHEMA:
            writer.add_schema(item[1])

    def _abandon(self, writer: Writer) -> None:
        """After a failure: release the file handle; what was written stays recoverable."""
        try:
            writer.close()
        except Exception:
            pass

    def _refresh_size(self) -> None:
        try:
            self.bytes_on_disk = os.path.getsize(self.path)
        except OSError:
            return
        if self._on_progress is not None:
            self._on_progress(self.bytes_on_disk)
