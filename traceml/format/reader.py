"""``open_recording``: read a ``.tml`` file, closed, crashed, damaged or still growing.

A clean file is opened from its footer and index; a crashed one from its last index
checkpoint plus a forward scan; damage is skipped by resynchronising on the sync marker
and reported in ``integrity``.  Only ``traceml.errors`` types escape; every length read
from the file is bounded before anything is allocated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zstandard

from traceml import names
from traceml.errors import (
    ConfigError,
    CorruptRecordError,
    FormatError,
    RecordTooLargeError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from traceml.format import _records, _segment, rollup
from traceml.format._records import (
    FOOTER_SIZE,
    FRAME_HEAD_SIZE,
    FRAME_OVERHEAD,
    MAGIC,
    MAGIC_SIZE,
    SYNC_SIZE,
    IndexCheckpoint,
    RecordKind,
    SegmentHead,
)
from traceml.format._slice import Range, _concat, _disjoint, _inside, _rows, _trim
from traceml.format.inspect import Batch, TableStats, inspect_report
from traceml.schema import NUMPY_DTYPES, STR, TableSchema, is_rollup, rollup_schema

#: (rank, table, {column: ndarray}); str columns are object arrays

_SEARCH_CHUNK = 1 << 20
#: the upper bound of "every step after" in a step range
_MAX_STEP = (1 << 63) - 1


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what a reader allocates for one record (change them only for files you trust)."""

    max_record_bytes: int = _records.DEFAULT_MAX_RECORD_BYTES
    max_decompressed_bytes: int = _records.DEFAULT_MAX_DECOMPRESSED_BYTES


@dataclass(frozen=True)
class SegmentInfo:
    """One index entry: where a segment is and what it holds."""

    offset: int
    length: int
    t_min: int | None
    t_max: int | None
    step_min: int | None
    step_max: int | None
    ranks: tuple[int, ...]
    rows: Mapping[tuple[int, str], int] = field(hash=False)
    raw_size: int

    @classmethod
    def from_head(cls, offset: int, length: int, head: SegmentHead) -> SegmentInfo:
        rows: dict[tuple[int, str], int] = {}
        for rank, table, n in head.streams:
            rows[(rank, table)] = rows.get((rank, table), 0) + n
        return cls(
            offset=offset,
            length=length,
            t_min=head.t_min,
            t_max=head.t_max,
            step_min=head.step_min,
            step_max=head.step_max,
            ranks=tuple(sorted({rank for rank, _ in rows})),
            rows=rows,
            raw_size=head.raw_size,
        )

    @property
    def tables(self) -> frozenset[str]:
        return frozenset(table for _, table in self.rows)


@dataclass
class _Scan:
    """Where a forward scan stands: next record offset, or a damaged span being skipped."""

    pos: int
    resync_from: int | None = None
    reason: str = ""


def open_recording(
    path: str | os.PathLike[str], *, follow: bool = False, limits: ReadLimits | None = None
) -> TmlReader:
    """Open a ``.tml`` recording.  ``follow=True`` tails a file that is still being written."""
    return TmlReader(path, follow=follow, limits=limits)


