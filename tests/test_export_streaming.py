"""The CSV export streams segment by segment: it never loads a whole table (``read_table``),
so its memory does not grow with the run (figures: benchmarks/bench_reader_memory.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from traceml.format import open_recording
from traceml.format.export import export_csv
from traceml.format.reader import TmlReader
from traceml.testing.synthetic import synthetic_run, write_recording

STEPS = 3_000
RANKS = 3
#: counter rows per window in the streaming test (the process table has ~100 rows per rank)
COUNTER_WINDOW = 20


def test_csv_reads_segment_by_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "run.tml"
    write_recording(src, synthetic_run(ranks=RANKS, steps=STEPS), chunk_steps=250, segment_max_bytes=16 << 10)

    def whole_table(*args: object, **kwargs: object) -> None:
        raise AssertionError("an export loaded a whole table into memory")

    with open_recording(src) as reader:
        expected = {r: c["step_us"].tolist() for r, c in reader.read_table("step_time").items()}
        assert len(reader.segments) > 20  # many segments: the streaming is exercised
        monkeypatch.setattr(TmlReader, "read_table", whole_table)
        export_csv(reader, tmp_path / "csv")
    with (tmp_path / "csv" / "step_time.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == RANKS * STEPS
    for rank in range(RANKS):  # each rank's rows in step order, values as recorded
        assert [int(r["step_us"]) for r in rows if r["rank"] == str(rank)] == expected[rank]


def test_chrome_trace_goes_rank_by_rank_and_window_by_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip
    import json

    from traceml.format import export

    src = tmp_path / "run.tml"
    write_recording(src, synthetic_run(ranks=RANKS, steps=STEPS), chunk_steps=250, segment_max_bytes=16 << 10)
    read: list[tuple[str, int]] = []
    real = TmlReader.read_table

    def counted(self: TmlReader, table: str, *args: object, **kwargs: object) -> object:
        out = real(self, table, *args, **kwargs)  # type: ignore[arg-type]
        read.append((table, sum(len(c["ts_ns"]) for c in out.values())))
        return out

    with open_recording(src) as reader:
        whole = export.chrome_trace(reader)
        seg_rows = {
            t: max((n for seg in reader.segments for (_, tt), n in seg.rows.items() if tt == t), default=0)
            for t in export._TRACE_COUNTER_TABLES
        }
        assert "process" in reader.tables
        for steps in ((None, None), (700, 2100)):
            read.clear()

            monkeypatch.setattr(export, "WINDOW_STEPS", 400)
            monkeypatch.setattr(export, "WINDOW_COUNTER_ROWS", COUNTER_WINDOW)
            monkeypatch.setattr(TmlReader, "read_table", counted)
            out = tmp_path / f"t{steps[0]}.json.gz"
            export.write_chrome_trace(reader, out, steps=steps)
            monkeypatch.setattr(TmlReader, "read_table", real)
            monkeypatch.setattr(export, "WINDOW_STEPS", 10**9)
            monkeypatch.setattr(export, "WINDOW_COUNTER_ROWS", 10**9)
            assert max(n for t, n in read if t == "step_time") <= 400  # never more than a window of a rank
            # counters too: a window of rows of one rank, plus at most the segment that crossed it
            for table in export._TRACE_COUNTER_TABLES:
                reads = [n for t, n in read if t == table]
                if table in reader.tables:
                    assert reads and max(reads) <= COUNTER_WINDOW + seg_rows[table], (table, reads)
            assert len([n for t, n in read if t == "process"]) > 2 * RANKS  # several windows per rank
            doc = json.loads(gzip.decompress(out.read_bytes()))
            expected = whole if steps == (None, None) else export.chrome_trace(reader, steps)
            key = lambda e: json.dumps(e, sort_keys=True)  # noqa: E731
            assert sorted(map(key, doc["traceEvents"])) == sorted(map(key, expected["traceEvents"]))
            assert doc["otherData"] == expected["otherData"]
    assert sum(1 for e in whole["traceEvents"] if e["name"] == "step") == RANKS * STEPS
