"""``TmlWriter``: append rows, attachments and schemas to a ``.tml`` file from one thread.  Rows are
buffered per ``(rank, table)`` into one open segment, written at a size or time bound; index
checkpoints keep a killed writer's file readable (docs/internals.md, "Format").
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zstandard

from traceml import names
from traceml._version import __version__
from traceml.errors import ConfigError, FormatError, RecordTooLargeError, WriterClosedError
from traceml.format import _records, _segment, rollup
from traceml.format._records import IndexEntry, RecordKind, SegmentHead
from traceml.schema import (
    NUMPY_DTYPES,
    STANDARD_TABLES,
    STR,
    TableSchema,
    rollup_name,
    rollup_schema,
    schema_from_columns,
)

log = logging.getLogger("traceml.format")

#: the schemas a writer declares in its header unless told otherwise
STANDARD: tuple[TableSchema, ...] = tuple(STANDARD_TABLES.values())

#: a segment over this raw size could compress past the readers' record limit
_MAX_SEGMENT_BYTES = 32 << 20


class _Table:
    """A schema with what ``append`` needs per call precomputed."""

    __slots__ = ("schema", "names", "specs", "row_bytes")

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.names = frozenset(schema.names)
        self.specs = tuple((c.name, None if c.dtype == STR else NUMPY_DTYPES[c.dtype]) for c in schema.columns)
        self.row_bytes = sum(dtype.itemsize for _, dtype in self.specs if dtype is not None)

    def normalize(self, columns: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
        """Validate *columns*: (owned copies in the schema's dtypes, rows, str bytes)."""
        name = self.schema.name
        if len(columns) != len(self.specs) or not self.names.issuperset(columns):
            missing = sorted(self.names - columns.keys())
            extra = sorted(columns.keys() - self.names)
            raise ConfigError(
                f"append to table {name!r}: expected columns {list(self.schema.names)};"
                f" missing {missing}, unexpected {extra}"
            )
        out: dict[str, Any] = {}
        rows = -1
        str_bytes = 0
        for col, target in self.specs:
            values = columns[col]
            if target is None:
                items = values.tolist() if isinstance(values, np.ndarray) else list(values)
                if not all(isinstance(v, str) for v in items):
                    raise ConfigError(f"column {name}.{col} is str: expected a list of strings")
                problem = names.labels_problem(items, f"column {name}.{col}", names.MAX_ARG)
                if problem is not None:
                    raise ConfigError(f"{problem}; str values are labels (docs/security.md, 'Names')")
                str_bytes += sum(map(len, items)) + len(items)
                out[col] = items
                n = len(items)
            else:
                array = np.asarray(values)
                if array.ndim != 1:
                    raise ConfigError(f"column {name}.{col}: expected a 1-d array, found shape {array.shape}")
                if array.dtype == target:
                    out[col] = array.copy()  # owned: the caller may reuse its buffers
                elif not array.size or np.can_cast(array.dtype, target, "same_kind"):
                    out[col] = array.astype(target)
                else:
                    raise ConfigError(
                        f"column {name}.{col} has type code {target.str}: found numpy dtype {array.dtype};"
                        f" convert it with .astype('{target.str}')"
                    )
                n = len(array)
            if rows != n and rows != -1:
                raise ConfigError(
                    f"append to table {name!r}: column {col!r} has {n} rows, the columns before it {rows}"
                )
            rows = n
        return out, max(rows, 0), str_bytes


class _Stream:
    """Rows of one (rank, table) waiting in the open segment."""

    __slots__ = ("schema", "chunks", "rows")

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.chunks: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.rows = 0


class _OpenSegment:
    __slots__ = ("streams", "raw_bytes", "opened_at")

    def __init__(self, opened_at: float) -> None:
        self.streams: dict[tuple[int, str], _Stream] = {}
        self.raw_bytes = 0
        self.opened_at = opened_at


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ConfigError(f"TmlWriter({name}={value!r}): expected a positive number")


class TmlWriter:
    """Write one ``.tml`` recording (spec: docs/format.md).  Use from ONE thread.

    ``append`` buffers rows; a segment is written when it holds ``segment_max_bytes`` of
    column data or its first row is ``segment_max_age_s`` old (checked on ``append`` and
    ``tick``).  ``fsync_interval_s=None`` never calls ``fdatasync``.  After a write error
    every call raises :class:`WriterClosedError`; the file stays readable up to the last
    complete record.

    Tables with a ``step`` column are also rolled up in groups of ``rollup_steps`` steps
    (``rollup/<table>``, see :mod:`traceml.format.rollup`); the rollup rows are written in
    segments of their own at each index checkpoint, so a reader finds them without
    decompressing the raw rows.  ``rollup_steps=None`` writes no rollups.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        run_meta: Mapping[str, Any],
        schemas: Iterable[TableSchema] = STANDARD,
        segment_max_bytes: int = 1 << 20,
        segment_max_age_s: float = 1.0,
        fsync_interval_s: float | None = 5.0,
        checkpoint_interval_s: float = 30.0,
        checkpoint_every_segments: int = 64,
        level: int = 3,
        rollup_steps: int | None = rollup.DEFAULT_ROLLUP_STEPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _positive("segment_max_bytes", segment_max_bytes)
        _positive("rollup_steps", rollup_steps, allow_none=True)
        if segment_max_bytes > _MAX_SEGMENT_BYTES:
            raise ConfigError(
                f"TmlWriter(segment_max_bytes={segment_max_bytes}): at most {_MAX_SEGMENT_BYTES >> 20} MiB,"
                " so that every segment stays under the 64 MiB record limit of readers"
            )
        _positive("segment_max_age_s", segment_max_age_s)
        _positive("fsync_interval_s", fsync_interval_s, allow_none=True)
        _positive("checkpoint_interval_s", checkpoint_interval_s)
        _positive("checkpoint_every_segments", checkpoint_every_segments)
        if not -7 <= level <= 22:
            raise ConfigError(f"TmlWriter(level={level}): expected a zstd level in -7..22 (3 is a good default)")
        self._path = Path(path)
        self._segment_max_bytes = int(segment_max_bytes)
        self._segment_max_age_s = float(segment_max_age_s)
        self._fsync_interval_s = fsync_interval_s
        self._checkpoint_interval_s = float(checkpoint_interval_s)
        self._checkpoint_every_segments = int(checkpoint_every_segments)
        self._clock = clock
        self._rollup_steps = None if rollup_steps is None else int(rollup_steps)
        # per (rank, table): the rows of the open rollup group; closed groups wait for the next checkpoint
        self._rollup_open: dict[tuple[int, str], rollup.RollupBuffer] = {}
        self._no_rollup: set[str] = set()  # tables that have none (no step column, or a str one)
        self._rollup_done: dict[tuple[int, str], list[dict[str, np.ndarray]]] = {}
        self._rollup_bytes = 0
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._tables: dict[str, _Table] = {}
        for schema in schemas:
            names.check_table(schema.name)
            self._check_new_schema(schema)
            self._tables[schema.name] = _Table(schema)
        self._sync = os.urandom(_records.SYNC_SIZE)
        meta = dict(run_meta)
        run_id = names.check_label(str(meta.get("run_id") or os.urandom(8).hex()), "run_meta['run_id']")
        hosts = [names.check_label(str(h), "a host name") for h in meta.get("hosts") or [socket.gethostname()]]
        command = names.check_command([str(a) for a in meta.get("command") or sys.argv], "run_meta['command']")
        if meta.get("run_name") is not None:
            names.check_label(meta["run_name"], "run_meta['run_name']")
        try:
            header = _records.header_payload(
                writer=f"traceml {__version__}",
                run_id=run_id,
                created_ns=time.time_ns(),
                hosts=hosts,
                world_size=int(meta.get("world_size", -1)),
                command=command,
                meta=meta,
                schemas=[t.schema for t in self._tables.values()],
                sync=self._sync,
                rollup_steps=self._rollup_steps,
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"run_meta must be a msgpack-able map of str keys; {exc}") from exc

        self._header = header  # copied into every INDEX checkpoint: a damaged HEADER is restored from it
        self._offset = 0
        self._closed = False
        self._failure: str | None = None
        self._segment: _OpenSegment | None = None
        self._rows_written = 0
        self._rows_appended = 0
        self._segments_written = 0
        # records since the last INDEX checkpoint
        self._pending_segments: list[tuple[int, int, SegmentHead]] = []
        self._pending_attachments: list[IndexEntry] = []
        self._pending_schemas: list[IndexEntry] = []
        self._last_index: int | None = None
        now = clock()
        self._last_checkpoint_at = now
        self._last_sync_at = now
        self._unsynced = False
        self._table_rows: dict[str, int] = {}
        self._t_range: tuple[int, int] | None = None
        self._step_range: tuple[int, int] | None = None
        try:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise FormatError(
                f"cannot create recording {self._path}: {exc.strerror}; check that the directory exists and is writable"
            ) from exc
        # the magic and the HEADER go out in one write (~1 KiB, inside one page): a writer killed
        # at any moment leaves an empty file or one whose HEADER is whole, never the magic alone
        self._write_record(RecordKind.HEADER, header, prefix=_records.MAGIC)

    # --- properties -----------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def rows_written(self) -> int:
        """Rows in segments already handed to the OS."""
        return self._rows_written

    @property
    def rows_appended(self) -> int:
        """Rows accepted by :meth:`append` (written or still in the open segment)."""
        return self._rows_appended

    @property
    def bytes_written(self) -> int:
        return self._offset

    @property
    def segments_written(self) -> int:
        return self._segments_written

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def schemas(self) -> dict[str, TableSchema]:
        return {name: t.schema for name, t in self._tables.items()}

    # --- public API -----------------------------------------------------------------

    def add_schema(self, schema: TableSchema) -> None:
        """Declare a table (idempotent for the same schema; a different one is refused).

        Table and column names must follow the name grammar (:mod:`traceml.names`); tables in
        the writer's reserved namespaces (``rollup/...``) are refused."""
        self._check_usable()
        names.check_table(schema.name)
        self._add_schema(schema)

    def _add_schema(self, schema: TableSchema) -> None:
        known = self._tables[schema.name].schema if schema.name in self._tables else None
        if known is not None:
            if known != schema:
                raise ConfigError(
                    f"table {schema.name!r} already has columns {known.to_dict()['columns']};"
                    f" found {schema.to_dict()['columns']}: a table's schema cannot change within a recording"
                )
            return
        self._check_new_schema(schema)
        offset = self._offset
        length = self._write_record(RecordKind.SCHEMA, _records.schema_payload(schema))
        self._tables[schema.name] = _Table(schema)
        self._pending_schemas.append(IndexEntry(offset, length, schema.name))

    def append(self, rank: int, table: str, columns: Mapping[str, Any]) -> None:
        """Buffer rows of *table* from *rank* (``{column: 1-d array | list[str]}``).

        A bad call (a name outside the grammar, a reserved table, columns that do not match)
        raises :class:`ConfigError` and changes nothing: the recording goes on."""
        self._check_usable()
        names.check_table(table)
        info = self._tables.get(table)
        if info is None:
            self._add_schema(schema_from_columns(table, columns))
            info = self._tables[table]
        cols, rows, str_bytes = info.normalize(columns)
        if rows:
            self._rows_appended += rows
            per_row = max(1, info.row_bytes + str_bytes // rows)
            key = (int(rank), table)
            start = 0
            while start < rows:
                if self._segment is None:
                    self._segment = _OpenSegment(self._clock())
                segment = self._segment
                take = min(rows - start, max(1, (self._segment_max_bytes - segment.raw_bytes) // per_row))
                stream = segment.streams.get(key)
                if stream is None:
                    stream = segment.streams[key] = _Stream(info.schema)
                for name, values in cols.items():
                    stream.chunks[name].append(values if take == rows else values[start : start + take])
                stream.rows += take
                segment.raw_bytes += take * per_row
                start += take
                if segment.raw_bytes >= self._segment_max_bytes:
                    self._close_segment()
            if self._rollup_steps is not None:
                try:
                    self._roll_up(int(rank), info.schema, cols)
                except Exception as exc:  # a rollup bug must not cost the rows
                    self._stop_rollups(exc)
        self._close_aged_segment()

    def attach(self, name: str, data: Mapping[str, Any]) -> None:
        """Store a named document (last one wins when a name repeats)."""
        self._check_usable()
        names.check_attachment(name)
        if not isinstance(data, Mapping):
            raise ConfigError(f"attachment {name!r} must be a map; found {type(data).__name__}")
        try:
            payload = _records.attachment_payload(name, data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"attachment {name!r} is not msgpack-able: {exc}") from exc
        offset = self._offset
        length = self._write_record(RecordKind.ATTACHMENT, payload)
        self._pending_attachments.append(IndexEntry(offset, length, name))

    def tick(self) -> None:
        """Apply the time bounds: close an old segment, checkpoint, sync (call ~1 Hz)."""
        self._check_usable()
        self._close_aged_segment()
        now = self._clock()
        if self._has_pending() and now - self._last_checkpoint_at >= self._checkpoint_interval_s:
            self._write_checkpoint(final=False)
        elif (
            self._unsynced and self._fsync_interval_s is not None and now - self._last_sync_at >= self._fsync_interval_s
        ):
            self._sync_to_disk()

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write the open segment, *summary* (as the ``summary`` attachment), the final index,
        SUMMARY and FOOTER.  Idempotent; after a write failure it only releases the file."""
        if self._closed:
            return
        try:
            if self._failure is None:
                if self._segment is not None:
                    self._close_segment(checkpoint=False)
                try:
                    closing = [(key, buffer.flush()) for key, buffer in self._rollup_open.items()]
                except Exception as exc:
                    closing = []
                    self._stop_rollups(exc)
                for key, rows in closing:
                    self._rollup_rows(key, rows)
                self._write_rollups()
                if summary is not None:
                    self.attach("summary", summary)
                index_offset = self._write_checkpoint(final=True, sync=False)
                summary_offset = self._offset
                self._write_record(RecordKind.SUMMARY, self._summary_payload())
                self._write_record(RecordKind.FOOTER, _records.footer_payload(index_offset, summary_offset))
                if self._fsync_interval_s is not None:
                    self._sync_to_disk()
        finally:
            self._closed = True
            self._release()

    def __enter__(self) -> TmlWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "failed" if self._failure else "closed" if self._closed else "open"
        return f"TmlWriter({str(self._path)!r}, {state}, rows_written={self._rows_written})"

    # --- internals ------------------------------------------------------------------

    def _check_new_schema(self, schema: TableSchema) -> None:
        names.check_table(schema.name, reserved_ok=True)  # callers refuse the reserved ones
        columns = schema.names
        for column in columns:
            names.check_column(column, f"table {schema.name!r}")
        if len(set(columns)) != len(columns):
            raise ConfigError(f"table {schema.name!r} repeats a column name: {list(columns)}")

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise WriterClosedError(self._failure)
        if self._closed:
            raise WriterClosedError(f"the writer of {self._path} is closed; open a new TmlWriter to record more")

    def _has_pending(self) -> bool:
        return bool(self._pending_segments or self._pending_attachments or self._pending_schemas)

    def _close_aged_segment(self) -> None:
        if self._segment is not None and self._clock() - self._segment.opened_at >= self._segment_max_age_s:
            self._close_segment()

    def _roll_up(self, rank: int, schema: TableSchema, cols: Mapping[str, Any]) -> None:
        key = (rank, schema.name)
        buffer = self._rollup_open.get(key)
        if buffer is None:
            if schema.name in self._no_rollup:
                return
            rolled = rollup_schema(schema)
            if rolled is None or self._rollup_steps is None:
                self._no_rollup.add(schema.name)
                return
            if rolled.name not in self._tables:
                self._add_schema(rolled)
            buffer = self._rollup_open[key] = rollup.RollupBuffer(schema, self._rollup_steps)
        buffer.add(cols)

    def _drain_rollups(self) -> None:
        """Roll up the groups the rows appended since the last segment completed."""
        try:
            drained = [(key, buffer.drain()) for key, buffer in self._rollup_open.items()]
        except Exception as exc:
            self._stop_rollups(exc)
            return
        for key, rows in drained:
            self._rollup_rows(key, rows)

    def _stop_rollups(self, exc: Exception) -> None:
        """Fail open: write no more rollup rows (readers roll up the rest from the rows), keep recording."""
        log.warning("rolling up %s failed (%s); the recording goes on without more rollup rows", self._path, exc)
        self._rollup_steps = None
        self._rollup_open.clear()
        self._rollup_done.clear()
        self._rollup_bytes = 0

    def _rollup_rows(self, key: tuple[int, str], rows: dict[str, np.ndarray] | None) -> None:
        if not rows or not len(rows[rollup.STEP]):
            return
        self._rollup_done.setdefault(key, []).append(rows)
        self._rollup_bytes += sum(v.nbytes for v in rows.values())
        if self._rollup_bytes >= self._segment_max_bytes:
            self._write_rollups()

    def _write_rollups(self) -> None:
        """The closed rollup groups as one segment of their own (kept apart from the raw rows)."""
        done, self._rollup_done, self._rollup_bytes = self._rollup_done, {}, 0
        groups: list[_segment.TableRuns] = []
        try:
            by_table: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}
            for (rank, table), parts in sorted(done.items()):
                merged = rollup.concat(parts)
                if merged:
                    by_table.setdefault(rollup_name(table), []).append((rank, merged))
            for name, members in by_table.items():
                schema = self._tables[name].schema
                columns = {c.name: np.concatenate([m[c.name] for _, m in members]) for c in schema.columns}
                groups.append((schema, [(rank, len(m[rollup.STEP])) for rank, m in members], columns))
        except Exception as exc:  # fail open: the raw rows are written; readers roll them up
            self._stop_rollups(exc)
            return
        if groups:
            self._write_segment(groups, data=False)

    def _close_segment(self, *, checkpoint: bool = True) -> None:
        segment, self._segment = self._segment, None
        if segment is None or not segment.streams:
            return
        self._write_segment(_table_runs(segment), data=True)
        self._drain_rollups()
        if not checkpoint:
            return
        now = self._clock()
        if (
            len(self._pending_segments) >= self._checkpoint_every_segments
            or now - self._last_checkpoint_at >= self._checkpoint_interval_s
        ):
            self._write_checkpoint(final=False)
        elif self._fsync_interval_s is not None and now - self._last_sync_at >= self._fsync_interval_s:
            self._sync_to_disk()

    def _write_segment(self, groups: list[_segment.TableRuns], *, data: bool) -> None:
        """Encode and write one SEGMENT; ``data`` rows count as written (rollup rows do not)."""
        payload, head = _segment.encode_segment(groups, self._compressor, seq=self._segments_written)
        offset = self._offset
        length = self._write_record(RecordKind.SEGMENT, payload)
        self._pending_segments.append((offset, length, head))
        self._segments_written += 1
        for _, table, n in head.streams:
            if data:
                self._rows_written += n
            self._table_rows[table] = self._table_rows.get(table, 0) + n
        self._t_range = _widen(self._t_range, head.t_min, head.t_max)
        self._step_range = _widen(self._step_range, head.step_min, head.step_max)

    def _write_checkpoint(self, *, final: bool, sync: bool = True) -> int:
        if not final:  # close() wrote the last rollups already
            self._write_rollups()
        payload = _records.index_payload(
            prev=self._last_index,
            final=final,
            segments=self._pending_segments,
            attachments=self._pending_attachments,
            schemas=self._pending_schemas,
            header=self._header,
        )
        offset = self._offset
        self._write_record(RecordKind.INDEX, payload)
        self._last_index = offset
        self._pending_segments, self._pending_attachments, self._pending_schemas = [], [], []
        self._last_checkpoint_at = self._clock()
        if sync and self._fsync_interval_s is not None:
            self._sync_to_disk()
        return offset

    def _summary_payload(self) -> bytes:
        t = self._t_range or (None, None)
        step = self._step_range or (None, None)
        return _records.pack_map(
            {
                "closed_ns": time.time_ns(),
                "segments": self._segments_written,
                "rows": dict(self._table_rows),
                "bytes": self._offset,
                "t_min": t[0],
                "t_max": t[1],
                "step_min": step[0],
                "step_max": step[1],
            }
        )

    def _write_record(self, kind: int, payload: bytes, prefix: bytes = b"") -> int:
        if len(payload) > _records.DEFAULT_MAX_RECORD_BYTES:
            raise RecordTooLargeError(
                RecordKind(kind).name,
                len(payload),
                _records.DEFAULT_MAX_RECORD_BYTES,
                setting="store less data per record",
            )
        record = _records.pack_record(self._sync, kind, payload)
        self._write(prefix + record if prefix else record)
        return len(record)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            self._fail(f"writing {self._path} failed at byte {self._offset + written}: {exc.strerror or exc}", exc)
        self._offset += len(view)
        self._unsynced = True

    def _sync_to_disk(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._fail(f"fdatasync of {self._path} failed: {exc.strerror or exc}", exc)
        self._last_sync_at = self._clock()
        self._unsynced = False

    def _fail(self, what: str, exc: OSError) -> None:
        try:  # drop the partial record so the file ends on a record boundary
            os.ftruncate(self._fd, self._offset)
        except OSError:
            pass
        self._failure = (
            f"{what}; the recording is readable up to byte {self._offset}"
            f" ({self._segments_written} segments, {self._rows_written} rows) and refuses further writes:"
            " free space or fix the device, then start a new recording"
        )
        self._segment = None
        self._release()
        raise WriterClosedError(self._failure) from exc

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _table_runs(segment: _OpenSegment) -> list[_segment.TableRuns]:
    """The open segment's streams grouped by table: each column of a table is written once,
    rank after rank, which keeps the per-column cost independent of the number of ranks."""
    by_table: dict[str, list[tuple[int, _Stream]]] = {}
    for (rank, table), stream in segment.streams.items():
        by_table.setdefault(table, []).append((rank, stream))
    groups: list[_segment.TableRuns] = []
    for members in by_table.values():
        schema = members[0][1].schema
        columns: dict[str, Any] = {}
        for col in schema.columns:
            parts = [chunk for _, stream in members for chunk in stream.chunks[col.name]]
            if col.dtype == STR:
                columns[col.name] = [value for part in parts for value in part]
            else:
                columns[col.name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        groups.append((schema, [(rank, stream.rows) for rank, stream in members], columns))
    return groups


def _widen(current: tuple[int, int] | None, lo: int | None, hi: int | None) -> tuple[int, int] | None:
    if lo is None or hi is None:
        return current
    if current is None:
        return (lo, hi)
    return (min(current[0], lo), max(current[1], hi))
