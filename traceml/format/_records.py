"""The only code that knows the bytes of a ``.tml`` file (spec: ``docs/format.md``).

Every unpacking function validates what it reads and raises only ``traceml.errors`` types.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from traceml.errors import (
    CorruptRecordError,
    NotATmlFileError,
    ReadLimitError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from traceml.schema import TableSchema

FORMAT_MAJOR = 1
FORMAT_MINOR = 2
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

_MAGIC_PREFIX = b"\x89TML"
_MAGIC_SUFFIX = b"\r\n\x1a"
MAGIC = _MAGIC_PREFIX + str(FORMAT_MAJOR).encode() + _MAGIC_SUFFIX
MAGIC_SIZE = len(MAGIC)

SYNC_SIZE = 16
#: sync(16) | kind u8 | length u32 | head_crc u32
_FRAME_HEAD = struct.Struct("<16sBII")
FRAME_HEAD_SIZE = _FRAME_HEAD.size
_U32 = struct.Struct("<I")
#: head + payload crc: a record is FRAME_OVERHEAD + payload length bytes
FRAME_OVERHEAD = FRAME_HEAD_SIZE + _U32.size

_FOOTER_PAYLOAD = struct.Struct("<QQ8s")
_FOOTER_END = b"TMLEND\r\n"
FOOTER_SIZE = FRAME_OVERHEAD + _FOOTER_PAYLOAD.size

DEFAULT_MAX_RECORD_BYTES = 64 << 20
DEFAULT_MAX_DECOMPRESSED_BYTES = 256 << 20
#: msgpack objects (containers, items, map keys) one record payload may decode to: an empty array
#: is one byte on disk and a Python list of 56 bytes in memory, so size alone does not bound memory
DEFAULT_MAX_RECORD_OBJECTS = 1 << 20


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what a reader allocates for what a file declares (docs/format.md, "Reader limits");
    change them only for files you trust.  Over a limit, a record or segment is skipped and reported
    in ``integrity`` (the reader goes on), or opening fails with the limit's error."""

    #: bytes of one record's payload, checked before it is read
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    #: bytes one segment body decompresses to
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
    #: msgpack objects one record payload (or a segment's head or layout) decodes to
    max_record_objects: int = DEFAULT_MAX_RECORD_OBJECTS
    #: bytes of arrays one segment decodes to (8 a value for i8/f8, 72 a string plus its bytes)
    max_decoded_bytes: int = 256 << 20
    #: msgpack objects summed over the attachments kept (the last of each name), as counted above
    max_attachment_objects: int = 1 << 22
    #: bytes of arrays a ``read_table`` may size from the index per byte of the segments it reads,
    #: beyond ``max_decoded_bytes`` (real recordings decode to under 10x their stored bytes)
    max_expansion: int = 1024
    #: columns of one table (a SCHEMA, the HEADER's schemas, a segment's layout)
    max_columns: int = 4096
    #: distinct tables in a file (schemas and segments)
    max_tables: int = 4096
    #: columns summed over the file's table schemas (each costs about 200 bytes in memory)
    max_schema_columns: int = 1 << 18
    #: distinct ranks in a file
    max_ranks: int = 1 << 16
    #: segments indexed in a file (each costs a few hundred bytes of index in memory)
    max_segments: int = 1 << 20
    #: (rank, table) streams summed over the segments indexed
    max_index_streams: int = 1 << 22
    #: damaged spans listed one by one in ``integrity["skipped"]``; the rest are counted in one entry
    max_skipped_spans: int = 1000


DEFAULT_LIMITS = ReadLimits()


class RecordKind(IntEnum):
    """Record kinds; the names are the spec's headings."""

    HEADER = 0x01
    SCHEMA = 0x02
    SEGMENT = 0x03
    ATTACHMENT = 0x04
    INDEX = 0x05
    SUMMARY = 0x06
    FOOTER = 0x07


#: kinds traceml never assigns; readers skip them like any unknown kind
PRIVATE_KINDS = range(0xE0, 0x100)

# --- magic and framing -----------------------------------------------------------------


