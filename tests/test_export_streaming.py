"""The CSV export streams segment by segment: it never loads a whole table (``read_table``),
so its memory does not grow with the run (figures: benchmarks/bench_reader_memory.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from replay.synthetic import synthetic_run, write_recording
from traceml.format import open_recording
from traceml.format.export import export_csv
from traceml.format.reader import TmlReader

STEPS = 3_000
RANKS = 3


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
