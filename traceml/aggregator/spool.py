"""The spool: every batch the aggregator receives goes to the ``.tml`` file as it arrives.

One thread owns the writer behind a byte-bounded queue; a writer error is reported once and then the
spool discards, a refused item is counted in ``skipped``: the live view and training carry on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from traceml.errors import WriterClosedError
from traceml.schema import TableSchema

log = logging.getLogger("traceml.aggregator")

#: how often the spool thread calls ``writer.tick()`` and refreshes the byte count
TICK_S = 0.2
#: column bytes queued before ``append`` blocks the caller (back-pressure on ingest)
DEFAULT_MAX_QUEUED_BYTES = 64 << 20
#: what one value of a ``str`` column is counted as
_STR_VALUE_BYTES = 48


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
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        tick_s: float = TICK_S,
    ) -> None:
        self.path = path
        self._open_writer = open_writer
        self._on_error = on_error
        self._on_progress = on_progress
        self._tick_s = tick_s
        self.max_queued_bytes = max_queued_bytes
        self._items: deque[tuple[int, tuple[Any, ...]]] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="traceml-spool", daemon=True)
        self._known_schemas: set[str] = set()
        self.error = ""
        self.rows_written = 0
        self.batches_written = 0
        self.bytes_on_disk = 0
        #: items the writer refused (the recording went on without them), and the last reason
        self.skipped = 0
        self.last_skip = ""
        self._closed = threading.Event()

    # -- producer side (ingest thread) ---------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def append(self, rank: int, table: str, columns: Mapping[str, Any], schema: TableSchema | None = None) -> None:
        if self.error or self._closed.is_set():
            return
        if schema is not None and table not in self._known_schemas:
            self._known_schemas.add(table)
            self._put((_SCHEMA, schema), 0)
        nbytes = sum(getattr(v, "nbytes", None) or len(v) * _STR_VALUE_BYTES for v in columns.values())
        self._put((_APPEND, rank, table, columns), nbytes)

    def attach(self, name: str, data: Any) -> None:
        if not self.error and not self._closed.is_set():
            self._put((_ATTACH, name, data), 0)

    def _put(self, item: tuple[Any, ...], nbytes: int, force: bool = False) -> None:
        """Queue ``item``; blocks while the disk is behind (one item always fits), returns at
        once when the writer has failed."""
        with self._cond:
            while (
                not force
                and not self.error
                and self._queued_bytes
                and self._queued_bytes + nbytes > self.max_queued_bytes
            ):
                self._cond.wait(0.5)
            if self.error and not force:
                return
            self._items.append((nbytes, item))
            self._queued_bytes += nbytes
            self._cond.notify_all()

    def _get(self, timeout_s: float) -> tuple[Any, ...] | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            if not self._items:
                return None
            nbytes, item = self._items.popleft()
            self._queued_bytes -= nbytes
            self._cond.notify_all()
            return item

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def close(self, summary: Any = None, timeout_s: float = 60.0) -> bool:
        """Write what is queued, close the file with ``summary``; True when the thread finished."""
        if self._closed.is_set():
            return True
        self._closed.set()
        if self._thread.is_alive():
            self._put((_CLOSE, summary), 0, force=True)
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the spool thread ----------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> None:
        if not self.error:
            self.error = f"{what}: {exc}"
            with self._cond:
                self._cond.notify_all()  # producers blocked on a full queue give up now
            self._on_error(self.error)

    def _run(self) -> None:
        writer: Writer | None = None
        try:
            writer = self._open_writer()
        except Exception as exc:
            self._fail(f"cannot open {self.path}", exc)
        next_tick = time.monotonic() + self._tick_s
        while True:
            item = self._get(max(0.0, next_tick - time.monotonic()))
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
                except (WriterClosedError, OSError) as exc:  # the file is unusable
                    self._fail(f"writing {self.path}", exc)
                    self._abandon(writer)
                except Exception as exc:  # fail open: this item is lost, the recording is not
                    self._skip(item, exc)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_s
                if writer is not None and not self.error:
                    try:
                        writer.tick()
                    except (WriterClosedError, OSError) as exc:  # the file is unusable
                        self._fail(f"writing {self.path}", exc)
                        self._abandon(writer)
                    except Exception as exc:  # a bug in one tick must not end the recording
                        self._skip((_CLOSE,), exc)
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

    def _skip(self, item: tuple[Any, ...], exc: Exception) -> None:
        self.skipped += 1
        what = {_APPEND: "rows", _ATTACH: "an attachment", _SCHEMA: "a schema"}.get(item[0], "a tick")
        self.last_skip = f"{what} refused by the writer: {exc}"
        if self.skipped == 1:
            log.warning("%s: skipped %s (logged once; the recording goes on)", self.path, self.last_skip)

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