def check_magic(data: bytes) -> None:
    """Raise unless *data* (the first 8 bytes) is the magic of a major version we read."""
    if len(data) == MAGIC_SIZE and data.startswith(_MAGIC_PREFIX) and data.endswith(_MAGIC_SUFFIX):
        digit = data[len(_MAGIC_PREFIX)]
        if digit == MAGIC[len(_MAGIC_PREFIX)]:
            return
        if 0x30 <= digit <= 0x39:
            raise UnsupportedVersionError(
                f"file is .tml format version {chr(digit)}.x; this traceml reads version {FORMAT_VERSION}"
                f" (major {FORMAT_MAJOR}) only: upgrade traceml to read it"
            )
    raise NotATmlFileError(f"expected the .tml magic bytes {MAGIC!r} at the start of the file; found {data[:8]!r}")


def pack_record(sync: bytes, kind: int, payload: bytes) -> bytes:
    kind_len = struct.pack("<BI", kind, len(payload))
    head = sync + kind_len + _U32.pack(zlib.crc32(kind_len))
    return b"".join((head, payload, _U32.pack(zlib.crc32(payload))))


def parse_frame_head(head: bytes, sync: bytes) -> tuple[int, int]:
    """``(kind, payload length)`` of a 25-byte frame head; raises if it is not a valid head."""
    if len(head) != FRAME_HEAD_SIZE:
        raise TruncatedFileError(f"{len(head)} bytes where a {FRAME_HEAD_SIZE}-byte record head should be")
    marker, kind, length, head_crc = _FRAME_HEAD.unpack(head)
    if marker != sync:
        raise CorruptRecordError("no sync marker where a record should start")
    if zlib.crc32(head[SYNC_SIZE : SYNC_SIZE + 5]) != head_crc:
        raise CorruptRecordError("record head CRC mismatch (kind or length damaged)")
    return kind, length


def split_payload(body: bytes | memoryview) -> memoryview:
    """*body* is ``payload | u32 crc``; return the payload after checking the CRC."""
    view = memoryview(body)
    payload = view[:-4]
    (expected,) = _U32.unpack(view[-4:])
    if zlib.crc32(payload) != expected:
        raise CorruptRecordError(f"payload CRC mismatch ({len(payload)} bytes)")
    return payload


# --- msgpack ---------------------------------------------------------------------------


def _no_ext(code: int, data: bytes) -> Any:
    raise CorruptRecordError(f"msgpack extension type {code} is not used in .tml files")


_packer_strict = msgpack.Packer(use_bin_type=True)
_packer_lenient = msgpack.Packer(use_bin_type=True, unicode_errors="replace")


def pack_map(obj: Mapping[str, Any]) -> bytes:
    """Pack a msgpack map; raises TypeError/ValueError for values msgpack cannot hold."""
    return _packer_strict.pack(obj)


class _OverBudget(Exception):
    """Raised inside msgpack's hooks when a payload decodes to more objects than its budget."""


def unpack(data: bytes | memoryview, what: str, max_objects: int = DEFAULT_MAX_RECORD_OBJECTS) -> Any:
    """Unpack one msgpack object of at most *max_objects* objects (``ReadLimits.max_record_objects``:
    each container counts once, plus once per item and map key it holds, so ``[[]]`` is 3); string
    and container sizes are bounded by ``len(data)``."""
    return unpack_counted(data, what, max_objects)[0]


def unpack_counted(
    data: bytes | memoryview, what: str, max_objects: int, setting: str = "max_record_objects"
) -> tuple[Any, int]:
    """:func:`unpack`, and the objects counted; over *max_objects* the error names ``ReadLimits.<setting>``."""
    size = len(data)
    left = [max_objects]

    def count_list(items: list[Any]) -> list[Any]:
        left[0] -= 1 + len(items)
        if left[0] < 0:
            raise _OverBudget
        return items

    def count_map(items: dict[Any, Any]) -> dict[Any, Any]:
        left[0] -= 1 + 2 * len(items)
        if left[0] < 0:
            raise _OverBudget
        return items

    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            ext_hook=_no_ext,
            use_list=True,
            list_hook=count_list,
            object_hook=count_map,
            max_str_len=size,
            max_bin_len=size,
            # a container longer than the whole budget is refused at its header, before it is built
            max_array_len=min(size, max_objects),
            max_map_len=min(size // 2, max_objects // 2),
            max_ext_len=size,  # ext types are refused by ext_hook, naming them
        )
    except CorruptRecordError:
        raise
    except _OverBudget:
        raise ReadLimitError(f"{what} msgpack objects (at least)", max_objects - left[0], max_objects,
                             setting=setting) from None  # fmt: skip
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):
            raise ReadLimitError(
                f"{what} msgpack container of more than {max_objects} objects (at least)",
                max_objects + 1,
                max_objects,
                setting=setting,
            ) from exc
        raise CorruptRecordError(f"{what} does not decode as msgpack: {exc}") from exc
    return obj, max_objects - left[0]


