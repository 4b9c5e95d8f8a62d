"""SEGMENT bodies: the column encodings and zstd (spec: ``docs/format.md``), the only code that
compresses or decompresses recording data.  Every unpacking function validates what it reads and
raises only ``traceml.errors`` types.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zstandard

from traceml.errors import CorruptRecordError, DecompressionBombError, ReadLimitError
from traceml.format._records import (
    _U32,
    DEFAULT_LIMITS,
    ReadLimits,
    SegmentHead,
    _check_rows,
    _int,
    _map,
    _packer_lenient,
    _packer_strict,
    _streams,
    pack_map,
    unpack,
)
from traceml.schema import NUMPY_DTYPES, STR, TYPE_CODES, Column, TableSchema

_SHUFFLE = "shuffle"
_FOR = "for"
_DELTA = "delta"
_MSGPACK = "msgpack"
_UNSIGNED: dict[str, np.dtype[Any]] = {"i8": np.dtype("<u8"), "i4": np.dtype("<u4")}
_OBJECT = np.dtype(object)
_NARROW: dict[int, np.dtype[Any]] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _width(span: int) -> int:
    """Bytes needed for unsigned values in ``0..span``."""
    return next(w for w in (1, 2, 4, 8) if span < 1 << (8 * w))


def _transpose(a: np.ndarray) -> bytes:
    if a.itemsize == 1:
        return a.tobytes()
    return a.view(np.uint8).reshape(len(a), a.itemsize).T.tobytes()


def _planes(body: bytes, offset: int, n: int, width: int) -> np.ndarray:
    """The byte planes of *n* transposed values as an (width, n) uint8 view."""
    return np.frombuffer(body, np.uint8, n * width, offset).reshape(width, n)


def _encode_numeric(values: np.ndarray, code: str, starts: np.ndarray) -> tuple[str, list[int], bytes]:
    """Pick the encoding of a numeric column whose runs begin at *starts*: ``(encoding, args, blob)``."""
    n = len(values)
    if code not in _UNSIGNED or n == 0:
        return _SHUFFLE, [], _transpose(values)
    scalar = values.dtype.type
    unsigned = _UNSIGNED[code]
    lo, hi = int(values.min()), int(values.max())
    if n > len(starts) + 1:
        deltas = np.empty_like(values)
        np.subtract(values[1:], values[:-1], out=deltas[1:])  # wraps, like the decoder's cumulative sum
        if len(starts) > 1:
            inner_mask = np.ones(n, dtype=bool)
            inner_mask[starts] = False
            inner = deltas[inner_mask]
        else:
            inner = deltas[1:]
        d_lo, d_hi = int(inner.min()), int(inner.max())
        width = _width(d_hi - d_lo)
        # bytes before compression: delta also stores each run's first value (up to 9 msgpack bytes)
        delta_cost, for_cost = n * width + 9 * len(starts), n * _width(hi - lo)
        if delta_cost < for_cost or (delta_cost == for_cost and d_hi - d_lo < hi - lo):
            deltas[starts] = d_lo
            stored = (deltas - scalar(d_lo)).view(unsigned).astype(_NARROW[width])
            return _DELTA, [d_lo, width, *values[starts].tolist()], _transpose(stored)
    width = _width(hi - lo)
    stored = (values - scalar(lo)).view(unsigned).astype(_NARROW[width])
    return _FOR, [lo, width], _transpose(stored)


def _check_args(code: str, encoding: Any, args: Any, rows: int, runs: int, nbytes: int) -> bool:
    """Whether a layout entry is consistent (sizes included)."""
    if type(args) is not list:
        return False
    if code == STR:
        return encoding == _MSGPACK and not args
    itemsize = NUMPY_DTYPES[code].itemsize
    if encoding == _SHUFFLE:
        return not args and nbytes == rows * itemsize
    if code not in _UNSIGNED or encoding not in (_FOR, _DELTA) or len(args) < 2:
        return False
    base, width = args[0], args[1]
    limit = 1 << (itemsize * 8 - 1)
    if type(base) is not int or not -limit <= base < limit or width not in (1, 2, 4, 8) or width > itemsize:
        return False
    if nbytes != rows * width:
        return False
    if encoding == _FOR:
        return len(args) == 2
    firsts = args[2:]
    return len(firsts) == runs and all(type(f) is int and -limit <= f < limit for f in firsts)


def _decode_numeric(
    body: bytes,
    offset: int,
    code: str,
    encoding: str,
    args: list[int],
    starts: np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray,
) -> None:
    """Decode a checked numeric column of ``len(out)`` rows into *out*."""
    n = len(out)
    dtype = NUMPY_DTYPES[code]
    if encoding == _SHUFFLE:
        _scatter_planes(body, offset, n, dtype.itemsize, out)
        return
    unsigned = _UNSIGNED[code]
    modulus = 1 << (dtype.itemsize * 8)
    target = out.view(unsigned)
    base, width = args[0] % modulus, args[1]
    if width < dtype.itemsize:
        target.fill(0)
    _scatter_planes(body, offset, n, width, target)
    if base:
        target += unsigned.type(base)  # wraps, as the encoder did
    if encoding == _DELTA:
        target.cumsum(out=target)
        firsts = np.array([f % modulus for f in args[2:]], dtype=unsigned)
        shift = firsts - target[starts]  # per run: its first value minus the running sum there
        if len(shift) == 1:
            target += shift[0]
        else:
            target += np.repeat(shift, lengths)


def _scatter_planes(body: bytes, offset: int, n: int, width: int, out: np.ndarray) -> None:
    """Write the *width* low bytes of each of *n* values from their transposed planes into *out*
    (little-endian; higher bytes of *out* are left as they are)."""
    planes = _planes(body, offset, n, width)
    if out.itemsize == 1:
        out.view(np.uint8)[:] = planes[0]
        return
    as_bytes = out.view(np.uint8).reshape(n, out.itemsize)
    for k in range(width):  # one long strided copy per byte plane
        as_bytes[:, k] = planes[k]


#: one table of a segment to encode: (schema, runs [(rank, rows), ...] in order,
#: {column: the values of all runs, one run after the other})
TableRuns = tuple[TableSchema, Sequence[tuple[int, int]], Mapping[str, Any]]


def _starts(lengths: Sequence[int]) -> np.ndarray:
    return np.fromiter(itertools.accumulate(lengths[:-1], initial=0), dtype=np.int64, count=len(lengths))


def encode_segment(
    groups: Sequence[TableRuns], compressor: zstandard.ZstdCompressor, seq: int | None = None
) -> tuple[bytes, SegmentHead]:
    """Pack the SEGMENT payload of *groups* (one per table, in body order); ``seq`` is the writer's
    count of segments before this one, so two segments of one file are never byte-identical."""
    tables: list[str] = []
    stream_list: list[list[int]] = []
    streams: list[tuple[int, str, int]] = []
    layout: list[list[list[Any]]] = []
    blobs: list[bytes] = []
    t_lo: list[int] = []
    t_hi: list[int] = []
    s_lo: list[int] = []
    s_hi: list[int] = []
    for index, (schema, runs, columns) in enumerate(groups):
        tables.append(schema.name)
        for rank, rows in runs:
            stream_list.append([rank, index, rows])
            streams.append((rank, schema.name, rows))
        starts = _starts([rows for _, rows in runs])
        cols_layout = []
        for col in schema.columns:
            values = columns[col.name]
            args: list[int] = []
            if col.dtype == STR:
                blob = _packer_lenient.pack(values)
                encoding = _MSGPACK
            else:
                encoding, args, blob = _encode_numeric(values, col.dtype, starts)
                if len(values) and col.dtype in _UNSIGNED and col.name == "ts_ns":
                    t_lo.append(int(values.min()))
                    t_hi.append(int(values.max()))
                elif len(values) and col.dtype in _UNSIGNED and col.name == "step":
                    s_lo.append(int(values.min()))
                    s_hi.append(int(values.max()))
            cols_layout.append([col.name, col.dtype, encoding, len(blob), args])
            blobs.append(blob)
        layout.append(cols_layout)
    layout_bytes = _packer_strict.pack(layout)
    body = b"".join([_U32.pack(len(layout_bytes)), layout_bytes, *blobs])
    head = SegmentHead(
        t_min=min(t_lo) if t_lo else None,
        t_max=max(t_hi) if t_hi else None,
        step_min=min(s_lo) if s_lo else None,
        step_max=max(s_hi) if s_hi else None,
        streams=tuple(streams),
        raw_size=len(body),
    )
    head_bytes = pack_map(
        {
            "t_min": head.t_min,
            "t_max": head.t_max,
            "step_min": head.step_min,
            "step_max": head.step_max,
            "tables": tables,
            "streams": stream_list,
            "raw_size": head.raw_size,
            "codec": "zstd",
            **({} if seq is None else {"seq": seq}),
        }
    )
    return b"".join((_U32.pack(len(head_bytes)), head_bytes, compressor.compress(body))), head


def _groups(streams: Sequence[tuple[int, str, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Streams of a segment as (table, runs) groups in body order; they must be contiguous per table."""
    groups: list[tuple[str, list[tuple[int, int]]]] = []
    seen: set[str] = set()
    for rank, table, rows in streams:
        if groups and groups[-1][0] == table:
            groups[-1][1].append((rank, rows))
        elif table in seen:
            raise CorruptRecordError(f"SEGMENT.streams of table {table!r:.40} are not contiguous")
        else:
            seen.add(table)
            groups.append((table, [(rank, rows)]))
    return groups


