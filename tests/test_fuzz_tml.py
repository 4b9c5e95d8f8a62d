"""Fuzz the ``.tml`` reader beyond truncation and bit flips: records of random kinds, lengths,
CRCs and payloads (random bytes, random msgpack, and well-formed records that lie) spliced
into valid files.  Whatever the bytes, the reader raises only ``traceml`` errors or reports
skips in ``integrity``, keeps every row of the original file that the splice did not
overwrite, and allocates a bounded amount of memory."""

from __future__ import annotations

import functools
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traceml.errors import TracemlError
from traceml.format import MAGIC, RecordKind, TmlWriter, open_recording
from traceml.format.recover import recover
from traceml.schema import PHASES, STEP_REGION, STEP_TIME, rows_to_columns

SYNC_AT = len(MAGIC)
SYNC_SIZE = 16
#: whatever a spliced file says, reading it must not allocate more than this (Python + numpy, traced)
MEMORY_BOUND = 48 << 20
#: nor grow the test process by more than this (resident memory, checked on every example)
RSS_BOUND = 256 << 20
PROCESS = psutil.Process()
RANKS = (0, 1)
STEPS_PER_BATCH = 40
BATCHES = 6


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _write_base(path: Path) -> None:
    clock = _Clock()
    writer = TmlWriter(
        path,
        run_meta={"run_id": "fuzz", "world_size": 2, "command": ["fuzz"]},
        checkpoint_every_segments=2,
        fsync_interval_s=None,
        clock=clock,
    )
    step = 0
    for b in range(BATCHES):
        for rank in RANKS:
            rows = [(s, 10**18 + s * 1000, 0, 900, *([100] * len(PHASES))) for s in range(step, step + STEPS_PER_BATCH)]
            writer.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
            regions = [(s, 10**18 + s * 1000, f"r{s % 3}", 5, 1) for s in range(step, step + STEPS_PER_BATCH)]
            writer.append(rank, "step_region", rows_to_columns(STEP_REGION, regions))
        writer.attach(f"environment/rank{b % 2}", {"batch": b, "host": "h"})
        step += STEPS_PER_BATCH
        clock.now += 2.0
        writer.tick()
    writer.close(summary={"ok": True})


@functools.cache
def base_file(which: str) -> bytes:
    """The clean base file, or a crashed copy of it (no final INDEX, SUMMARY, FOOTER; cut mid-record)."""
    with tempfile.TemporaryDirectory() as d:
        _write_base(Path(d) / "clean.tml")
        clean = (Path(d) / "clean.tml").read_bytes()
    if which == "clean":
        return clean
    bounds = record_bounds(clean)
    last_segment_end = max(end for start, end, kind in bounds if kind == RecordKind.SEGMENT)
    return clean[: last_segment_end + 7]