def _map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CorruptRecordError(f"{what}: expected a msgpack map, found {type(obj).__name__}")
    return obj


def _int(value: Any, what: str, *, nullable: bool = False) -> Any:
    if value is None and nullable:
        return None
    if type(value) is not int:
        raise CorruptRecordError(f"{what}: expected an integer, found {value!r:.60}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise CorruptRecordError(f"{what}: expected a string, found {value!r:.60}")
    return value


# --- HEADER / SCHEMA / ATTACHMENT / SUMMARY / FOOTER --------------------------------------


def header_payload(
    *,
    writer: str,
    run_id: str,
    created_ns: int,
    hosts: Sequence[str],
    world_size: int,
    command: Sequence[str],
    meta: Mapping[str, Any],
    schemas: Sequence[TableSchema],
    sync: bytes,
    rollup_steps: int | None = None,
) -> bytes:
    return pack_map(
        {
            "rollup_steps": rollup_steps,
            "format_version": FORMAT_VERSION,
            "writer": writer,
            "run_id": run_id,
            "created_ns": created_ns,
            "hosts": list(hosts),
            "world_size": world_size,
            "command": list(command),
            "meta": dict(meta),
            "schemas": {s.name: s.to_dict()["columns"] for s in schemas},
            "sync": sync,
        }
    )


#: msgpack of the HEADER key ``"sync"`` followed by a bin8 header of 16 bytes: what precedes the
#: sync marker in every HEADER payload (and in the copies INDEX records keep)
SYNC_KEY = b"\xa4sync\xc4\x10"


def parse_header(
    payload: bytes | memoryview, limits: ReadLimits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], dict[str, TableSchema]]:
    """Validate a HEADER payload: ``(header map, schemas)``.

    Raises UnsupportedVersionError for another major version."""
    header = _map(unpack(payload, "HEADER", limits.max_record_objects), "HEADER")
    version = _str(header.get("format_version"), "HEADER.format_version")
    major_text = version.split(".", 1)[0]
    if not major_text.isdigit():
        raise CorruptRecordError(f"HEADER.format_version: expected 'major.minor', found {version!r:.40}")
    if int(major_text) != FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"file is .tml format version {version}; this traceml reads version {FORMAT_VERSION}"
            f" (major {FORMAT_MAJOR}) only: upgrade traceml to read it"
        )
    sync = header.get("sync")
    if not isinstance(sync, bytes) or len(sync) != SYNC_SIZE:
        raise CorruptRecordError("HEADER.sync: expected 16 bytes")
    for key in ("writer", "run_id"):
        _str(header.get(key), f"HEADER.{key}")
    _int(header.get("created_ns"), "HEADER.created_ns")
    _int(header.get("world_size"), "HEADER.world_size")
    for key in ("hosts", "command"):
        if not isinstance(header.get(key), list):
            raise CorruptRecordError(f"HEADER.{key}: expected a list")
    _map(header.get("meta"), "HEADER.meta")
    raw_schemas = _map(header.get("schemas"), "HEADER.schemas")
    if len(raw_schemas) > limits.max_tables:
        raise ReadLimitError("HEADER.schemas tables", len(raw_schemas), limits.max_tables, setting="max_tables")
    columns = sum(len(cols) for cols in raw_schemas.values() if isinstance(cols, list))
    if columns > limits.max_schema_columns:
        raise ReadLimitError("HEADER.schemas columns", columns, limits.max_schema_columns, setting="max_schema_columns")
    schemas = {name: parse_schema({"name": name, "columns": cols}, limits) for name, cols in raw_schemas.items()}
    return header, schemas