def parse_segment_head(payload: bytes | memoryview, limits: ReadLimits = DEFAULT_LIMITS) -> tuple[SegmentHead, int]:
    """The head of a SEGMENT payload and the offset of its compressed body."""
    if len(payload) < 4:
        raise CorruptRecordError("SEGMENT: payload shorter than its head length")
    (head_len,) = _U32.unpack(payload[:4])
    if head_len > len(payload) - 4:
        raise CorruptRecordError(f"SEGMENT: head of {head_len} bytes overruns a {len(payload)}-byte payload")
    obj = _map(unpack(payload[4 : 4 + head_len], "SEGMENT head", limits.max_record_objects), "SEGMENT head")
    if obj.get("codec") != "zstd":
        raise CorruptRecordError(f"SEGMENT: codec {obj.get('codec')!r:.30} is not 'zstd'")
    tables = obj.get("tables")
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise CorruptRecordError("SEGMENT.tables: expected a list of names")
    raw_size = _int(obj.get("raw_size"), "SEGMENT.raw_size")
    if raw_size < 4:
        raise CorruptRecordError(f"SEGMENT.raw_size: {raw_size} is smaller than a body")
    head = SegmentHead(
        t_min=_int(obj.get("t_min"), "SEGMENT.t_min", nullable=True),
        t_max=_int(obj.get("t_max"), "SEGMENT.t_max", nullable=True),
        step_min=_int(obj.get("step_min"), "SEGMENT.step_min", nullable=True),
        step_max=_int(obj.get("step_max"), "SEGMENT.step_max", nullable=True),
        streams=_streams(obj.get("streams"), "SEGMENT.streams", tables),
        raw_size=raw_size,
    )
    if len({(rank, table) for rank, table, _ in head.streams}) != len(head.streams):
        raise CorruptRecordError("SEGMENT.streams lists a (rank, table) twice")
    if any(rows == 0 for _, _, rows in head.streams):
        raise CorruptRecordError("SEGMENT.streams lists a stream without rows")
    _check_rows(head, "SEGMENT")
    return head, 4 + head_len