def record_bounds(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, kind) of every record of a well-formed file."""
    sync = data[SYNC_AT : SYNC_AT + SYNC_SIZE]
    out = []
    pos = SYNC_AT
    while pos + 25 <= len(data) and data[pos : pos + SYNC_SIZE] == sync:
        kind, length = struct.unpack_from("<BI", data, pos + SYNC_SIZE)
        end = pos + 29 + length
        if end > len(data):
            break
        out.append((pos, end, kind))
        pos = end
    return out


def frame(
    sync: bytes, kind: int, payload: bytes, *, length: int | None = None, bad_head: bool = False, bad_crc: bool = False
) -> bytes:
    kind_len = struct.pack("<BI", kind, len(payload) if length is None else length)
    head_crc = zlib.crc32(kind_len) ^ (1 if bad_head else 0)
    crc = zlib.crc32(payload) ^ (1 if bad_crc else 0)
    return sync + kind_len + struct.pack("<I", head_crc) + payload + struct.pack("<I", crc)


# --- payload strategies ---------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=30,
)
huge_ints = st.sampled_from([-1, 0, 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1])
#: row counts a lying record claims (a reader that sized arrays from them would allocate terabytes)
row_claims = st.one_of(st.integers(0, 50), st.sampled_from([2**16, 2**20, 2**31, 2**40, 2**62]))


@st.composite
def lying_segment(draw: st.DrawFn) -> bytes:
    """A SEGMENT whose head and layout are plausible but whose numbers lie."""
    rows = draw(row_claims)
    raw_size = draw(st.one_of(st.integers(0, 400), huge_ints))
    streams = [[draw(st.integers(-2, 3)), 0, rows]]
    head = {
        "t_min": draw(st.one_of(st.none(), huge_ints)),
        "t_max": draw(st.one_of(st.none(), huge_ints)),
        "step_min": draw(st.one_of(st.none(), st.integers(-5, 500))),
        "step_max": draw(st.one_of(st.none(), st.integers(-5, 500), huge_ints)),
        "tables": [draw(st.sampled_from(["step_time", "step_region", "new_table", ""]))],
        "streams": streams,
        "raw_size": raw_size,
        "codec": draw(st.sampled_from(["zstd", "zstd", "lz4", ""])),
    }
    layout = [
        [
            [
                draw(st.sampled_from(["step", "ts_ns", "name", "x"])),
                draw(st.sampled_from(["i8", "i4", "u1", "f8", "str", "O", "<i8"])),
                draw(st.sampled_from(["shuffle", "for", "delta", "msgpack", "pickle"])),
                draw(st.one_of(st.integers(0, 400), huge_ints)),
                draw(st.lists(huge_ints, max_size=3)),
            ]
        ]
    ]
    layout_bytes = msgpack.packb(layout)
    blob = draw(st.binary(max_size=300))
    body = struct.pack("<I", len(layout_bytes)) + layout_bytes + blob
    import zstandard

    if draw(st.booleans()):
        compressed = zstandard.ZstdCompressor(write_content_size=draw(st.booleans())).compress(body)
    else:
        compressed = draw(st.binary(max_size=60))
    head_bytes = msgpack.packb(head)
    return struct.pack("<I", len(head_bytes)) + head_bytes + compressed


@st.composite
def lying_index(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 3))
    segments = [
        [
            draw(huge_ints | st.integers(0, 20000)),
            draw(huge_ints | st.integers(0, 5000)),
            None,
            None,
            None,
            None,
            draw(huge_ints),
            [[0, "step_time", draw(row_claims)]],
        ]
        for _ in range(n)
    ]
    entries = [[draw(huge_ints | st.integers(0, 20000)), draw(huge_ints | st.integers(0, 500)), "summary"]]
    return msgpack.packb(
        {
            "prev": draw(st.one_of(st.none(), huge_ints, st.integers(0, 20000))),
            "final": draw(st.booleans()),
            "segments": segments,
            "attachments": entries,
            "schemas": [],
        }
    )


@st.composite
def spliced_record(draw: st.DrawFn) -> tuple[int, bytes, dict[str, Any]]:
    kind = draw(st.one_of(st.sampled_from([int(k) for k in RecordKind]), st.integers(0, 255)))
    choice = draw(st.sampled_from(["random", "msgpack", "ext", "segment", "index", "attachment"]))
    if choice == "random":
        payload = draw(st.binary(max_size=600))
    elif choice == "msgpack":
        payload = msgpack.packb(draw(msgpack_values))
    elif choice == "ext":
        payload = msgpack.packb({"name": "evil", "data": msgpack.ExtType(draw(st.integers(0, 127)), b"\x80\x04K\x01.")})
    elif choice == "segment":
        kind, payload = RecordKind.SEGMENT, draw(lying_segment())
    elif choice == "index":
        kind, payload = RecordKind.INDEX, draw(lying_index())
    else:
        kind, payload = (
            RecordKind.ATTACHMENT,
            msgpack.packb(
                {"name": draw(st.sampled_from(["ranks", "exit", "", "x" * 300])), "data": draw(msgpack_values)}
            ),
        )
    opts = {
        "length": draw(
            st.one_of(st.none(), st.none(), huge_ints.filter(lambda v: 0 <= v < 2**32), st.integers(0, 700))
        ),
        "bad_head": draw(st.booleans()),
        "bad_crc": draw(st.booleans()),
    }
    return kind, payload, opts


# --- the property -------------------------------------------------------------------------


def read_everything(path: Path, out_dir: Path) -> tuple[dict[tuple[int, int], int], dict[str, Any] | None]:
    """Open, read every table (index and scan), inspect, follow and recover; returns step rows seen."""
    seen: dict[tuple[int, int], int] = {}
    integrity = None
    try:
        with open_recording(path) as rec:
            for table in rec.tables:
                for rank, cols in rec.read_table(table).items():
                    if table == "step_time":
                        for s in np.asarray(cols["step"]).tolist():
                            seen[(rank, s)] = seen.get((rank, s), 0) + 1
                rec.read_table(table, ranks=[0], step_range=(10, 100), time_range=(None, 10**18 + 50_000))
            for _ in rec.iter_batches(step_range=(0, 5)):
                pass
            _ = rec.attachments, rec.schemas, rec.segments, rec.summary, rec.header
            rec.inspect()
            integrity = rec.integrity
    except TracemlError:
        pass
    try:
        with open_recording(path, follow=True) as rec:
            rec.poll()
            rec.poll()
    except TracemlError:
        pass
    try:
        recover(path, out_dir / "recovered.tml")
    except TracemlError:
        pass
    return seen, integrity


def splice(base: bytes, record: bytes, where: int, replace: bool) -> tuple[bytes, tuple[int, int]]:
    """Insert ``record`` at the ``where``-th record boundary (or over that record); returns the
    new bytes and the original byte span that was overwritten (empty for an insertion)."""
    bounds = record_bounds(base)
    starts = [start for start, _, _ in bounds[1:]] + [len(base)]  # never before the HEADER
    at = starts[where % len(starts)]
    if replace and at < len(base):
        end = next(e for s, e, _ in bounds if s == at)
        return base[:at] + record + base[end:], (at, end)
    return base[:at] + record + base[at:], (at, at)


def original_steps(base: bytes, lost_span: tuple[int, int], tmp: Path) -> dict[tuple[int, int], int]:
    """The step rows of ``base`` outside the overwritten span (what must survive)."""
    path = tmp / "orig.tml"
    path.write_bytes(base)
    with open_recording(path) as rec:
        keep: dict[tuple[int, int], int] = {}
        for seg in rec.segments:
            if seg.offset < lost_span[1] and seg.offset + seg.length > lost_span[0]:
                continue
            for rank, table, cols in rec.read_segment(seg):
                if table == "step_time":
                    for s in cols["step"].tolist():
                        keep[(rank, s)] = keep.get((rank, s), 0) + 1
    return keep


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    which=st.sampled_from(["clean", "crashed"]),
    records=st.lists(spliced_record(), min_size=1, max_size=3),
    where=st.integers(0, 1000),
    replace=st.booleans(),
)
def test_spliced_records_are_skipped_or_refused_never_crash(
    tmp_path: Path, which: str, records: list[tuple[int, bytes, dict[str, Any]]], where: int, replace: bool
) -> None:
    base = base_file(which)
    sync = base[SYNC_AT : SYNC_AT + SYNC_SIZE]
    blob = b"".join(frame(sync, kind, payload, **opts) for kind, payload, opts in records)
    data, lost_span = splice(base, blob, where, replace)
    path = tmp_path / "spliced.tml"
    path.write_bytes(data)

    rss_before = PROCESS.memory_info().rss
    seen, integrity = read_everything(path, tmp_path)
    grown = PROCESS.memory_info().rss - rss_before
    assert grown < RSS_BOUND, f"reading a {len(data)}-byte file grew the process by {grown >> 20} MiB"
    assert integrity is not None, "a file with an intact HEADER must open"
    # rows of the original that are not read back must be accounted for: the file is reported damaged
    must_keep = original_steps(base, lost_span, tmp_path)
    missing = [key for key, n in must_keep.items() if seen.get(key, 0) < n]
    if missing:
        assert integrity["status"] == "damaged" and integrity["skipped"], (
            f"{len(missing)} original step rows (e.g. {missing[:3]}) were lost without a reported skip: {integrity}"
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bytes_after_the_magic_raise_only_traceml_errors(tmp_path: Path, data: st.DataObject) -> None:
    head = data.draw(st.sampled_from([b"", MAGIC, MAGIC + b"\x00" * 16, MAGIC[:5] + b"9" + MAGIC[6:]]))
    path = tmp_path / "noise.tml"
    path.write_bytes(head + data.draw(st.binary(max_size=2000)))
    rss_before = PROCESS.memory_info().rss
    read_everything(path, tmp_path)
    assert PROCESS.memory_info().rss - rss_before < RSS_BOUND


def _read_bounded(path: Path, tmp_path: Path) -> tuple[dict[tuple[int, int], int], dict[str, Any] | None, int]:
    tracemalloc.start()
    try:
        seen, integrity = read_everything(path, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return seen, integrity, peak


def test_a_segment_declaring_absurd_row_counts_is_damage_not_an_allocation(tmp_path: Path) -> None:
    """A CRC-valid SEGMENT and INDEX whose streams claim 2**40 rows: reported as damage, no
    terabyte arrays, every original row still read."""
    base = base_file("crashed")
    sync = base[SYNC_AT : SYNC_AT + SYNC_SIZE]
    bounds = record_bounds(base)
    seg_start, seg_end, _ = next(b for b in bounds if b[2] == RecordKind.SEGMENT)
    payload = bytearray(base[seg_start + 25 : seg_end - 4])
    (head_len,) = struct.unpack_from("<I", payload)
    head = msgpack.unpackb(bytes(payload[4 : 4 + head_len]))
    head["streams"] = [[rank, table, 2**40] for rank, table, _ in head["streams"]]
    new_head = msgpack.packb(head)
    lying = struct.pack("<I", len(new_head)) + new_head + bytes(payload[4 + head_len :])
    data = base + frame(sync, RecordKind.SEGMENT, lying)
    path = tmp_path / "absurd.tml"
    path.write_bytes(data)
    seen, integrity, peak = _read_bounded(path, tmp_path)
    assert peak < MEMORY_BOUND
    assert integrity is not None and integrity["status"] == "damaged", integrity
    assert len(seen) == len(original_steps(base, (0, 0), tmp_path))


def test_an_index_declaring_absurd_row_counts_is_damage_not_an_allocation(tmp_path: Path) -> None:
    """The last INDEX of a crashed file lists a real segment with 2**40 rows and raw_size."""
    base = base_file("crashed")
    sync = base[SYNC_AT : SYNC_AT + SYNC_SIZE]
    seg_start, seg_end, _ = next(b for b in record_bounds(base) if b[2] == RecordKind.SEGMENT)
    entry = [seg_start, seg_end - seg_start, None, None, None, None, 2**40, [[0, "step_time", 2**40]]]
    index = msgpack.packb({"prev": None, "final": False, "segments": [entry], "attachments": [], "schemas": []})
    cut = max(end for _, end, _ in record_bounds(base))
    path = tmp_path / "absurd_index.tml"
    path.write_bytes(base[:cut] + frame(sync, RecordKind.INDEX, index))
    seen, integrity, peak = _read_bounded(path, tmp_path)
    assert peak < MEMORY_BOUND
    assert integrity is not None and integrity["status"] == "damaged", integrity


def test_msgpack_extension_types_in_records_are_damage_never_objects(tmp_path: Path) -> None:
    """An ATTACHMENT, SCHEMA and HEADER-kind record carrying msgpack ext types (here wrapping a
    pickle that would create a file) are reported as skipped; nothing is constructed."""
    base = base_file("clean")
    sync = base[SYNC_AT : SYNC_AT + SYNC_SIZE]
    marker = tmp_path / "pwned"
    evil = msgpack.ExtType(1, b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    records = b"".join(
        frame(sync, kind, msgpack.packb({"name": "evil", "data": {"x": evil}, "columns": [["a", evil]]}))
        for kind in (RecordKind.ATTACHMENT, RecordKind.SCHEMA, RecordKind.SUMMARY)
    )
    cut = record_bounds(base)[3][0]
    path = tmp_path / "ext.tml"
    path.write_bytes(base[:cut] + records + base[cut:])
    seen, integrity = read_everything(path, tmp_path)
    assert integrity is not None and integrity["status"] == "damaged"
    assert sum("extension type" in s["reason"] for s in integrity["skipped"]) >= 2, integrity["skipped"]
    with open_recording(path) as rec:
        assert "evil" not in rec.attachments
    assert not marker.exists()