def schema_payload(schema: TableSchema) -> bytes:
    return pack_map(schema.to_dict())


def parse_schema(obj: Any, limits: ReadLimits = DEFAULT_LIMITS) -> TableSchema:
    columns = obj.get("columns") if isinstance(obj, dict) else None
    if isinstance(columns, list) and len(columns) > limits.max_columns:
        raise ReadLimitError(
            f"SCHEMA of table {str(obj.get('name'))[:40]!r} columns", len(columns), limits.max_columns,
            setting="max_columns",
        )  # fmt: skip
    try:
        return TableSchema.from_dict(_map(obj, "SCHEMA"))
    except CorruptRecordError:
        raise
    except Exception as exc:  # ConfigError from the schema module: bad on disk means corrupt here
        raise CorruptRecordError(f"SCHEMA: {exc}") from exc


def attachment_payload(name: str, data: Mapping[str, Any]) -> bytes:
    return pack_map({"name": name, "data": dict(data)})


def parse_attachment(
    payload: bytes | memoryview, limits: ReadLimits = DEFAULT_LIMITS, budget: int | None = None
) -> tuple[str, dict[str, Any], int]:
    """``(name, data, msgpack objects)``; *budget*: the objects the file's attachments have left
    (``ReadLimits.max_attachment_objects``), when smaller than the per-record limit."""
    if budget is not None and budget < limits.max_record_objects:
        obj, count = unpack_counted(payload, "ATTACHMENT", max(0, budget), "max_attachment_objects")
    else:
        obj, count = unpack_counted(payload, "ATTACHMENT", limits.max_record_objects)
    obj = _map(obj, "ATTACHMENT")
    return _str(obj.get("name"), "ATTACHMENT.name"), _map(obj.get("data"), "ATTACHMENT.data"), count


