"""Damaged, truncated, hostile and future .tml files: the reader raises only traceml errors,
returns every intact segment and reports what it skipped."""

from __future__ import annotations

import os
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_format_roundtrip import FakeClock, assert_columns_equal, record_kinds, step_columns, writer

from traceml.errors import (
    DecompressionBombError,
    FormatError,
    NotATmlFileError,
    RecordTooLargeError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from traceml.format import MAGIC, ReadLimits, RecordKind, SegmentInfo, TmlWriter, _records, open_recording
from traceml.schema import table

TICK = table("tick", ("step", "i8"), ("ts_ns", "i8"), ("v", "f4"), ("tag", "str"))


def tick_columns(start: int, n: int) -> dict[str, Any]:
    steps = np.arange(start, start + n, dtype=np.int64)
    return {
        "step": steps,
        "ts_ns": 1_760_000_000_000_000_000 + steps * 1_000_003,
        "v": (steps * 0.5).astype(np.float32),
        "tag": [f"s{i}" for i in range(start, start + n)],
    }


def small_recording(path: Path) -> Path:
    """Seven segments, two mid-file checkpoints, a SCHEMA record, attachments, a footer: ~3 KB."""
    clock = FakeClock()
    meta = {"run_id": "small", "command": ["train.py"], "hosts": ["h"]}
    with writer(path, clock, schemas=[TICK], checkpoint_every_segments=2, run_meta=meta) as w:
        w.attach("environment/rank0", {"python": "3.11"})
        for i in range(6):
            w.append(i % 2, "tick", tick_columns(i * 3, 3))
            clock.advance(1.1)
            w.tick()
        w.append(0, "custom", {"s": ["α", "b"], "v": np.array([np.nan, -0.0])})
        w.close(summary={"ok": True})
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = small_recording(tmp_path_factory.mktemp("small") / "small.tml")
    records = record_kinds(path)
    with open_recording(path) as r:
        segments = r.segments
        per_segment = {seg.offset: r.read_segment(seg) for seg in segments}
    return {
        "path": path,
        "data": path.read_bytes(),
        "records": records,
        "header_end": records[1][0],
        "segments": segments,
        "per_segment": per_segment,
    }


def assert_batches(got: list[Any], want: list[Any]) -> None:
    assert [(rank, table) for rank, table, _ in got] == [(rank, table) for rank, table, _ in want]
    for (_, _, g), (_, _, w) in zip(got, want, strict=True):
        assert_columns_equal(g, w)


def test_small_recording_shape(small: dict[str, Any]) -> None:
    kinds = [k for _, k, _ in small["records"]]
    assert kinds.count(RecordKind.SEGMENT) == 7
    assert kinds.count(RecordKind.INDEX) >= 3  # checkpoints in the middle plus the final one
    assert RecordKind.SCHEMA in kinds and RecordKind.ATTACHMENT in kinds
    assert len(small["data"]) < 4500  # small enough to cut and flip at every byte (1.2: INDEX holds a HEADER copy)


def test_truncation_at_every_offset(small: dict[str, Any], tmp_path: Path) -> None:
    data, segments, per_segment = small["data"], small["segments"], small["per_segment"]
    boundaries = [off for off, _, _ in small["records"]] + [len(data)]
    env_end = next(off + n for off, k, n in small["records"] if k == RecordKind.ATTACHMENT)
    path = tmp_path / "cut.tml"
    path.write_bytes(data)
    for cut in range(len(data), -1, -1):
        os.truncate(path, cut)
        if cut < small["header_end"]:
            with pytest.raises(TruncatedFileError):
                open_recording(path)
            continue
        with open_recording(path) as r:
            got = list(r.iter_batches())
            integrity = r.integrity
            attachments = r.attachments
        want = [b for seg in segments if seg.offset + seg.length <= cut for b in per_segment[seg.offset]]
        assert_batches(got, want)
        assert integrity["status"] == ("complete" if cut == len(data) else "recovered"), cut
        start = max(b for b in boundaries if b <= cut)
        if start == cut:
            assert integrity["skipped"] == []
        else:
            assert [(s["offset"], s["length"]) for s in integrity["skipped"]] == [(start, cut - start)]
            assert "writer did not finish" in integrity["skipped"][0]["reason"]
        assert ("environment/rank0" in attachments) == (cut >= env_end)


def _read_everything(path: Path, *, verify: bool = True) -> tuple[list[Any], dict[str, Any]]:
    with open_recording(path) as r:
        if verify:
            r.verify()
        got = list(r.iter_batches())
        return got, r.integrity


def test_a_flipped_bit_anywhere_is_detected_and_every_other_segment_read(small: dict[str, Any], tmp_path: Path) -> None:
    data, segments, per_segment = small["data"], small["segments"], small["per_segment"]
    path = tmp_path / "flip.tml"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        path.write_bytes(flipped)
        if i < len(MAGIC):
            with pytest.raises(FormatError):
                open_recording(path)
            continue
        got, integrity = _read_everything(path, verify=False)  # opening and reading alone must notice
        # a damaged HEADER costs only itself: every segment after it is read (format 1.2)
        want = [b for s in segments if not s.offset <= i < s.offset + s.length for b in per_segment[s.offset]]
        assert_batches(got, want)
        assert integrity["status"] == "damaged", i
        assert any(s["offset"] <= i < s["offset"] + s["length"] for s in integrity["skipped"]), (i, integrity)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_keeps_every_intact_segment(small: dict[str, Any], tmp_path: Path, data: st.DataObject) -> None:
    original, segments, per_segment = small["data"], small["segments"], small["per_segment"]
    start = small["header_end"]
    damaged = bytearray(original)
    hits = data.draw(st.lists(st.integers(start, len(original) - 1), min_size=1, max_size=4))
    for pos in hits:
        # unlike the original byte (not the current one: a position drawn twice must stay damaged)
        damaged[pos] = data.draw(st.integers(0, 255).filter(lambda b, p=pos: b != original[p]))
    garbage = data.draw(st.binary(max_size=64))
    path = tmp_path / "fuzz.tml"
    path.write_bytes(bytes(damaged) + garbage)
    got, integrity = _read_everything(path)
    want = [
        b for s in segments if not any(s.offset <= p < s.offset + s.length for p in hits) for b in per_segment[s.offset]
    ]
    assert_batches(got, want)
    assert integrity["status"] == "damaged"


# --- hostile lengths and decompression bombs ---------------------------------------------


def _frame(sync: bytes, kind: int, length: int) -> bytes:
    kind_len = struct.pack("<BI", kind, length)
    return sync + kind_len + struct.pack("<I", zlib.crc32(kind_len))


def test_huge_declared_length_is_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "huge.tml"
    w = writer(path, FakeClock(), segment_max_age_s=1.0)
    w.append(0, "step_time", step_columns(0, 5))
    w.tick()
    w._close_segment()
    w._write(_frame(w._sync, RecordKind.SEGMENT, 2**32 - 1) + b"x" * 100)  # valid head CRC, absurd length
    w.append(0, "step_time", step_columns(5, 5))
    w.close()
    tracemalloc.start()
    try:
        with open_recording(path) as r:
            r.verify()
            steps = r.read_table("step_time")[0]["step"]
            integrity = r.integrity
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    np.testing.assert_array_equal(steps, np.arange(10))
    assert integrity["status"] == "damaged"
    (skip,) = integrity["skipped"]
    assert "4294967295 bytes, over the 64 MiB record limit" in skip["reason"]
    assert "ReadLimits.max_record_bytes" in skip["reason"]
    # the same file cut before its only INDEX: the forward scan from the header meets the record too
    data = path.read_bytes()
    (index_at,) = struct.unpack("<Q", data[-28:-20])  # the FOOTER's pointer to the only INDEX
    assert data[index_at + 16] == RecordKind.INDEX
    cut = tmp_path / "huge_cut.tml"
    cut.write_bytes(data[:index_at])
    with open_recording(cut) as r:
        np.testing.assert_array_equal(r.read_table("step_time")[0]["step"], np.arange(10))
        assert "over the 64 MiB record limit" in r.integrity["skipped"][0]["reason"]


def test_huge_header_length_raises_record_too_large(tmp_path: Path) -> None:
    path = tmp_path / "hdr.tml"
    path.write_bytes(MAGIC + _frame(os.urandom(16), RecordKind.HEADER, 2**31) + b"x" * 50)
    with pytest.raises(RecordTooLargeError, match=r"declares 2147483648 bytes, over the 64 MiB record limit"):
        open_recording(path)


def test_smaller_record_limit_skips_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "limit.tml"
    with writer(path, FakeClock()) as w:
        w.append(0, "step_time", step_columns(0, 400))
        w._close_segment()
        w.append(0, "step_time", step_columns(400, 2))
    sizes = {kind: n for _, kind, n in record_kinds(path)}
    # The header holds the process's command line, so its size varies with how pytest was called.
    limit = max(2000, sizes[RecordKind.HEADER] + 1)
    assert sizes[RecordKind.HEADER] < limit < max(n for _, k, n in record_kinds(path) if k == RecordKind.SEGMENT)
    with open_recording(path, limits=ReadLimits(max_record_bytes=limit)) as r:
        steps = r.read_table("step_time")[0]["step"]
        integrity = r.integrity
    np.testing.assert_array_equal(steps, [400, 401])
    assert integrity["status"] == "damaged"
    assert any(f"over the {limit}-byte record limit" in s["reason"] for s in integrity["skipped"])


def _bomb_payload(declared: int, body: bytes) -> bytes:
    head = _records.pack_map(
        {
            "t_min": None,
            "t_max": None,
            "step_min": None,
            "step_max": None,
            "tables": ["bomb"],
            "streams": [[0, 0, 1]],
            "raw_size": declared,
            "codec": "zstd",
        }
    )
    return struct.pack("<I", len(head)) + head + body


@pytest.mark.parametrize("case", ["content-size-lies", "declared-over-cap", "no-content-size"])
def test_decompression_bombs_are_refused_with_bounded_memory(tmp_path: Path, case: str) -> None:
    zeros = b"\0" * (16 << 20)
    if case == "no-content-size":
        stream = zstandard.ZstdCompressor(level=3).compressobj()
        body = stream.compress(zeros) + stream.flush()
        payload = _bomb_payload(1000, body)
    elif case == "declared-over-cap":
        payload = _bomb_payload(2**40, zstandard.ZstdCompressor(level=3).compress(zeros))
    else:
        payload = _bomb_payload(1000, zstandard.ZstdCompressor(level=3).compress(zeros))
    del zeros
    path = tmp_path / "bomb.tml"
    with writer(path, FakeClock()) as w:
        w.append(0, "step_time", step_columns(0, 5))
        w._close_segment()
        w._write_record(RecordKind.SEGMENT, payload)
        w.append(0, "step_time", step_columns(5, 5))
    tracemalloc.start()
    try:
        with open_recording(path, limits=ReadLimits(max_decompressed_bytes=8 << 20)) as r:
            r.verify()  # meets the unindexed segment
            bomb = next(
                SegmentInfo(off, n, None, None, None, None, (0,), {(0, "bomb"): 1}, 0)
                for off, kind, n in record_kinds(path)
                if kind == RecordKind.SEGMENT and off not in {s.offset for s in r.segments if s.tables == {"step_time"}}
            )
            with pytest.raises(DecompressionBombError) as err:
                r.read_segment(bomb)
            steps = r.read_table("step_time")[0]["step"]
            integrity = r.integrity
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    message = str(err.value)
    assert ("cap" in message and "ReadLimits.max_decompressed_bytes" in message) or "1000" in message
    np.testing.assert_array_equal(steps, np.arange(10))
    assert integrity["status"] == "damaged"
    assert integrity["skipped"][0]["offset"] == bomb.offset


# --- versions, foreign files, unknown kinds -----------------------------------------------


def test_newer_major_version_in_magic_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "v2.tml"
    path.write_bytes(b"\x89TML2\r\n\x1a" + b"\0" * 64)
    with pytest.raises(UnsupportedVersionError, match=r"version 2\.x; this traceml reads version 1\.2"):
        open_recording(path)


def test_newer_major_version_in_header_is_refused_naming_both(tmp_path: Path) -> None:
    sync = os.urandom(16)
    header = _records.pack_map(
        {
            "format_version": "3.1",
            "writer": "traceml 9",
            "run_id": "r",
            "created_ns": 1,
            "hosts": [],
            "world_size": 1,
            "command": [],
            "meta": {},
            "schemas": {},
            "sync": sync,
        }
    )
    path = tmp_path / "v3.tml"
    path.write_bytes(MAGIC + _records.pack_record(sync, RecordKind.HEADER, header))
    with pytest.raises(UnsupportedVersionError, match=r"version 3\.1; this traceml reads version 1\.2"):
        open_recording(path)


def test_foreign_and_empty_files(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello, this is not a recording\n")
    with pytest.raises(NotATmlFileError, match="notes.txt is not a readable .tml recording"):
        open_recording(foreign)
    empty = tmp_path / "empty.tml"
    empty.write_bytes(b"")
    with pytest.raises(TruncatedFileError):
        open_recording(empty)
    with pytest.raises(FormatError, match="cannot open recording"):
        open_recording(tmp_path / "missing.tml")


def test_unknown_and_private_record_kinds_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "future.tml"
    with writer(path, FakeClock()) as w:
        w.append(0, "step_time", step_columns(0, 5))
        w._close_segment()
        w._write_record(0x42, b"a record kind from a future minor version")
        w._write_record(0xE7, _records.pack_map({"private": True}))
        w.append(0, "step_time", step_columns(5, 5))
    data = path.read_bytes()
    footer_at = len(data) - _records.FOOTER_SIZE
    index_at = max(off for off, kind, _ in record_kinds(path) if kind == RecordKind.INDEX)
    crashed = tmp_path / "future_crashed.tml"
    crashed.write_bytes(data[:index_at])  # as if killed before the final index: scanned forward
    for candidate, status in ((path, "complete"), (crashed, "recovered")):
        with open_recording(candidate) as r:
            r.verify()
            np.testing.assert_array_equal(r.read_table("step_time")[0]["step"], np.arange(10))
            assert r.integrity["status"] == status
            assert r.integrity["skipped"] == []
    assert footer_at > index_at


def test_writer_refuses_records_over_the_limit(tmp_path: Path) -> None:
    with TmlWriter(tmp_path / "big.tml", run_meta={}, fsync_interval_s=None) as w:
        with pytest.raises(RecordTooLargeError, match="64 MiB record limit"):
            w.attach("blob", {"data": b"\0" * (65 << 20)})
        w.attach("small", {"ok": True})
    with open_recording(tmp_path / "big.tml") as r:
        assert r.attachments == {"small": {"ok": True}}


def _lying_segment(sync: bytes, head_fields: dict[str, Any], body: bytes) -> bytes:
    head = _records.pack_map(head_fields)
    return _records.pack_record(sync, RecordKind.SEGMENT, struct.pack("<I", len(head)) + head + body)


@pytest.mark.parametrize("where", ["segment-head", "index-entry", "index-entry-under-raw-size"])
def test_absurd_row_counts_are_damage_not_allocations(tmp_path: Path, where: str) -> None:
    """CRC-valid records whose streams claim 2**40 rows (or more rows than their columns can
    hold): reported, never used to size an array, every real row still read."""
    path = tmp_path / "liar.tml"
    w = writer(path, FakeClock(), checkpoint_every_segments=1000)
    w.append(0, "step_time", step_columns(0, 5))
    w._close_segment()
    real = w._pending_segments[0]
    offset, length, head = real
    w.append(0, "step_time", step_columns(5, 5))
    w._close_segment()
    data = path.read_bytes()
    payload = data[offset + _records.FRAME_HEAD_SIZE : offset + length - 4]
    (head_len,) = struct.unpack_from("<I", payload)
    fields = _records.unpack(payload[4 : 4 + head_len], "head")
    if where == "segment-head":
        fields["streams"] = [[0, 0, 2**40]]
        w._write(_lying_segment(w._sync, fields, payload[4 + head_len :]))
    else:
        rows = 2**40 if where == "index-entry" else head.raw_size  # the second fits raw_size, not 10 columns
        w._pending_segments[0] = (offset, length, _records.SegmentHead(
            head.t_min, head.t_max, head.step_min, head.step_max, ((0, "step_time", rows),), head.raw_size
        ))  # fmt: skip
    w.close()
    tracemalloc.start()
    try:
        with open_recording(path) as r:
            r.verify()
            steps = r.read_table("step_time")
            integrity = r.integrity
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert integrity["status"] == "damaged"
    if where == "index-entry":  # the whole chain is refused: a forward scan finds both segments
        np.testing.assert_array_equal(steps[0]["step"], np.arange(10))
    elif where == "segment-head":
        np.testing.assert_array_equal(steps[0]["step"], np.arange(10))
        assert any("claims 1099511627776 rows" in s["reason"] for s in integrity["skipped"])
    else:  # the lying entry is skipped; the other segment is read
        np.testing.assert_array_equal(steps[0]["step"], np.arange(5, 10))
        assert any("cannot fit in a body" in s["reason"] for s in integrity["skipped"])
