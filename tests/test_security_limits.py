"""Reader limits on crafted recordings (``tests/crafted_tml.py``; spec: docs/format.md, "Reader
limits"): whatever counts a file declares, the reader allocates within ``ReadLimits``; what is over a
limit is skipped and reported in ``integrity`` (or refused with ``ReadLimitError``), never a crash or
an allocation the size of the claim.  Memory is checked as a budget (tracemalloc peaks), not a time."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import crafted_tml
from traceml.errors import ReadLimitError
from traceml.format import ReadLimits, _records, open_recording
from traceml.format._records import unpack


def _peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak bytes it allocated (Python objects and numpy arrays)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _reasons(reader: Any) -> str:
    return "\n".join(s["reason"] for s in reader.integrity["skipped"])


def test_the_limit_error_says_what_was_found_the_limit_and_the_setting() -> None:
    err = ReadLimitError("tables in the file", 5000, 4096, setting="max_tables", offset=120)
    assert (err.found, err.limit, err.setting, err.offset) == (5000, 4096, "max_tables", 120)
    assert str(err) == (
        "tables in the file at byte 120: 5000 found, over the reader's limit of 4096"
        " (raise ReadLimits.max_tables only for a file you trust)"
    )


def test_msgpack_payloads_are_bounded_in_objects_not_only_in_bytes() -> None:
    flat = crafted_tml.empty_arrays(5_000)  # 5 KB: 5,001 lists, counted 10,001 (each list, each item)
    assert len(unpack(flat, "x", 10_001)) == 5_000
    with pytest.raises(ReadLimitError, match="max_record_objects"):
        unpack(flat, "x", 10_000)
    with pytest.raises(ReadLimitError, match="max_record_objects"):  # refused at the array's header
        unpack(flat, "x", 4_999)
    nested = b"\x9a" + (b"\x9a" + b"\x90" * 10) * 10  # [[[] x 10] x 10]: 1 + 10 + 10 * (1 + 10) + 100
    assert len(unpack(nested, "x", 221)) == 10
    with pytest.raises(ReadLimitError, match="max_record_objects"):  # counted as the containers close
        unpack(nested, "x", 220)


def test_an_attachment_of_empty_arrays_is_skipped_without_building_it(tmp_path: Path) -> None:
    # 2 MB on disk; decoded it would be 2 M Python lists (about 128 MB)
    path = crafted_tml.attachment_of_empty_arrays(tmp_path / "a.tml", 2_000_000)

    def read() -> dict[str, Any]:
        with open_recording(path) as r:
            r.verify()
            return r.integrity

    integrity, peak = _peak(read)
    assert peak < 24 << 20, f"peak {peak >> 20} MiB"
    assert integrity["status"] == "damaged"
    assert "max_record_objects" in integrity["skipped"][0]["reason"]
    small = crafted_tml.attachment_of_empty_arrays(tmp_path / "b.tml", 1_000)
    with open_recording(small) as r:
        r.verify()
        assert r.integrity["status"] == "recovered" and len(r.attachments["x"]["a"]) == 1_000


def test_the_attachments_kept_share_one_object_budget(tmp_path: Path) -> None:
    c = crafted_tml.Crafter(tmp_path / "many.tml")
    for i in range(10):  # 10 attachments of 1,000 empty arrays: 2,005 objects each
        c.record(crafted_tml.RecordKind.ATTACHMENT,
                 _records.attachment_payload(f"a{i}", {"a": [[] for _ in range(1_000)]}))  # fmt: skip
    c.record(crafted_tml.RecordKind.ATTACHMENT, _records.attachment_payload("a0", {"a": []}))  # replaces a0
    path = c.close(footer=False)
    with open_recording(path, limits=ReadLimits(max_attachment_objects=9_000)) as r:
        assert sorted(r.attachments) == ["a0", "a1", "a2", "a3"]  # a4 would make 10,025
        assert r.attachments["a0"] == {"a": []}  # the last a0 fits: it frees what the first one held
        assert _reasons(r).count("max_attachment_objects") == 6
    with open_recording(path) as r:
        assert len(r.attachments) == 10 and r.integrity["status"] == "recovered"


def test_an_index_listing_one_segment_many_times_is_not_used_and_the_row_is_read_once(tmp_path: Path) -> None:
    path = crafted_tml.index_repeating_one_segment(tmp_path / "i.tml", 20_000)
    with open_recording(path) as r:
        assert len(r.segments) == 1
        assert r.read_table("t")[0]["v"].tolist() == [7]
        assert r.integrity["status"] == "damaged"
        assert "overlaps" in _reasons(r) and "every record was scanned instead" in _reasons(r)


def test_an_index_chain_over_the_segment_limit_is_not_used(tmp_path: Path) -> None:
    path = crafted_tml.tiny_segments(tmp_path / "s.tml", 50)
    with open_recording(path, limits=ReadLimits(max_segments=20)) as r:
        assert len(r.segments) == 20
        reasons = _reasons(r)
        assert "INDEX chain not used" in reasons and "max_segments" in reasons
        assert reasons.count("SEGMENT skipped: segments in the file") == 30
        assert r.integrity["lost_bytes"] >= 30 * 60


def test_damage_past_the_listing_limit_is_counted_in_one_entry(tmp_path: Path) -> None:
    path = crafted_tml.tiny_segments(tmp_path / "s.tml", 50, footer=False)
    with open_recording(path, limits=ReadLimits(max_segments=20, max_skipped_spans=10)) as r:
        skipped = r.integrity["skipped"]
        assert len(skipped) == 11
        assert skipped[-1]["reason"].startswith("20 more damaged or skipped spans, not listed one by one")
        lengths = {s.length for s in r.segments}
        assert r.integrity["lost_bytes"] == 30 * lengths.pop() and not lengths
        r.verify()  # a second pass over the same records counts nothing twice
        assert r.integrity["lost_bytes"] == 30 * next(iter(s.length for s in r.segments))


def test_segments_past_the_rank_and_stream_limits_are_skipped(tmp_path: Path) -> None:
    path = crafted_tml.segment_with_many_streams(tmp_path / "m.tml", 3_000)
    with open_recording(path, limits=ReadLimits(max_ranks=1_000)) as r:
        assert r.segments == [] and "ranks in the file at byte 183: 3000 found" in _reasons(r)
    with open_recording(path, limits=ReadLimits(max_index_streams=2_999)) as r:
        assert r.segments == [] and "max_index_streams" in _reasons(r)
    with open_recording(path, limits=ReadLimits(max_record_objects=10_000)) as r:  # 12,000+ in its head
        assert r.segments == [] and "SEGMENT head msgpack objects" in _reasons(r)
    with open_recording(path) as r:
        assert len(r.ranks) == 3_000  # within the defaults: indexed (its body does not decode)


def test_schemas_past_the_column_and_table_limits_are_skipped(tmp_path: Path) -> None:
    path = crafted_tml.wide_schemas(tmp_path / "w.tml", tables=20, columns=50)
    with open_recording(path, limits=ReadLimits(max_columns=40)) as r:
        assert r.schemas == {}
        assert _reasons(r).count("columns: 50 found, over the reader's limit of 40") == 20
    with open_recording(path, limits=ReadLimits(max_tables=10)) as r:
        assert sorted(r.schemas) == sorted(f"t{i}" for i in range(10))
        assert _reasons(r).count("max_tables") == 10
    with open_recording(path, limits=ReadLimits(max_schema_columns=120)) as r:
        assert sorted(r.schemas) == ["t0", "t1"]
        assert _reasons(r).count("columns summed over the file's tables") == 18
    with open_recording(path) as r:
        assert len(r.schemas) == 20 and r.integrity["status"] == "recovered"


@pytest.mark.parametrize("dtype", ["i8", "str"])
def test_a_segment_that_would_decode_past_its_budget_allocates_nothing_for_it(tmp_path: Path, dtype: str) -> None:
    # i8: 8 columns of 1 M zero rows stored at 1 byte a value: 8 MB of body, 64 MB of arrays;
    # str: 1 M empty strings, 1 MB of body, 72 MB counted (pointers and str objects)
    columns = 8 if dtype == "i8" else 1
    path = crafted_tml.zero_rows(tmp_path / "z.tml", 1_000_000, columns, segments=2, dtype=dtype)
    limits = ReadLimits(max_decoded_bytes=16 << 20)

    def read() -> tuple[Any, ...]:
        with open_recording(path, limits=limits) as r:
            return r.read_table("t"), list(r.iter_batches()), r.verify(), _reasons(r)

    (table, batches, stats, reasons), peak = _peak(read)
    assert table == {} and batches == [] and stats == {}
    assert "max_decoded_bytes" in reasons
    assert peak < 24 << 20, f"peak {peak >> 20} MiB"  # the body (8 MB) is decompressed, no array is made
    with open_recording(path) as r:  # within the default budget the same file reads
        rows = r.read_table("t")[0]["c0"]
        assert len(rows) == 2_000_000 and not any(rows)


@pytest.mark.parametrize("schema", [True, False])
def test_a_read_of_cheap_rows_is_refused_past_its_expansion_budget(tmp_path: Path, schema: bool) -> None:
    # 10 segments of 500,000 rows x 8 i8 columns of zeros, a few hundred bytes each on disk: each
    # within max_decoded_bytes (32 MB of arrays), together 320 MB for read_table. With the table's
    # schema read_table sizes its arrays from the index: refused before any exists; without it, it
    # decodes segment by segment: refused once what it holds passes the budget
    path = crafted_tml.zero_rows(tmp_path / "z.tml", 500_000, 8, segments=10, schema=schema)
    limits = ReadLimits(max_decoded_bytes=32 << 20)

    def read() -> None:
        with open_recording(path, limits=limits) as r, pytest.raises(ReadLimitError, match="max_expansion") as err:
            r.read_table("t")
        assert err.value.found == (320_000_000 if schema else 64_000_000)

    _, peak = _peak(read)
    assert peak < (8 << 20 if schema else 120 << 20), f"peak {peak >> 20} MiB"
    with open_recording(path, limits=limits) as r:  # the rows are there: segment by segment reads them all
        assert sum(len(c["c0"]) for _, _, c in r.iter_batches()) == 5_000_000
