"""``open_recording``: the queries over a ``.tml`` file, closed, crashed, damaged or still
growing (tables by rank and range, rollups, batches, follow-mode polls, verify and inspect).
Locating the records is :mod:`traceml.format._locate`'s; only ``traceml.errors`` types escape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from traceml import names
from traceml.errors import ConfigError, CorruptRecordError, FormatError, ReadLimitError
from traceml.format import _segment, rollup
from traceml.format._locate import LocatedFile, ReadLimits, _Scan
from traceml.format._records import RecordKind, SegmentInfo
from traceml.format._slice import Range, _concat, _disjoint, _inside, _rows, _trim
from traceml.format.inspect import Batch, TableStats, inspect_report
from traceml.schema import NUMPY_DTYPES, STR, TableSchema, is_rollup, rollup_schema

#: the upper bound of "every step after" in a step range
_MAX_STEP = (1 << 63) - 1


def _row_bytes(schema: TableSchema) -> int:
    """Bytes a decoded row of *schema* takes in arrays (as ``_segment.decoded_bytes`` counts them)."""
    return sum(_segment.STR_VALUE_BYTES if c.dtype == STR else NUMPY_DTYPES[c.dtype].itemsize for c in schema.columns)


def _array_bytes(array: np.ndarray) -> int:
    """Bytes of a decoded column as ``_segment.decoded_bytes`` counts them (str values by their cost)."""
    return len(array) * _segment.STR_VALUE_BYTES if array.dtype == object else int(array.nbytes)


def open_recording(
    path: str | os.PathLike[str], *, follow: bool = False, limits: ReadLimits | None = None
) -> TmlReader:
    """Open a ``.tml`` recording.  ``follow=True`` tails a file that is still being written."""
    return TmlReader(path, follow=follow, limits=limits)


class TmlReader(LocatedFile):
    """A ``.tml`` recording opened for reading (see :func:`open_recording`).  One thread."""

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
        skipped = self._skipped_spans()
        if self._tail is not None:
            skipped.append(dict(self._tail))
        lost = sum(s["length"] for s in skipped)
        bad_names = self.name_problems()
        if self._skipped or self._unlisted:
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
            if schema is not None and claimed * _row_bytes(schema) > self._limits.max_decoded_bytes:
                # decoding it would be refused (ReadLimits.max_decoded_bytes): do not size arrays by it
                self._report(seg.offset, seg.length, f"SEGMENT at byte {seg.offset}: {claimed} rows of {table}"
                             f" would decode to more than ReadLimits.max_decoded_bytes"
                             f" ({self._limits.max_decoded_bytes})")  # fmt: skip
                continue
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
        if schema is not None:
            self._check_expansion(table, sum(capacity.values()) * _row_bytes(schema), selected)
        if schema is None:  # its SCHEMA record is lost: decode segment by segment
            parts: dict[int, list[dict[str, np.ndarray]]] = {}
            held = 0
            for seg, wanted, _ in selected:
                for rank, _, cols in self._read_checked(seg, wanted):
                    trimmed = _trim(cols, step_range, time_range)
                    if trimmed is not None:
                        parts.setdefault(rank, []).append(trimmed)
                        held += sum(_array_bytes(a) for a in trimmed.values())
                self._check_expansion(table, held, selected)
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

    def __enter__(self) -> TmlReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TmlReader({str(self._path)!r}, segments={len(self._segments)}, {self.integrity['status']})"

    # --- reading segments ---------------------------------------------------------

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

    def _check_expansion(self, table: str, claimed: int, selected: list[tuple[SegmentInfo, Any, bool]]) -> None:
        """Refuse a read whose arrays, sized by the rows the index claims, would exceed both
        ``max_decoded_bytes`` and ``max_expansion`` times the bytes of the segments read: bodies
        that decompress to zeros can claim rows cheaply, and real recordings stay under 10x."""
        limits = self._limits
        stored = sum(seg.length for seg, _, _ in selected)
        allowed = max(limits.max_decoded_bytes, limits.max_expansion * stored)
        if claimed > allowed:
            raise ReadLimitError(
                f"read_table({table[:40]!r}): bytes of arrays for the rows the index claims in {len(selected)}"
                f" segments of {stored} bytes",
                claimed,
                allowed,
                setting="max_expansion",
            )

    def _has_column(self, table: str, column: str) -> bool:
        schema = self._schemas.get(table)
        return schema is not None and column in schema.names

    def _skippable(self, seg: SegmentInfo, column: str, lo: int | None, hi: int | None, rng: Range) -> bool:
        """A segment may be skipped for a range only if every table in it is filtered by that column."""
        return _disjoint(lo, hi, rng) and all(self._has_column(t, column) for t in seg.tables)
