"""Locating a ``.tml`` file's records: the HEADER (or its copy), then the index from the footer,
else the last INDEX checkpoint's chain plus a forward scan that resyncs on the sync marker past
damage (reported in ``integrity``).  Every length read is bounded before anything is allocated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from traceml.errors import (
    CorruptRecordError,
    DecompressionBombError,
    FormatError,
    ReadLimitError,
    RecordTooLargeError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from traceml.format import _records, _segment
from traceml.format._records import (
    FOOTER_SIZE,
    FRAME_HEAD_SIZE,
    FRAME_OVERHEAD,
    MAGIC,
    MAGIC_SIZE,
    SYNC_SIZE,
    IndexCheckpoint,
    ReadLimits,
    RecordKind,
    SegmentInfo,
)
from traceml.format.inspect import Batch
from traceml.schema import TableSchema

_SEARCH_CHUNK = 1 << 20
#: what to change when a record or a segment is over the reader's limits
_RAISE_RECORD_LIMIT = (
    "raise ReadLimits.max_record_bytes, e.g. open_recording(path, limits=ReadLimits(max_record_bytes=...)),"
    " only for a file you trust"
)
_RAISE_CAP = "raise ReadLimits.max_decompressed_bytes to read it"


class _IndexLie(CorruptRecordError):
    """Index entries that cannot all be true (a segment listed twice, or overlapping another)."""


@dataclass
class _Scan:
    """Where a forward scan stands: next record offset, or a damaged span being skipped."""

    pos: int
    resync_from: int | None = None
    reason: str = ""


class LocatedFile:
    """An open ``.tml`` file with its records located: header, schemas, segments (the index),
    attachments, summary and the damage skipped.  :class:`~traceml.format.reader.TmlReader` adds
    the queries.  One thread."""

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
        #: what the file's segments and schemas hold so far, checked against the per-file limits
        self._table_names: set[str] = set()
        self._rank_set: set[int] = set()
        self._stream_count = 0
        self._column_count = 0
        #: msgpack objects of each attachment kept (``max_attachment_objects`` bounds their sum)
        self._attachment_objects: dict[str, int] = {}
        self._attachment_total = 0
        #: damaged or skipped spans past ``limits.max_skipped_spans``: offsets (counted once), bytes
        self._unlisted: set[int] = set()
        self._unlisted_bytes = 0
        try:
            self._fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise FormatError(f"cannot open recording {self._path}: {exc.strerror or exc}") from exc
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

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
            raise exc.within(f"{self._path} is not a readable .tml recording") from exc
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
            raise exc.within(f"{self._path}: the HEADER record is unreadable") from exc
        if kind != RecordKind.HEADER:
            raise CorruptRecordError(f"{self._path}: expected the HEADER record at byte {pos}; found kind {kind}")
        header, schemas = _records.parse_header(payload, self._limits)
        if header["sync"] != self._sync:
            raise CorruptRecordError(f"{self._path}: the HEADER's sync marker differs from its record's")
        self._header = header
        self._schemas.update(schemas)
        self._table_names.update(schemas)
        self._column_count = sum(len(s.columns) for s in self._schemas.values())
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
                self._table_names.update(schemas)
                self._column_count = sum(len(s.columns) for s in self._schemas.values())
                self._header_restored = f"restored from the copy in the INDEX record at byte {offset}"
            else:
                self._header = _records.lost_header(sync)
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
            copy = _records.parse_index(payload, self._limits).header
            if copy is None:
                return None
            header, schemas = _records.parse_header(copy, self._limits)
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
            summary = _records.parse_summary(payload, self._limits)
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
            except (ReadLimitError, _IndexLie) as exc:  # intact records that lie or exceed a limit: say so
                self._report(offset, total, f"INDEX chain not used ({exc}); every record was scanned instead")
                start = self._data_start
            except FormatError:
                start = self._data_start  # a broken chain: every record gets scanned instead
        self._tail_scan = _Scan(start)
        self._scan_forward(self._tail_scan, on_batches=None)

    def _load_chain(self, offset: int | None, size: int) -> list[IndexCheckpoint]:
        """The INDEX checkpoints from *offset* back to the first, oldest first."""
        chain: list[IndexCheckpoint] = []
        entries = 0
        while offset is not None:
            if not self._data_start <= offset < size:
                raise CorruptRecordError(f"INDEX offset {offset} lies outside the file")
            kind, payload, _ = self._read_record(offset, size)
            if kind != RecordKind.INDEX:
                raise CorruptRecordError(f"expected an INDEX record at byte {offset}; found kind {kind}")
            checkpoint = _records.parse_index(payload, self._limits)
            if checkpoint.prev is not None and checkpoint.prev >= offset:
                raise CorruptRecordError(f"INDEX at byte {offset} points forward to {checkpoint.prev}")
            entries += len(checkpoint.segments)
            if entries > self._limits.max_segments:
                raise ReadLimitError("INDEX chain segment entries", entries, self._limits.max_segments,
                                     setting="max_segments", offset=offset)  # fmt: skip
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
        end = self._data_start
        for info in sorted(segments, key=lambda seg: seg.offset):
            if info.offset < end:  # a writer lists each segment once: overlaps are lies (and cost memory)
                raise _IndexLie(f"index entry for the SEGMENT at byte {info.offset} overlaps the one before it")
            end = info.offset + info.length
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
                    _records.parse_index(payload, self._limits)
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
                head, _ = _segment.parse_segment_head(payload, self._limits)
                if self._add_segment(SegmentInfo.from_head(offset, total, head)) and on_batches is not None:
                    on_batches([(rank, table, cols) for rank, table, _, cols in self._decode(payload, None)])
            elif kind == RecordKind.ATTACHMENT:
                kept = self._attachment_total
                budget = self._limits.max_attachment_objects - kept if not verifying else None
                name, data, objects = _records.parse_attachment(payload, self._limits, budget)
                if not verifying:  # verify() checks records; it does not change what was read
                    if kept - self._attachment_objects.get(name, 0) + objects > self._limits.max_attachment_objects:
                        raise ReadLimitError("msgpack objects of the attachments kept", kept + objects,
                                             self._limits.max_attachment_objects, setting="max_attachment_objects",
                                             offset=offset)  # fmt: skip
                    self._attachments.pop(name, None)
                    self._attachments[name] = data
                    self._attachment_total = kept - self._attachment_objects.get(name, 0) + objects
                    self._attachment_objects[name] = objects
            elif kind == RecordKind.SCHEMA:
                schema = _records.parse_schema(
                    _records.unpack(payload, "SCHEMA", self._limits.max_record_objects), self._limits
                )
                self._add_schema(schema, offset)
            elif kind == RecordKind.SUMMARY:
                summary = _records.parse_summary(payload, self._limits)
                if not verifying:
                    self._summary = summary
            elif kind == RecordKind.FOOTER:
                _records.parse_footer(payload)
                if not verifying:
                    self._footer = True
            elif kind == RecordKind.INDEX:
                _records.parse_index(payload, self._limits)  # checked only: the scan sees every record itself
            # HEADER again, unknown and private kinds: skip
        except FormatError as exc:
            self._report(offset, total, f"{_kind_name(kind)} record: {exc}")

    def _add_segment(self, info: SegmentInfo) -> bool:
        """Register a segment; False when it is not to be read (over the cap, or a byte-identical
        copy of one already registered: its rows are counted once, and the copy is reported)."""
        if info.offset in self._segment_offsets:
            return True
        if info.raw_size > self._limits.max_decompressed_bytes:
            cap = self._limits.max_decompressed_bytes
            bomb = DecompressionBombError("SEGMENT", info.raw_size, cap, offset=info.offset, setting=_RAISE_CAP)
            self._report(info.offset, info.length, str(bomb))
            return False
        over = self._over_file_limits(info)
        if over is not None:
            self._report(info.offset, info.length, f"SEGMENT skipped: {over}")
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
        self._table_names.update(table for _, table in info.rows)
        self._rank_set.update(info.ranks)
        self._stream_count += len(info.rows)
        if self._segments and self._segments[-1].offset > info.offset:
            at = next(i for i, seg in enumerate(self._segments) if seg.offset > info.offset)
            self._segments.insert(at, info)
        else:
            self._segments.append(info)
        return True

    def _over_file_limits(self, info: SegmentInfo) -> ReadLimitError | None:
        """The per-file limit that registering *info* would exceed, if any."""
        limits = self._limits
        if len(self._segments) >= limits.max_segments:
            return ReadLimitError("segments in the file", len(self._segments) + 1, limits.max_segments,
                                  setting="max_segments", offset=info.offset)  # fmt: skip
        if self._stream_count + len(info.rows) > limits.max_index_streams:
            return ReadLimitError("(rank, table) streams in the file's segments", self._stream_count + len(info.rows),
                                  limits.max_index_streams, setting="max_index_streams", offset=info.offset)  # fmt: skip
        tables = len(self._table_names) + sum(1 for t in info.tables if t not in self._table_names)
        if tables > limits.max_tables:
            return ReadLimitError("tables in the file", tables, limits.max_tables, setting="max_tables",
                                  offset=info.offset)  # fmt: skip
        ranks = len(self._rank_set) + sum(1 for r in info.ranks if r not in self._rank_set)
        if ranks > limits.max_ranks:
            return ReadLimitError("ranks in the file", ranks, limits.max_ranks, setting="max_ranks",
                                  offset=info.offset)  # fmt: skip
        return None

    def _add_schema(self, schema: TableSchema, offset: int | None) -> None:
        """Adopt a table's schema (the first one read wins), within ``max_tables``."""
        if schema.name in self._schemas:
            return
        if schema.name not in self._table_names and len(self._table_names) >= self._limits.max_tables:
            raise ReadLimitError("tables in the file", len(self._table_names) + 1, self._limits.max_tables,
                                 setting="max_tables", offset=offset)  # fmt: skip
        columns = self._column_count + len(schema.columns)
        if columns > self._limits.max_schema_columns:
            raise ReadLimitError("columns summed over the file's tables", columns, self._limits.max_schema_columns,
                                 setting="max_schema_columns", offset=offset)  # fmt: skip
        self._table_names.add(schema.name)
        self._schemas[schema.name] = schema
        self._column_count = columns

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
            raise RecordTooLargeError(_kind_name(kind), length, limit, offset=offset, setting=_RAISE_RECORD_LIMIT)
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
        decoded = _segment.decode_segment(payload, self._decompressor, self._limits, wanted, dest)
        for _, table, schema, _ in decoded:
            if table not in self._schemas:
                self._add_schema(schema, None)
        return decoded

    def _report(self, offset: int, length: int, reason: str) -> None:
        if offset in self._skipped or offset in self._unlisted:
            return
        if len(self._skipped) < self._limits.max_skipped_spans:
            self._skipped[offset] = {"offset": offset, "length": length, "reason": reason}
        else:  # counted, not listed: a file of a million damaged records must not cost a million notes
            self._unlisted.add(offset)
            self._unlisted_bytes += length

    def _skipped_spans(self) -> list[dict[str, Any]]:
        """The spans skipped, in file order, with one entry counting those past ``max_skipped_spans``."""
        spans = sorted(self._skipped.values(), key=lambda s: s["offset"])
        if self._unlisted:
            spans.append(
                {
                    "offset": min(self._unlisted),
                    "length": self._unlisted_bytes,
                    "reason": f"{len(self._unlisted)} more damaged or skipped spans, not listed one by one"
                    f" (over ReadLimits.max_skipped_spans = {self._limits.max_skipped_spans})",
                }
            )
        return spans

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
