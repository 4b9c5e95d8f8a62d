"""Crafted ``.tml`` files that try to make a reader allocate far more memory than the file holds.

Each builder writes a file of valid frames (correct sync markers and CRCs) whose payloads lie or
amplify: msgpack made of empty containers, an INDEX listing one segment millions of times, a
segment head with millions of streams, schemas with thousands of tables and columns, bodies of
zeros that decode to wide arrays, millions of tiny segments.  Shared by the security tests (small
sizes) and ``benchmarks/bench_crafted_recordings.py`` (large sizes, peak RSS per command).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from traceml.format import _records
from traceml.format._records import MAGIC, RecordKind
from traceml.schema import Column, TableSchema

SYNC = bytes(range(16))
_U32 = struct.Struct("<I")


class Crafter:
    """Writes records one after the other and remembers where each one went."""

    def __init__(self, path: Path, *, schemas: Iterable[TableSchema] = ()) -> None:
        self.path = path
        self._f = path.open("wb")
        self._f.write(MAGIC)
        self.offset = len(MAGIC)
        self.segments: list[tuple[int, int, _records.SegmentHead]] = []
        header = _records.header_payload(
            writer="crafted",
            run_id="crafted",
            created_ns=0,
            hosts=["h"],
            world_size=1,
            command=["x"],
            meta={},
            schemas=list(schemas),
            sync=SYNC,
        )
        self.header = header
        self.record(RecordKind.HEADER, header)

    def record(self, kind: int, payload: bytes) -> int:
        offset = self.offset
        data = _records.pack_record(SYNC, kind, payload)
        self._f.write(data)
        self.offset += len(data)
        return offset

    def segment(self, head: dict[str, Any], body: bytes, *, compress: bool = True) -> int:
        """A SEGMENT with *head* (``raw_size`` filled in from *body* unless given)."""
        head = {"codec": "zstd", "t_min": None, "t_max": None, "step_min": None, "step_max": None, **head}
        head.setdefault("raw_size", len(body))
        head_bytes = _records.pack_map(head)
        frame = zstandard.ZstdCompressor(level=3).compress(body) if compress else body
        payload = _U32.pack(len(head_bytes)) + head_bytes + frame
        offset = self.record(RecordKind.SEGMENT, payload)
        streams = tuple((r, head["tables"][t], n) for r, t, n in head["streams"])
        self.segments.append(
            (offset, self.offset - offset, _records.SegmentHead(None, None, None, None, streams, head["raw_size"]))
        )
        return offset

    def close(self, *, index: bytes | None = None, footer: bool = True) -> Path:
        """Finish the file: an INDEX (*index*, or one listing the segments written), SUMMARY, FOOTER."""
        if footer:
            if index is None:
                index = _records.index_payload(
                    prev=None, final=True, segments=self.segments, attachments=(), schemas=(), header=self.header
                )
            index_at = self.record(RecordKind.INDEX, index)
            summary_at = self.record(RecordKind.SUMMARY, _records.pack_map({"segments": len(self.segments)}))
            self.record(RecordKind.FOOTER, _records.footer_payload(index_at, summary_at))
        self._f.close()
        return self.path


def body(groups: list[list[list[Any]]], blobs: Iterable[bytes]) -> bytes:
    layout = msgpack.packb(groups, use_bin_type=True)
    return b"".join([_U32.pack(len(layout)), layout, *blobs])


def empty_arrays(n: int) -> bytes:
    """A msgpack array of *n* empty arrays: one byte each on disk, a Python list each in memory."""
    return b"\xdd" + struct.pack(">I", n) + b"\x90" * n


# --- the builders: each writes *path* and returns it --------------------------------------------


def attachment_of_empty_arrays(path: Path, n: int) -> Path:
    """An ATTACHMENT whose data is *n* empty arrays (about *n* bytes), no index (a crashed writer's)."""
    c = Crafter(path)
    name = msgpack.packb("x")
    c.record(RecordKind.ATTACHMENT, b"\x82\xa4name" + name + b"\xa4data\x81\xa1a" + empty_arrays(n))
    return c.close(footer=False)


def index_repeating_one_segment(path: Path, n: int) -> Path:
    """A clean file whose final INDEX lists its one real segment *n* times (about 20 bytes each)."""
    c = Crafter(path)
    c.segment({"tables": ["t"], "streams": [[0, 0, 1]]}, body([[["v", "u1", "shuffle", 1, []]]], [b"\x07"]))
    c.segments = c.segments * n
    return c.close()


def segment_with_many_streams(path: Path, n: int) -> Path:
    """A SEGMENT whose head lists *n* streams (ranks 0..n-1, one row each) of a tiny body, no index."""
    c = Crafter(path)
    c.segment(
        {"tables": ["t"], "streams": [[r, 0, 1] for r in range(n)], "raw_size": 4 * n + 8},
        b"\x00" * 16,
    )
    return c.close(footer=False)


def wide_schemas(path: Path, tables: int, columns: int) -> Path:
    """*tables* SCHEMA records of *columns* ``u1`` columns each, and no rows."""
    c = Crafter(path)
    cols = tuple(Column(f"c{i}", "u1") for i in range(columns))
    for t in range(tables):
        c.record(RecordKind.SCHEMA, _records.schema_payload(TableSchema(f"t{t}", cols)))
    return c.close(footer=False)


def zero_rows(
    path: Path, rows: int, columns: int, *, segments: int = 1, dtype: str = "i8", schema: bool = False
) -> Path:
    """*segments* segments of *rows* rows x *columns* columns of zeros, each column stored ``for``
    at one byte a row: a body of about rows x columns bytes that compresses to almost nothing and
    decodes to 8 bytes a value (``str`` columns: one empty string, 1 byte on disk, 16 in memory);
    with *schema*, the HEADER holds the table's schema (readers then size arrays from the index)."""
    table = TableSchema("t", tuple(Column(f"c{i}", dtype) for i in range(columns)))
    c = Crafter(path, schemas=[table] if schema else ())
    if dtype == "str":
        entry: Callable[[int], list[Any]] = lambda i: [f"c{i}", "str", "msgpack", 5 + rows, []]  # noqa: E731
        blob = b"\xdd" + struct.pack(">I", rows) + b"\xa0" * rows
    else:
        entry = lambda i: [f"c{i}", dtype, "for", rows, [0, 1]]  # noqa: E731
        blob = b"\x00" * rows
    for seq in range(segments):
        c.segment(
            {"tables": ["t"], "streams": [[0, 0, rows]], "seq": seq},
            body([[entry(i) for i in range(columns)]], [blob] * columns),
        )
    return c.close()


def tiny_segments(path: Path, n: int, *, footer: bool = True) -> Path:
    """*n* segments of one row each (rank = segment number), about 90 bytes each."""
    c = Crafter(path)
    payload = body([[["v", "u1", "shuffle", 1, []]]], [b"\x07"])
    for seq in range(n):
        c.segment({"tables": ["t"], "streams": [[seq, 0, 1]], "seq": seq}, payload)
    return c.close(footer=footer)


BUILDERS: dict[str, Callable[..., Path]] = {
    "attachment_of_empty_arrays": attachment_of_empty_arrays,
    "index_repeating_one_segment": index_repeating_one_segment,
    "segment_with_many_streams": segment_with_many_streams,
    "wide_schemas": wide_schemas,
    "zero_rows": zero_rows,
    "tiny_segments": tiny_segments,
}
