"""Rollup tables: what the writer stores, where, and what a reader makes of crashed and old files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_format_roundtrip import FakeClock, assert_columns_equal, step_columns, writer
from traceml.errors import ConfigError
from traceml.format import open_recording, rollup
from traceml.schema import STEP_REGION, STEP_TIME, is_rollup, rollup_schema


def test_rollup_schema_keeps_counts_sums_and_extremes() -> None:
    schema = rollup_schema(STEP_TIME)
    assert schema is not None and schema.name == "rollup/step_time"
    cols = dict((c.name, c.dtype) for c in schema.columns)
    assert list(cols)[:3] == ["step", "step_last", "rows"]
    assert cols["ts_ns.min"] == "i8" and cols["ts_ns.max"] == "i8" and "ts_ns.sum" not in cols
    assert cols["step_us.sum"] == "f8" and cols["step_us.min"] == "i8" and cols["failed.max"] == "u1"
    assert rollup_schema(STEP_REGION) is None  # a str column: rows of one step mean different things
    assert rollup_schema(schema) is None


def test_groups_follow_the_step_bucket_and_close_when_a_step_repeats_too_often() -> None:
    steps = np.array([0, 1, 255, 256, 300, 2, 2, 600], dtype=np.int64)
    assert rollup.group_starts(steps, 256).tolist() == [0, 3, 5, 7]
    same = np.zeros(10 * 4 + 3, dtype=np.int64)  # one step appended again and again
    assert rollup.group_starts(same, 10).tolist() == [0, 40]


def test_summaries_are_exact_for_every_group() -> None:
    cols = step_columns(0, 1000)
    rolled = rollup.rollup(STEP_TIME, cols, 256)
    assert rolled["step"].tolist() == [0, 256, 512, 768] and rolled["step_last"].tolist() == [255, 511, 767, 999]
    assert rolled["rows"].tolist() == [256, 256, 256, 232]
    for g, (a, b) in enumerate([(0, 256), (256, 512), (512, 768), (768, 1000)]):
        assert rolled["step_us.sum"][g] == cols["step_us"][a:b].sum()
        assert rolled["forward_us.min"][g] == cols["forward_us"][a:b].min()
        assert rolled["forward_us.max"][g] == cols["forward_us"][a:b].max()
        assert rolled["ts_ns.min"][g] == cols["ts_ns"][a] and rolled["ts_ns.max"][g] == cols["ts_ns"][b - 1]
        assert rolled["failed.sum"][g] == cols["failed"][a:b].sum()


def _write(path: Path, clock: FakeClock, steps: int, batch: int, **kwargs: object) -> None:
    with writer(path, clock, segment_max_bytes=4096, checkpoint_every_segments=4, **kwargs) as w:
        for start in range(0, steps, batch):
            for rank in (0, 3):
                w.append(rank, "step_time", step_columns(start, min(batch, steps - start), rank))
            clock.advance(0.3)
            w.tick()


def test_rollups_are_written_apart_from_the_rows_at_each_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "r.tml"
    _write(path, FakeClock(), steps=3000, batch=70)
    with open_recording(path) as r:
        assert r.rollup_steps == 256 and r.header["rollup_steps"] == 256
        assert r.tables == ["step_time"] and r.rollup_tables == ["rollup/step_time"]
        kinds = [seg.tables for seg in r.segments]
        rolled = [i for i, t in enumerate(kinds) if t == frozenset({"rollup/step_time"})]
        assert len(rolled) >= 3, "one rollup segment per checkpoint with closed groups, and one at close"
        assert all(t == frozenset({"step_time"}) for i, t in enumerate(kinds) if i not in rolled)
        raw = r.read_table("step_time")
        for rank in (0, 3):
            assert_columns_equal(r.read_rollup("step_time")[rank], rollup.rollup(STEP_TIME, raw[rank]))
            assert r.read_table("rollup/step_time")[rank]["rows"].sum() == 3000  # all stored: none computed
        # rows written count the data only; the rollup's rows are in the SUMMARY's table counts
        assert r.summary is not None and r.summary["rows"]["step_time"] == 6000
        assert r.summary["rows"]["rollup/step_time"] == 2 * 12
        assert list(r.iter_batches()) and all(not is_rollup(t) for _, t, _ in r.iter_batches())


@pytest.mark.parametrize("cut", [0.35, 0.6, 0.9])
def test_a_crashed_writers_rollup_is_completed_from_its_rows(tmp_path: Path, cut: float) -> None:
    path = tmp_path / "r.tml"
    _write(path, FakeClock(), steps=3000, batch=70)
    data = path.read_bytes()
    crashed = tmp_path / "crashed.tml"
    crashed.write_bytes(data[: int(len(data) * cut)])
    with open_recording(crashed) as r:
        assert r.integrity["status"] == "recovered"
        raw = r.read_table("step_time")
        got = r.read_rollup("step_time")
        assert set(got) == set(raw)
        for rank, cols in raw.items():
            assert got[rank]["rows"].sum() == len(cols["step"])
            assert_columns_equal(got[rank], rollup.rollup(STEP_TIME, cols))


def test_without_rollups_a_reader_rolls_up_every_row(tmp_path: Path) -> None:
    path = tmp_path / "plain.tml"
    _write(path, FakeClock(), steps=1000, batch=100, rollup_steps=None)
    with open_recording(path) as r:
        assert r.rollup_steps is None and r.rollup_tables == [] and "rollup/step_time" not in r.schemas
        raw = r.read_table("step_time")
        got = r.read_rollup("step_time", bucket_steps=100)
        for rank, cols in raw.items():
            assert_columns_equal(got[rank], rollup.rollup(STEP_TIME, cols, 100))
        assert r.read_rollup("process") == {}


def test_rollup_steps_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rollup_steps"):
        writer(tmp_path / "x.tml", rollup_steps=0)


def test_a_failing_rollup_stops_the_rollups_not_the_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = rollup.summarize
    calls = [0]

    def flaky(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        calls[0] += 1
        if calls[0] > 6:
            raise RuntimeError("rollup bug")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rollup, "summarize", flaky)
    path = tmp_path / "r.tml"
    with caplog.at_level("WARNING", logger="traceml.format"):
        _write(path, FakeClock(), steps=3000, batch=70)
    assert "the recording goes on without more rollup rows" in caplog.text
    monkeypatch.setattr(rollup, "summarize", real)
    with open_recording(path) as r:
        assert r.integrity["status"] == "complete"
        raw = r.read_table("step_time")
        stored = r.read_table("rollup/step_time")
        assert all(len(raw[rank]["step"]) == 3000 for rank in (0, 3))
        assert 0 < sum(int(c["rows"].sum()) for c in stored.values()) < 6000  # some stored, then stopped
        for rank in (0, 3):  # the reader completes the rollup from the rows
            assert_columns_equal(r.read_rollup("step_time")[rank], rollup.rollup(STEP_TIME, raw[rank]))
