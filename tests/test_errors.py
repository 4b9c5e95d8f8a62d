"""Errors that carry their fields build their own messages (expected, found, where, what to change),
keep them when a room adds where it happened (``within``), and survive pickling."""

from __future__ import annotations

import pickle

import pytest

from traceml.errors import (
    CorruptRecordError,
    DecodeBudgetError,
    DecompressionBombError,
    FormatError,
    FrameTooLargeError,
    ReadLimitError,
    RecordTooLargeError,
    TracemlError,
)


def test_record_too_large_names_kind_offset_length_limit_and_the_setting() -> None:
    read = RecordTooLargeError("SEGMENT", 4294967295, 64 << 20, offset=120, setting="raise ReadLimits.max_record_bytes")
    assert (read.kind, read.length, read.limit, read.offset) == ("SEGMENT", 4294967295, 64 << 20, 120)
    assert str(read) == (
        "SEGMENT record at byte 120 declares 4294967295 bytes, over the 64 MiB record limit"
        " (raise ReadLimits.max_record_bytes)"
    )
    written = RecordTooLargeError("ATTACHMENT", 70_000_000, 64 << 20, setting="store less data per record")
    assert str(written) == (
        "a ATTACHMENT record of 70000000 bytes exceeds the 64 MiB record limit; store less data per record"
    )
    assert "2000-byte record limit" in str(RecordTooLargeError("INDEX", 3000, 2000, offset=8, setting="s"))


def test_decompression_bomb_says_cap_or_declared_size() -> None:
    capped = DecompressionBombError("SEGMENT", 5 << 20, 1 << 20, offset=64, setting="raise the cap")
    assert str(capped) == "SEGMENT at byte 64 declares 5242880 decompressed bytes, over the 1 MiB cap (raise the cap)"
    assert str(DecompressionBombError("zstd frame", 900, 100, declared=True)) == (
        "zstd frame would expand to 900 bytes; the segment head declares 100"
    )
    assert str(DecompressionBombError("zstd frame", None, 100, declared=True)) == (
        "zstd frame expands beyond the 100 bytes its segment declares"
    )


def test_frame_too_large_names_the_rank_once_it_is_known() -> None:
    err = FrameTooLargeError(80 << 20, 16 << 20, setting="raise it with TRACEML_MAX_FRAME_MB")
    assert str(err) == (
        "frame of 83886080 bytes (80 MiB) exceeds the 16777216-byte (16 MiB) frame limit;"
        " raise it with TRACEML_MAX_FRAME_MB"
    )
    ranked = err.from_rank(3)
    assert ranked.rank == 3 and "(80 MiB) from rank 3 exceeds" in str(ranked)
    assert err.from_rank(None) is err and ranked.from_rank(5) is ranked
    buffered = FrameTooLargeError(10, 8, setting="max_buffered_bytes", rank=2, buffered=True)
    assert (
        str(buffered) == "10 bytes buffered from rank 2 exceed the per-connection bound of 8 bytes (max_buffered_bytes)"
    )


def test_decode_budget_names_size_budget_and_the_variable() -> None:
    err = DecodeBudgetError(2048, 16512, base=16384, per_kib=64, setting="TRACEML_MAX_OBJECTS_PER_KIB")
    assert (err.length, err.budget, err.per_kib) == (2048, 16512, 64)
    assert str(err).startswith("frame of 2048 bytes decodes to more than 16512 objects, its decode budget (16384 + 64")
    assert str(err).endswith("raise TRACEML_MAX_OBJECTS_PER_KIB (now 64)")


@pytest.mark.parametrize(
    "error",
    [
        RecordTooLargeError("SEGMENT", 9, 8, offset=1, setting="s"),
        DecompressionBombError("zstd frame", None, 100, declared=True),
        ReadLimitError("tables in the file", 5000, 4096, setting="max_tables", offset=8),
        FrameTooLargeError(9, 8, setting="s", rank=1),
        DecodeBudgetError(100, 16390, base=16384, per_kib=64, setting="TRACEML_MAX_OBJECTS_PER_KIB"),
        CorruptRecordError("bad CRC"),
    ],
)
def test_within_keeps_type_and_fields_and_pickling_keeps_both(error: TracemlError) -> None:
    wider = error.within("run.tml: the HEADER record is unreadable")
    assert type(wider) is type(error) and wider.__dict__ == error.__dict__
    assert str(wider) == f"run.tml: the HEADER record is unreadable: {error}"
    back = pickle.loads(pickle.dumps(wider))
    assert type(back) is type(error) and str(back) == str(wider) and back.__dict__ == error.__dict__
    assert isinstance(back, FormatError) == isinstance(error, FormatError)