def _decompress(
    data: memoryview, raw_size: int, max_decompressed: int, decompressor: zstandard.ZstdDecompressor
) -> bytes:
    if raw_size > max_decompressed:
        raise DecompressionBombError(
            "segment", raw_size, max_decompressed, setting="raise ReadLimits.max_decompressed_bytes to read it"
        )
    try:
        content_size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CorruptRecordError(f"SEGMENT body is not a zstd frame: {exc}") from exc
    if content_size not in (-1, raw_size):
        if content_size > raw_size:
            raise DecompressionBombError("zstd frame", content_size, raw_size, declared=True)
        raise CorruptRecordError(f"zstd frame holds {content_size} bytes; the segment head declares {raw_size}")
    try:
        if content_size == raw_size:
            body = decompressor.decompress(data, allow_extra_data=False)
        else:  # no size in the frame: never let zstd write more than declared (+1 to detect it)
            with decompressor.stream_reader(data) as reader:
                body = reader.read(raw_size + 1)
            if len(body) > raw_size:
                raise DecompressionBombError("zstd frame", None, raw_size, declared=True)
    except zstandard.ZstdError as exc:
        raise CorruptRecordError(f"SEGMENT body does not decompress: {exc}") from exc
    if len(body) != raw_size:
        raise CorruptRecordError(f"SEGMENT body decompressed to {len(body)} bytes; its head declares {raw_size}")
    return body