class TmlReader:
    """A ``.tml`` recording opened for reading (see :func:`open_recording`).  One thread."""

    def __init__(self, path: str | os.PathLike[str], *, follow: bool = False, limits: ReadLimits | None = None) -> None:
        self._path = Path(path)
        self._follow = follow
        self._limits = limits or ReadLimits()
        self._decompressor = zstandard.ZstdDecompressor()
        self._segments: list[SegmentInfo] = []
        self._segment_offsets: set[int] = set()
        self._attachments: dict[str, dict[str, Any]] = {}
        self._schemas: dict[str, TableSchema] = {}
        self._header: dict[str, Any] = {}
        self._summary: dict[str, Any] | None = None
        self._skipped: dict[int, dict[str, Any]] = {}
        self._tail: dict[str, Any] | None = None
        self._footer = False
        self._sync = b""
        self._data_start = 0
        #: None while the HEADER is intact; else where the header came from (or that it is lost)
        self._header_restored: str | None = None
        #: name_problems() as of (segments, schemas, attachments, header) last time
        self._name_problems: tuple[tuple[Any, ...], list[str]] | None = None
        #: (record length, raw size, ranges, streams) -> offsets of segments with that head
        self._segment_heads: dict[tuple[Any, ...], list[int]] = {}
        try:
            self._fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise FormatError(f"cannot open recording {self._path}: {exc.strerror or exc}") from exc
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # --- public API -----------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def header(self) -> dict[str, Any]:
        return dict(self._header)

    @property
    def schemas(self) -> dict[str, TableSchema]:
        return dict(self._schemas)

    @property
    def header_restored(self) -> str | None:
        """None when the HEADER record is intact; else where the header was taken from (a copy in
        an INDEX checkpoint) or what is lost (the header's fields are empty then)."""
        return self._header_restored

    @property
    def segments(self) -> list[SegmentInfo]:
        return list(self._segments)

    @property
    def attachments(self) -> dict[str, dict[str, Any]]:
        return dict(self._attachments)

    @property
    def summary(self) -> dict[str, Any] | None:
        """The SUMMARY record of a cleanly closed file (statistics), else None."""
        return self._summary

    @property
    def ranks(self) -> list[int]:
        return sorted({rank for seg in self._segments for rank in seg.ranks})

    @property
    def tables(self) -> list[str]:
        """The tables with rows (rollups, which are derived from them, are listed by :attr:`rollup_tables`)."""
        return sorted({table for seg in self._segments for _, table in seg.rows if not is_rollup(table)})

    @property
    def rollup_tables(self) -> list[str]:
        return sorted({table for seg in self._segments for _, table in seg.rows if is_rollup(table)})

    @property
    def rollup_steps(self) -> int | None:
        """Steps per rollup group the writer used (HEADER ``rollup_steps``); None: it wrote no rollups."""
        value = self._header.get("rollup_steps")
        return value if type(value) is int and value > 0 else None

    @property
    def integrity(self) -> dict[str, Any]:
        """``status``: complete | recovered (no footer: the writer did not finish, or is still
        writing) | damaged (bytes were skipped); ``skipped``: [{offset, length, reason}]."""
        skipped = sorted(self._skipped.values(), key=lambda s: s["offset"])
        if self._tail is not None:
            skipped.append(dict(self._tail))
        lost = sum(s["length"] for s in skipped)
        bad_names = self.name_problems()
        if self._skipped:
            first = skipped[0]
            status = "damaged"
            message = (
                f"damaged: {len(skipped)} span(s), {lost} bytes skipped; first at byte {first['offset']}:"
                f" {first['reason']}"
            )
        elif self._footer:
            status, message = "complete", "complete: the writer closed the file cleanly"
        else:
            status = "recovered"
            if self._follow:
                message = "recovered: no footer yet (the writer is still writing or did not finish)"
            else:
                message = "recovered: the writer did not finish (no footer); every complete record was read"
            if self._tail is not None:
                message += f"; the last {self._tail['length']} bytes were an incomplete record"
        if bad_names:
            message += f"; {len(bad_names)} name(s) break the name grammar (docs/security.md, 'Names')"
        return {"status": status, "skipped": skipped, "lost_bytes": lost, "message": message, "names": bad_names}

    def name_problems(self) -> list[str]:
        """What in this file breaks the name policy (:mod:`traceml.names`): table, column and
        attachment names, and the run id, run name, hosts and command of the header.  Such names are
        still read (old files keep working) but are not trusted: each problem says what and where,
        with the name shown escaped."""
        key = (len(self._segments), len(self._schemas), tuple(self._attachments), id(self._header))
        cached = self._name_problems
        if cached is not None and cached[0] == key:
            return list(cached[1])
        problems: list[str | None] = []
        header = self._header
        if header:
            problems.append(names.label_problem(header.get("run_id"), "HEADER.run_id"))
            hosts = header.get("hosts")
            problems.append(names.labels_problem(hosts if isinstance(hosts, list) else [hosts], "HEADER.hosts"))
            command = header.get("command")
            command = command if isinstance(command, list) else [command]
            problems.append(
                names.labels_problem(command, "HEADER.command", names.MAX_ARG)
                if len(command) <= names.MAX_ARGS
                else f"HEADER.command has {len(command)} arguments; at most {names.MAX_ARGS} are allowed"
            )
            meta = header.get("meta")
            if isinstance(meta, dict) and meta.get("run_name") is not None:
                problems.append(names.label_problem(meta["run_name"], "HEADER.meta.run_name"))
        tables = set(self._schemas) | {t for seg in self._segments for _, t in seg.rows}
        for table in sorted(tables):
            problems.append(names.name_problem(table, "table"))
            if is_rollup(table) and table in self._schemas:
                base = self._schemas.get(table[len(names.ROLLUP_PREFIX) :])
                if base is None or rollup_schema(base) != self._schemas[table]:
                    problems.append(
                        f"table {names.shown(table)} is in the writer's reserved namespace 'rollup/' but is not"
                        " the rollup the writer derives from its table; read_rollup ignores it"
                    )
            schema = self._schemas.get(table)
            for column in schema.columns if schema is not None else ():
                problem = names.column_problem(column.name)
                problems.append(None if problem is None else f"table {names.shown(table)}: {problem}")
        for attachment in sorted(self._attachments):
            problems.append(names.name_problem(attachment, "attachment"))
        found = [p for p in problems if p is not None]
        self._name_problems = (key, found)
        return list(found)

    def read_segment(self, info: SegmentInfo) -> list[Batch]:
        """Decode one segment; raises the FormatError that describes what is wrong with it."""
        kind, payload, total = self._read_record(info.offset, self._size())
        if kind != RecordKind.SEGMENT or total != info.length:
            raise CorruptRecordError(
                f"expected a SEGMENT record of {info.length} bytes at byte {info.offset};"
                f" found kind {kind} of {total} bytes"
            )
        return [(rank, table, cols) for rank, table, _, cols in self._decode(payload, None)]

    def read_table(
        self,
        table: str,
        ranks: Iterable[int] | None = None,
        step_range: Range | None = None,
        time_range: Range | None = None,
    ) -> dict[int, dict[str, np.ndarray]]:
        """Rows of *table* per rank, restricted to *ranks* and the inclusive ranges.

        ``step_range`` filters on the ``step`` column and ``time_range`` on ``ts_ns``; a table
        without that column is not filtered by it.  Segments outside the ranges are not read.
        """
        wanted_ranks = None if ranks is None else {int(r) for r in ranks}
        by_step = step_range is not None and self._has_column(table, "step")
        by_time = time_range is not None and self._has_column(table, "ts_ns")
        selected: list[tuple[SegmentInfo, set[tuple[int, str]], bool]] = []
        capacity: dict[int, int] = {}
        schema = self._schemas.get(table)
        for seg in list(self._segments):
            wanted = {key for key in seg.rows if key[1] == table and (wanted_ranks is None or key[0] in wanted_ranks)}
            if not wanted:
                continue
            if by_step and _disjoint(seg.step_min, seg.step_max, step_range):
                continue
            if by_time and _disjoint(seg.t_min, seg.t_max, time_range):
                continue
            claimed = sum(seg.rows[key] for key in wanted)
            if schema is not None and claimed * max(1, len(schema.columns)) > seg.raw_size:
                # each column takes a body byte per row at least: the index entry lies; do not size arrays by it
                self._report(seg.offset, seg.length, f"SEGMENT at byte {seg.offset}: {claimed} rows of {table}"
                             f" cannot fit in a body of {seg.raw_size} bytes")  # fmt: skip
                continue
            whole = (step_range is None or _inside(seg.step_min, seg.step_max, step_range)) and (
                time_range is None or _inside(seg.t_min, seg.t_max, time_range)
            )
            selected.append((seg, wanted, whole))
            for rank, _ in wanted:
                capacity[rank] = capacity.get(rank, 0) + seg.rows[(rank, table)]
        if schema is None:  # its SCHEMA record is lost: decode segment by segment
            parts: dict[int, list[dict[str, np.ndarray]]] = {}
            for seg, wanted, _ in selected:
                for rank, _, cols in self._read_checked(seg, wanted):
                    trimmed = _trim(cols, step_range, time_range)
                    if trimmed is not None:
                        parts.setdefault(rank, []).append(trimmed)
            return {rank: _concat(chunks) for rank, chunks in sorted(parts.items())}
        # decode straight into one array per rank and column, sized from the index
        out = {
            rank: {
                c.name: np.empty(n, dtype=object if c.dtype == STR else NUMPY_DTYPES[c.dtype]) for c in schema.columns
            }
            for rank, n in capacity.items()
        }
        filled = dict.fromkeys(capacity, 0)
        for seg, wanted, whole in selected:
            if whole:
                dest = {
                    (rank, table): {
                        name: array[filled[rank] : filled[rank] + seg.rows[(rank, table)]]
                        for name, array in out[rank].items()
                    }
                    for rank, _ in wanted
                }
                for rank, _, _ in self._read_checked(seg, wanted, dest):
                    filled[rank] += seg.rows[(rank, table)]
                continue
            for rank, _, cols in self._read_checked(seg, wanted):
                if cols.keys() != out[rank].keys() or any(cols[k].dtype != a.dtype for k, a in out[rank].items()):
                    self._report(seg.offset, seg.length, f"SEGMENT at byte {seg.offset}: columns of {table} differ"
                                 " from the table schema")  # fmt: skip
                    continue
                trimmed = _trim(cols, step_range, time_range)
                if trimmed is None:
                    continue
                n = _rows(trimmed)
                for name, array in out[rank].items():
                    array[filled[rank] : filled[rank] + n] = trimmed[name]
                filled[rank] += n
        return {
            rank: {name: array[: filled[rank]] for name, array in out[rank].items()}
            for rank in sorted(out)
            if filled[rank]
        }

    def read_rollup(
        self, table: str, ranks: Iterable[int] | None = None, bucket_steps: int | None = None
    ) -> dict[int, dict[str, np.ndarray]]:
        """The rollup of *table* per rank (spec: "Rollup tables"): the stored ``rollup/<table>`` rows,
        plus the raw rows they do not cover yet rolled up here (a crashed writer's tail, or every
        row of a file written without rollups).  Empty when *table* has no rollup."""
        schema = self._schemas.get(table)
        rolled = None if schema is None else rollup_schema(schema)
        if schema is None or rolled is None:
            return {}
        steps = bucket_steps or self.rollup_steps or rollup.DEFAULT_ROLLUP_STEPS
        # a stored rollup is used only if it is the one a writer derives (a crafted one is not trusted)
        stored = self.read_table(rolled.name, ranks) if self._schemas.get(rolled.name) == rolled else {}
        wanted = {r for seg in self._segments for (r, t) in seg.rows if t == table}
        if ranks is not None:
            wanted &= {int(r) for r in ranks}
        out: dict[int, dict[str, np.ndarray]] = {}
        for rank in sorted(wanted):
            have = stored.get(rank)
            covered = int(have[rollup.STEP_LAST].max()) if have is not None and len(have[rollup.STEP]) else None
            rng = None if covered is None else (covered + 1, _MAX_STEP)
            raw = self.read_table(table, [rank], step_range=rng).get(rank)
            parts = [p for p in (have, None if raw is None else rollup.rollup(schema, raw, steps)) if p is not None]
            merged = rollup.concat(parts)
            if merged:
                out[rank] = merged
        return out

    def iter_batches(
        self, step_range: Range | None = None, time_range: Range | None = None, *, rollups: bool = False
    ) -> Iterator[Batch]:
        """Every stream of every segment in file order, trimmed to the ranges (as in read_table);
        rollup streams only with ``rollups=True``."""
        for seg in list(self._segments):
            if not rollups and all(is_rollup(t) for t in seg.tables):
                continue
            if step_range is not None and self._skippable(seg, "step", seg.step_min, seg.step_max, step_range):
                continue
            if time_range is not None and self._skippable(seg, "ts_ns", seg.t_min, seg.t_max, time_range):
                continue
            for rank, table, cols in self._read_checked(seg, None):
                if not rollups and is_rollup(table):
                    continue
                trimmed = _trim(cols, step_range, time_range)
                if trimmed is not None:
                    yield rank, table, trimmed

    def poll(self) -> list[Batch]:
        """Follow mode: the batches of records completed since open or the previous poll."""
        if not self._follow:
            raise ConfigError("poll() needs a reader opened with open_recording(path, follow=True)")
        if self._footer:
            return []
        out: list[Batch] = []
        self._scan_forward(self._tail_scan, on_batches=out.extend)
        return [b for b in out if not is_rollup(b[1])]

    def verify(self) -> dict[str, dict[str, Any]]:
        """Read and check every record from the header to the end of the file.

        Damage found is added to ``integrity``; returns per-table statistics of what decoded
        (``rows``, ``ranks``, ``step_min/max``, ``t_min/max``).
        """
        stats = TableStats()
        self._scan_forward(_Scan(self._data_start), on_batches=stats.account, verifying=True)
        return stats.result()

    def inspect(self) -> dict[str, Any]:
        """Everything ``traceml inspect --json`` prints; reads and checks the whole file."""
        stats = self.verify()
        return inspect_report(self, stats, file_bytes=self._size(), sync=self._sync)

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> TmlReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TmlReader({str(self._path)!r}, segments={len(self._segments)}, {self.integrity['status']})"

    # --- opening --------------------------------------------------------------------

    def _load(self) -> None:
        size = self._size()
        magic = self._pread(0, MAGIC_SIZE)
        if len(magic) < MAGIC_SIZE and MAGIC.startswith(magic):
            raise TruncatedFileError(
                f"{self._path} is {size} bytes: it ends inside the 8-byte .tml magic"
                + (" (the writer may not have started yet)" if self._follow else "")
            )
        try:
            _records.check_magic(magic)
        except FormatError as exc:
            raise type(exc)(f"{self._path} is not a readable .tml recording: {exc}") from exc
        self._read_header(size)
        self._tail_scan = _Scan(self._data_start)
        if not self._load_from_footer(size):
            self._load_crashed(size)

    def _read_header(self, size: int) -> None:
        try:
            self._read_header_record(size)
        except (TruncatedFileError, UnsupportedVersionError):
            raise  # a file that ends inside its HEADER holds nothing after it; a newer one is not ours
        except FormatError as exc:
            if not self._restore_header(size, exc):
                raise

    def _read_header_record(self, size: int) -> None:
        pos = MAGIC_SIZE
        if size - pos < FRAME_HEAD_SIZE:
            raise TruncatedFileError(f"{self._path} is {size} bytes: it ends inside the HEADER record")
        head = self._pread(pos, FRAME_HEAD_SIZE)
        self._sync = head[:SYNC_SIZE]
        try:
            kind, length, payload = self._read_record_parts(pos, size)
        except TruncatedFileError as exc:
            raise TruncatedFileError(f"{self._path}: {exc}; the file ends inside its HEADER record") from exc
        except FormatError as exc:
            raise type(exc)(f"{self._path}: the HEADER record is unreadable: {exc}") from exc
        if kind != RecordKind.HEADER:
            raise CorruptRecordError(f"{self._path}: expected the HEADER record at byte {pos}; found kind {kind}")
        header, schemas = _records.parse_header(payload)
        if header["sync"] != self._sync:
            raise CorruptRecordError(f"{self._path}: the HEADER's sync marker differs from its record's")
        self._header = header
        self._schemas.update(schemas)
        self._data_start = pos + FRAME_OVERHEAD + length

    def _restore_header(self, size: int, damage: FormatError) -> bool:
        """The HEADER is damaged: find the sync marker, skip to the first intact record after the
        HEADER, and take the header from the copy in the last INDEX checkpoint (1.2), if any."""
        for sync in self._sync_candidates(size):
            self._sync = sync
            start = self._first_record_after(MAGIC_SIZE + 1, size)
            if start is None:
                continue
            self._data_start = start
            copy = self._header_copy(size)
            if copy is not None:
                offset, header, schemas = copy
                self._header = header
                self._schemas.update(schemas)
                self._header_restored = f"restored from the copy in the INDEX record at byte {offset}"
            else:
                self._header = _lost_header(sync)
                self._header_restored = (
                    "no copy of it in the file (written before format 1.2, or before its first index"
                    " checkpoint): the run id, hosts, command, world size and metadata are lost"
                )
            self._report(MAGIC_SIZE, start - MAGIC_SIZE, f"HEADER record damaged, {self._header_restored}: {damage}")
            return True
        self._sync = b""
        return False

    def _sync_candidates(self, size: int) -> list[bytes]:
        """Possible sync markers: the HEADER frame's own, then those named by ``sync`` keys of
        HEADER payloads (the damaged HEADER's, or the copies in INDEX records)."""
        found = [self._pread(MAGIC_SIZE, SYNC_SIZE)]
        key = _records.SYNC_KEY
        pos = MAGIC_SIZE
        while pos < size and len(found) < 16:
            window = self._pread(pos, _SEARCH_CHUNK + len(key) + SYNC_SIZE)
            at = window.find(key)
            while at >= 0 and len(found) < 16:
                candidate = window[at + len(key) : at + len(key) + SYNC_SIZE]
                if len(candidate) == SYNC_SIZE and candidate not in found:
                    found.append(candidate)
                at = window.find(key, at + 1)
            pos += _SEARCH_CHUNK
        return [c for c in found if len(c) == SYNC_SIZE]

    def _first_record_after(self, pos: int, size: int) -> int | None:
        """Offset of the first intact record (head and payload CRC) at or after *pos*."""
        while True:
            found = self._find_sync(pos, size)
            if found is None:
                return None
            try:
                self._read_record(found, size)
                return found
            except TruncatedFileError:
                return found  # the writer's unfinished last record: the forward scan reports it
            except FormatError:
                pos = found + 1

    def _header_copy(self, size: int) -> tuple[int, dict[str, Any], dict[str, TableSchema]] | None:
        found = self._find_last_index(size)
        if found is None:
            return None
        offset, _ = found
        try:
            _, payload, _ = self._read_record(offset, size)
            copy = _records.parse_index(payload).header
            if copy is None:
                return None
            header, schemas = _records.parse_header(copy)
        except FormatError:
            return None
        if header["sync"] != self._sync:
            return None
        return offset, header, schemas

    def _load_from_footer(self, size: int) -> bool:
        if size < self._data_start + FOOTER_SIZE:
            return False
        try:
            kind, payload, _ = self._read_record(size - FOOTER_SIZE, size)
            if kind != RecordKind.FOOTER:
                return False
            index_offset, summary_offset = _records.parse_footer(payload)
            chain = self._load_chain(index_offset, size)
            kind, payload, _ = self._read_record(summary_offset, size)
            if kind != RecordKind.SUMMARY:
                return False
            summary = _records.parse_summary(payload)
            self._register_chain(chain, size)
        except FormatError:
            return False
        self._summary = summary
        self._footer = True
        self._tail_scan = _Scan(size)
        return True

    def _load_crashed(self, size: int) -> None:
        start = self._data_start
        found = self._find_last_index(size)
        if found is not None:
            offset, total = found
            try:
                self._register_chain(self._load_chain(offset, size), size)
                start = offset + total
            except FormatError:
                start = self._data_start  # a broken chain: every record gets scanned instead
        self._tail_scan = _Scan(start)
        self._scan_forward(self._tail_scan, on_batches=None)

    def _load_chain(self, offset: int | None, size: int) -> list[IndexCheckpoint]:
        """The INDEX checkpoints from *offset* back to the first, oldest first."""
        chain: list[IndexCheckpoint] = []
        while offset is not None:
            if not self._data_start <= offset < size:
                raise CorruptRecordError(f"INDEX offset {offset} lies outside the file")
            kind, payload, _ = self._read_record(offset, size)
            if kind != RecordKind.INDEX:
                raise CorruptRecordError(f"expected an INDEX record at byte {offset}; found kind {kind}")
            checkpoint = _records.parse_index(payload)
            if checkpoint.prev is not None and checkpoint.prev >= offset:
                raise CorruptRecordError(f"INDEX at byte {offset} points forward to {checkpoint.prev}")
            chain.append(checkpoint)
            offset = checkpoint.prev
        chain.reverse()
        return chain

    def _register_chain(self, chain: list[IndexCheckpoint], size: int) -> None:
        """Adopt the entries of *chain*; raises (changing nothing) if an entry is impossible."""
        segments: list[SegmentInfo] = []
        documents = []
        for checkpoint in chain:
            for offset, length, head in checkpoint.segments:
                self._check_entry(offset, length, size)
                segments.append(SegmentInfo.from_head(offset, length, head))
            for entry in (*checkpoint.schemas, *checkpoint.attachments):
                self._check_entry(entry.offset, entry.length, size)
                documents.append(entry)
        for info in segments:
            self._add_segment(info)
        for entry in sorted(documents, key=lambda e: e.offset):
            try:
                kind, payload, total = self._read_record(entry.offset, size)
                if total != entry.length:
                    raise CorruptRecordError(f"record is {total} bytes; the index says {entry.length}")
                self._ingest(kind, payload, entry.offset, total, on_batches=None)
            except FormatError as exc:
                self._report(entry.offset, entry.length, f"{entry.name!r}: {exc}")

    def _check_entry(self, offset: int, length: int, size: int) -> None:
        if offset < self._data_start or length < FRAME_OVERHEAD or offset + length > size:
            raise CorruptRecordError(f"index entry ({offset}, {length}) lies outside the file of {size} bytes")

    def _find_last_index(self, size: int) -> tuple[int, int] | None:
        """Offset and length of the last valid INDEX record, searching backwards."""
        end = size
        while end > self._data_start:
            start = max(self._data_start, end - _SEARCH_CHUNK)
            window = self._pread(start, min(size, end + SYNC_SIZE - 1) - start)
            hits = []
            at = window.find(self._sync)
            while at >= 0 and start + at < end:
                hits.append(start + at)
                at = window.find(self._sync, at + 1)
            for offset in reversed(hits):
                head = self._pread(offset, FRAME_HEAD_SIZE)
                try:
                    kind, _ = _records.parse_frame_head(head, self._sync)
                    if kind != RecordKind.INDEX:
                        continue
                    _, payload, total = self._read_record(offset, size)
                    _records.parse_index(payload)
                except FormatError:
                    continue
                return offset, total
            end = start
        return None

    # --- scanning -------------------------------------------------------------------

    def _scan_forward(
        self, scan: _Scan, *, on_batches: Callable[[list[Batch]], None] | None, verifying: bool = False
    ) -> None:
        """Walk records from ``scan.pos`` to the end of the file, resyncing past damage."""
        size = self._size()
        while True:
            if scan.resync_from is not None:
                found = self._find_sync(scan.pos, size)
                if found is None:
                    if self._follow:  # the next marker may not be written yet
                        scan.pos = max(scan.pos, size - SYNC_SIZE + 1)
                        return
                    self._report(scan.resync_from, size - scan.resync_from, scan.reason)
                    scan.resync_from, scan.pos = None, size
                    return
                self._report(scan.resync_from, found - scan.resync_from, scan.reason)
                scan.resync_from, scan.pos = None, found
            if scan.pos >= size:
                return
            try:
                kind, payload, total = self._read_record(scan.pos, size)
            except TruncatedFileError as exc:
                if not self._follow:
                    self._tail = {
                        "offset": scan.pos,
                        "length": size - scan.pos,
                        "reason": f"incomplete record at the end of the file (writer did not finish): {exc}",
                    }
                    scan.pos = size
                return
            except FormatError as exc:
                scan.resync_from, scan.reason = scan.pos, str(exc)
                scan.pos += 1
                continue
            self._ingest(kind, payload, scan.pos, total, on_batches=on_batches, verifying=verifying)
            scan.pos += total

    def _ingest(
        self,
        kind: int,
        payload: memoryview,
        offset: int,
        total: int,
        *,
        on_batches: Callable[[list[Batch]], None] | None,
        verifying: bool = False,
    ) -> None:
        try:
            if kind == RecordKind.SEGMENT:
                head, _ = _segment.parse_segment_head(payload)
                if self._add_segment(SegmentInfo.from_head(offset, total, head)) and on_batches is not None:
                    on_batches([(rank, table, cols) for rank, table, _, cols in self._decode(payload, None)])
            elif kind == RecordKind.ATTACHMENT:
                name, data = _records.parse_attachment(payload)
                if not verifying:  # verify() checks records; it does not change what was read
                    self._attachments.pop(name, None)
                    self._attachments[name] = data
            elif kind == RecordKind.SCHEMA:
                schema = _records.parse_schema(_records.unpack(payload, "SCHEMA"))
                self._schemas.setdefault(schema.name, schema)
            elif kind == RecordKind.SUMMARY:
                summary = _records.parse_summary(payload)
                if not verifying:
                    self._summary = summary
            elif kind == RecordKind.FOOTER:
                _records.parse_footer(payload)
                if not verifying:
                    self._footer = True
            elif kind == RecordKind.INDEX:
                _records.parse_index(payload)  # checked only: the scan sees every record itself
            # HEADER again, unknown and private kinds: skip
        except FormatError as exc:
            self._report(offset, total, f"{_kind_name(kind)} record: {exc}")

    def _add_segment(self, info: SegmentInfo) -> bool:
        """Register a segment; False when it is not to be read (over the cap, or a byte-identical
        copy of one already registered: its rows are counted once, and the copy is reported)."""
        if info.offset in self._segment_offsets:
            return True
        if info.raw_size > self._limits.max_decompressed_bytes:
            self._report(
                info.offset,
                info.length,
                f"SEGMENT at byte {info.offset} declares {info.raw_size} decompressed bytes, over the"
                f" {_mib(self._limits.max_decompressed_bytes)} cap (raise ReadLimits.max_decompressed_bytes to read it)",
            )
            return False
        key = (
            info.length,
            info.raw_size,
            info.t_min,
            info.t_max,
            info.step_min,
            info.step_max,
            tuple(sorted(info.rows.items())),
        )
        same_head = self._segment_heads.setdefault(key, [])
        original = next((off for off in same_head if self._same_record(off, info.offset, info.length)), None)
        if original is not None:
            self._report(
                info.offset,
                info.length,
                f"SEGMENT at byte {info.offset} is a byte-identical copy of the SEGMENT at byte {original}"
                " (same ranks, tables and rows): its rows are counted once",
            )
            return False
        same_head.append(info.offset)
        self._segment_offsets.add(info.offset)
        if self._segments and self._segments[-1].offset > info.offset:
            at = next(i for i, seg in enumerate(self._segments) if seg.offset > info.offset)
            self._segments.insert(at, info)
        else:
            self._segments.append(info)
        return True

    def _same_record(self, a: int, b: int, length: int) -> bool:
        """Whether the records at *a* and *b* (both *length* bytes) hold the same bytes after the sync."""
        step = _SEARCH_CHUNK
        for at in range(SYNC_SIZE, length, step):
            n = min(step, length - at)
            if self._pread(a + at, n) != self._pread(b + at, n):
                return False
        return True

    def _find_sync(self, start: int, size: int) -> int | None:
        pos = start
        while pos < size:
            end = min(size, pos + _SEARCH_CHUNK)
            at = self._pread(pos, end - pos).find(self._sync)
            if at >= 0:
                return pos + at
            if end >= size:
                return None
            pos = end - SYNC_SIZE + 1
        return None

    # --- records --------------------------------------------------------------------

    def _read_record_parts(self, offset: int, size: int) -> tuple[int, int, memoryview]:
        if size - offset < FRAME_HEAD_SIZE:
            raise TruncatedFileError(f"{size - offset} bytes left at byte {offset}, less than a record head")
        kind, length = _records.parse_frame_head(self._pread(offset, FRAME_HEAD_SIZE), self._sync)
        limit = self._limits.max_record_bytes
        if length > limit:
            raise RecordTooLargeError(
                f"{_kind_name(kind)} record at byte {offset} declares {length} bytes, over the {_mib(limit)} record"
                " limit (raise ReadLimits.max_record_bytes, e.g. open_recording(path, limits=ReadLimits("
                "max_record_bytes=...)), only for a file you trust)"
            )
        if offset + FRAME_OVERHEAD + length > size:
            raise TruncatedFileError(
                f"{_kind_name(kind)} record at byte {offset} needs {FRAME_OVERHEAD + length} bytes;"
                f" {size - offset} are present"
            )
        body = self._pread(offset + FRAME_HEAD_SIZE, length + 4)
        if len(body) != length + 4:
            raise TruncatedFileError(f"the file shrank while reading the record at byte {offset}")
        try:
            payload = _records.split_payload(body)
        except CorruptRecordError as exc:
            raise CorruptRecordError(f"{_kind_name(kind)} record at byte {offset}: {exc}") from exc
        return kind, length, payload

    def _read_record(self, offset: int, size: int) -> tuple[int, memoryview, int]:
        """``(kind, payload, record length)`` of the record at *offset*, checked."""
        kind, length, payload = self._read_record_parts(offset, size)
        return kind, payload, FRAME_OVERHEAD + length

    def _decode(
        self,
        payload: memoryview,
        wanted: set[tuple[int, str]] | None,
        dest: Mapping[tuple[int, str], Mapping[str, np.ndarray]] | None = None,
    ) -> list[tuple[int, str, TableSchema, dict[str, np.ndarray]]]:
        decoded = _segment.decode_segment(
            payload, self._decompressor, self._limits.max_decompressed_bytes, wanted, dest
        )
        for _, table, schema, _ in decoded:
            self._schemas.setdefault(table, schema)
        return decoded

    def _read_checked(
        self,
        seg: SegmentInfo,
        wanted: set[tuple[int, str]] | None,
        dest: Mapping[tuple[int, str], Mapping[str, np.ndarray]] | None = None,
    ) -> list[Batch]:
        """Decode *seg* (into *dest* where given); damage is reported in ``integrity`` and yields nothing."""
        try:
            kind, payload, total = self._read_record(seg.offset, self._size())
            if kind != RecordKind.SEGMENT or total != seg.length:
                raise CorruptRecordError(f"expected a SEGMENT of {seg.length} bytes; found kind {kind} of {total}")
            decoded = self._decode(payload, wanted, dest)
            if dest is not None and any(
                len(next(iter(cols.values()), ())) != seg.rows[(r, t)] for r, t, _, cols in decoded
            ):
                raise CorruptRecordError("segment rows differ from its index entry")
            return [(rank, table, cols) for rank, table, _, cols in decoded]
        except FormatError as exc:
            self._report(seg.offset, seg.length, f"SEGMENT at byte {seg.offset}: {exc}")
            return []

    def _report(self, offset: int, length: int, reason: str) -> None:
        if offset not in self._skipped:
            self._skipped[offset] = {"offset": offset, "length": length, "reason": reason}

    def _has_column(self, table: str, column: str) -> bool:
        schema = self._schemas.get(table)
        return schema is not None and column in schema.names

    def _skippable(self, seg: SegmentInfo, column: str, lo: int | None, hi: int | None, rng: Range) -> bool:
        """A segment may be skipped for a range only if every table in it is filtered by that column."""
        return _disjoint(lo, hi, rng) and all(self._has_column(t, column) for t in seg.tables)

    def _size(self) -> int:
        try:
            return os.fstat(self._fd).st_size
        except OSError as exc:
            raise FormatError(f"cannot stat {self._path}: {exc.strerror or exc}") from exc

    def _pread(self, offset: int, n: int) -> bytes:
        try:
            return os.pread(self._fd, n, offset)
        except OSError as exc:
            raise FormatError(f"reading {self._path} at byte {offset} failed: {exc.strerror or exc}") from exc


def _kind_name(kind: int) -> str:
    try:
        return RecordKind(kind).name
    except ValueError:
        return f"kind-{kind:#04x}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n}-byte"


def _lost_header(sync: bytes) -> dict[str, Any]:
    """The header of a file whose HEADER is damaged and has no copy: every field empty or unknown."""
    return {
        "format_version": "",
        "writer": "",
        "run_id": "",
        "created_ns": 0,
        "hosts": [],
        "world_size": -1,
        "command": [],
        "meta": {},
        "schemas": {},
        "sync": sync,
        "rollup_steps": None,
    }