def parse_summary(payload: bytes | memoryview, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    return _map(unpack(payload, "SUMMARY", limits.max_record_objects), "SUMMARY")


def footer_payload(index_offset: int, summary_offset: int) -> bytes:
    return _FOOTER_PAYLOAD.pack(index_offset, summary_offset, _FOOTER_END)


def parse_footer(payload: bytes | memoryview) -> tuple[int, int]:
    if len(payload) != _FOOTER_PAYLOAD.size:
        raise CorruptRecordError(f"FOOTER: expected {_FOOTER_PAYLOAD.size} bytes, found {len(payload)}")
    index_offset, summary_offset, end = _FOOTER_PAYLOAD.unpack(payload)
    if end != _FOOTER_END:
        raise CorruptRecordError("FOOTER: end marker missing")
    return index_offset, summary_offset


# --- INDEX -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentHead:
    """The uncompressed head of a SEGMENT: what the index knows about it."""

    t_min: int | None
    t_max: int | None
    step_min: int | None
    step_max: int | None
    streams: tuple[tuple[int, str, int], ...]  # (rank, table, rows)
    raw_size: int


@dataclass(frozen=True)
class IndexEntry:
    offset: int
    length: int
    name: str  # attachment / schema name


@dataclass(frozen=True)
class IndexCheckpoint:
    prev: int | None
    final: bool
    segments: tuple[tuple[int, int, SegmentHead], ...]  # (offset, length, head)
    attachments: tuple[IndexEntry, ...]
    schemas: tuple[IndexEntry, ...]
    #: 1.2: a copy of the HEADER payload (restores a damaged HEADER); None in older files
    header: bytes | None = None


def _check_rows(head: SegmentHead, what: str) -> None:
    """Every row takes at least one body byte: more rows than ``raw_size`` is a lie, refused
    before anyone sizes an array by it."""
    rows = sum(n for _, _, n in head.streams)
    if rows > head.raw_size:
        raise CorruptRecordError(f"{what} claims {rows} rows in a body of {head.raw_size} bytes")


def index_payload(
    *,
    prev: int | None,
    final: bool,
    segments: Sequence[tuple[int, int, SegmentHead]],
    attachments: Sequence[IndexEntry],
    schemas: Sequence[IndexEntry],
    header: bytes | None = None,
) -> bytes:
    tables: dict[str, int] = {}
    for _, _, h in segments:
        for _, table, _ in h.streams:
            tables.setdefault(table, len(tables))
    return pack_map(
        {
            "prev": prev,
            "final": final,
            "tables": list(tables),
            "segments": [
                [
                    off,
                    length,
                    h.t_min,
                    h.t_max,
                    h.step_min,
                    h.step_max,
                    h.raw_size,
                    [[rank, tables[table], rows] for rank, table, rows in h.streams],
                ]
                for off, length, h in segments
            ],
            "attachments": [[e.offset, e.length, e.name] for e in attachments],
            "schemas": [[e.offset, e.length, e.name] for e in schemas],
            "header": header,
        }
    )


def _streams(raw: Any, what: str, tables: list[str]) -> tuple[tuple[int, str, int], ...]:
    """``[[rank, table_idx, rows], ...]`` checked, with table names resolved."""
    if type(raw) is not list:
        raise CorruptRecordError(f"{what}: expected a list of streams")
    out = []
    count = len(tables)
    for item in raw:
        if type(item) is not list or len(item) != 3:
            raise CorruptRecordError(f"{what}: expected [rank, table, rows], found {item!r:.60}")
        rank, idx, rows = item
        if type(rank) is not int or type(idx) is not int or type(rows) is not int or not 0 <= idx < count or rows < 0:
            raise CorruptRecordError(f"{what}: bad stream entry {item!r:.60}")
        out.append((rank, tables[idx], rows))
    return tuple(out)


def _entries(raw: Any, what: str) -> tuple[IndexEntry, ...]:
    if not isinstance(raw, list):
        raise CorruptRecordError(f"{what}: expected a list")
    out = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3:
            raise CorruptRecordError(f"{what}: expected [offset, length, name]")
        out.append(IndexEntry(_int(item[0], what), _int(item[1], what), _str(item[2], what)))
    return tuple(out)


def parse_index(payload: bytes | memoryview, limits: ReadLimits = DEFAULT_LIMITS) -> IndexCheckpoint:
    obj = _map(unpack(payload, "INDEX", limits.max_record_objects), "INDEX")
    tables = obj.get("tables")
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise CorruptRecordError("INDEX.tables: expected a list of names")
    segments = []
    raw_segments = obj.get("segments")
    if not isinstance(raw_segments, list):
        raise CorruptRecordError("INDEX.segments: expected a list")
    for item in raw_segments:
        if not isinstance(item, list) or len(item) != 8:
            raise CorruptRecordError("INDEX.segments: expected 8-element entries")
        off, length = _int(item[0], "INDEX offset"), _int(item[1], "INDEX length")
        t_min, t_max, s_min, s_max = (_int(v, "INDEX range", nullable=True) for v in item[2:6])
        head = SegmentHead(
            t_min, t_max, s_min, s_max, _streams(item[7], "INDEX streams", tables), _int(item[6], "raw_size")
        )
        if off < 0 or length < FRAME_OVERHEAD:
            raise CorruptRecordError(f"INDEX entry ({off}, {length}) is not a record")
        _check_rows(head, "INDEX entry")
        segments.append((off, length, head))
    final = obj.get("final")
    if not isinstance(final, bool):
        raise CorruptRecordError("INDEX.final: expected a boolean")
    header = obj.get("header")
    if header is not None and not isinstance(header, bytes):
        raise CorruptRecordError("INDEX.header: expected the bytes of a HEADER payload")
    return IndexCheckpoint(
        header=header,
        prev=_int(obj.get("prev"), "INDEX.prev", nullable=True),
        final=final,
        segments=tuple(segments),
        attachments=_entries(obj.get("attachments"), "INDEX.attachments"),
        schemas=_entries(obj.get("schemas"), "INDEX.schemas"),
    )


@dataclass(frozen=True, slots=True)
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


def lost_header(sync: bytes) -> dict[str, Any]:
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