#: what a decoded ``str`` value costs beyond its bytes: a pointer in the unpacked list, one in the
#: object array, and a str object's header (empty and one-character strings are shared, others are not)
STR_VALUE_BYTES = 72


def decoded_bytes(layout: list[Any], groups: Sequence[tuple[str, Sequence[tuple[int, int]]]], wanted: Any) -> int:
    """Bytes of the arrays decoding the wanted groups of *layout* allocates (an upper bound, from
    the row counts and the layout alone: computed before anything is allocated)."""
    total = 0
    for (table, runs), cols in zip(groups, layout, strict=True):
        if wanted is not None and not any((rank, table) in wanted for rank, _ in runs):
            continue
        rows = sum(n for _, n in runs)
        for entry in cols if isinstance(cols, list) else ():
            code = entry[1] if isinstance(entry, list) and len(entry) == 5 else None
            if code == STR:
                nbytes = entry[3] if type(entry[3]) is int else 0
                total += rows * STR_VALUE_BYTES + nbytes
            elif code in NUMPY_DTYPES:
                total += rows * NUMPY_DTYPES[code].itemsize
    return total


def decode_segment(
    payload: bytes | memoryview,
    decompressor: zstandard.ZstdDecompressor,
    limits: ReadLimits = DEFAULT_LIMITS,
    wanted: Any = None,
    dest: Mapping[tuple[int, str], Mapping[str, np.ndarray]] | None = None,
) -> list[tuple[int, str, TableSchema, dict[str, Any]]]:
    """Decode the streams of a SEGMENT payload (those ``(rank, table)`` in *wanted*, or all).

    Returns ``(rank, table, schema from the layout, columns)`` in body order; str columns are
    object arrays.  A stream with an entry in *dest* is decoded into those arrays (one per
    column, of the stream's length and the column's dtype) instead of new ones.  Raises
    ReadLimitError before allocating when the arrays would exceed ``limits.max_decoded_bytes``.
    """
    head, body_offset = parse_segment_head(payload, limits)
    groups = _groups(head.streams)
    body = _decompress(memoryview(payload)[body_offset:], head.raw_size, limits.max_decompressed_bytes, decompressor)
    (layout_len,) = _U32.unpack(body[:4])
    if layout_len > len(body) - 4:
        raise CorruptRecordError("SEGMENT layout overruns the body")
    layout = unpack(body[4 : 4 + layout_len], "SEGMENT layout", limits.max_record_objects)
    if not isinstance(layout, list) or len(layout) != len(groups):
        raise CorruptRecordError("SEGMENT layout does not list one entry per table")
    for (table, _), cols in zip(groups, layout, strict=True):
        if isinstance(cols, list) and len(cols) > limits.max_columns:
            raise ReadLimitError(
                f"SEGMENT layout of table {table[:40]!r} columns", len(cols), limits.max_columns, setting="max_columns"
            )
    decoded = decoded_bytes(layout, groups, wanted)
    if decoded > limits.max_decoded_bytes:
        raise ReadLimitError("SEGMENT decoded array bytes", decoded, limits.max_decoded_bytes,
                             setting="max_decoded_bytes")  # fmt: skip
    offset = 4 + layout_len
    out = []
    for (table, runs), cols in zip(groups, layout, strict=True):
        if not isinstance(cols, list):
            raise CorruptRecordError("SEGMENT layout entry is not a list")
        lengths = [rows for _, rows in runs]
        rows = sum(lengths)
        taken = [wanted is None or (rank, table) in wanted for rank, _ in runs]
        take_any = any(taken)
        if not take_any:  # step over this table's columns; the size check below still covers them
            for entry in cols:
                if type(entry) is not list or len(entry) != 5 or type(entry[3]) is not int or entry[3] < 0:
                    raise CorruptRecordError(f"SEGMENT layout of {table}: bad column entry {entry!r:.60}")
                offset += entry[3]
            continue
        targets = [
            dest.get((rank, table)) if dest is not None and take else None
            for (rank, _), take in zip(runs, taken, strict=True)
        ]
        # one run going to a caller's arrays: decode straight into them
        direct = targets[0] if len(runs) == 1 else None
        starts = _starts(lengths)
        length_array = np.array(lengths, dtype=np.int64)
        full: dict[str, np.ndarray] = {}
        names: list[Column] = []
        seen: set[str] = set()
        for entry in cols:
            if not (isinstance(entry, list) and len(entry) == 5):
                raise CorruptRecordError("SEGMENT column entry must be [name, dtype, encoding, nbytes, args]")
            name, code, encoding, nbytes, args = entry
            if not isinstance(name, str) or name in seen:
                raise CorruptRecordError(f"SEGMENT layout of {table}: bad or repeated column name {name!r:.40}")
            if (
                code not in TYPE_CODES
                or type(nbytes) is not int
                or not _check_args(code, encoding, args, rows, len(runs), nbytes)
            ):
                raise CorruptRecordError(
                    f"SEGMENT column {table}.{name}: inconsistent entry {[code, encoding, nbytes, args]!r:.80}"
                    f" for {rows} rows"
                )
            if offset + nbytes > len(body):
                raise CorruptRecordError(f"SEGMENT column {table}.{name} overruns the body")
            if take_any:
                dtype = _OBJECT if code == STR else NUMPY_DTYPES[code]
                if direct is not None:
                    array = direct.get(name)
                    if array is None or len(array) != rows or array.dtype != dtype:
                        raise CorruptRecordError(
                            f"SEGMENT column {table}.{name} ({code}) does not match the table schema"
                        )
                else:
                    array = np.empty(rows, dtype)
                if code == STR:
                    values = unpack(body[offset : offset + nbytes], "SEGMENT str column", rows + 1)
                    if (
                        not isinstance(values, list)
                        or len(values) != rows
                        or not all(isinstance(v, str) for v in values)
                    ):
                        raise CorruptRecordError(f"SEGMENT column {table}.{name}: expected {rows} strings")
                    array[:] = values
                else:
                    _decode_numeric(body, offset, code, encoding, args, starts, length_array, array)
                full[name] = array
            seen.add(name)
            names.append(Column(name, code))
            offset += nbytes
        if not take_any:
            continue
        schema = TableSchema(table, tuple(names))
        for (rank, n), start, take, into in zip(runs, starts.tolist(), taken, targets, strict=True):
            if not take:
                continue
            if into is None or direct is not None:
                columns = full if len(runs) == 1 else {name: a[start : start + n] for name, a in full.items()}
                if into is not None and into.keys() != full.keys():
                    raise CorruptRecordError(f"SEGMENT columns of {table} do not match the table schema")
            else:
                if into.keys() != full.keys():
                    raise CorruptRecordError(f"SEGMENT columns of {table} do not match the table schema")
                for name, a in full.items():
                    if len(into[name]) != n or into[name].dtype != a.dtype:
                        raise CorruptRecordError(f"SEGMENT column {table}.{name} does not match the table schema")
                    into[name][:] = a[start : start + n]
                columns = dict(into)
            out.append((rank, table, schema, columns))
    if offset != len(body):
        raise CorruptRecordError(f"SEGMENT columns cover {offset} of {len(body)} body bytes")
    return out
