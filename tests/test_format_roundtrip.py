"""The .tml writer and reader on real files: round trips, segment bounds, index, filters, API errors.

Also holds the small helpers the other format tests import (``step_columns``, ``record_kinds``,
``FakeClock``, ``batches_by_stream``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traceml.errors import ConfigError, WriterClosedError
from traceml.format import MAGIC, RecordKind, TmlWriter, _records, open_recording, rollup
from traceml.names import label_problem
from traceml.schema import NUMPY_DTYPES, PHASES, STEP_TIME, TableSchema, is_rollup, rollup_name, rollup_schema, table

# --- helpers shared by the format tests ------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def step_columns(start: int, n: int, rank: int = 0) -> dict[str, np.ndarray]:
    """``n`` step_time rows from step ``start``: each row a function of (step, rank) only, so
    ``step_columns(0, 10)`` equals ``step_columns(0, 4)`` followed by ``step_columns(4, 6)``;
    the phases add up to step_us."""
    steps = np.arange(start, start + n, dtype=np.int64)
    jitter = (steps * 2654435761 + rank * 40503) % 1000  # deterministic noise in 0..999
    cols: dict[str, np.ndarray] = {"step": steps}
    for k, (phase, mean) in enumerate(zip(PHASES[:-1], (300, 800, 30_000, 60_000, 5_000), strict=True)):
        cols[f"{phase}_us"] = mean + (jitter * (k + 3)) % (mean // 2)
    cols["residual_us"] = jitter % 200
    cols["step_us"] = sum(cols[f"{p}_us"] for p in PHASES)
    cols["ts_ns"] = 1_760_000_000_000_000_000 + steps * 200_000_000 + rank * 1000
    cols["failed"] = (steps % 97 == 0).astype(np.uint8)
    return {c.name: cols[c.name] for c in STEP_TIME.columns}


def record_kinds(path: Path) -> list[tuple[int, int, int]]:
    """``(offset, kind, record length)`` of every record after the magic, walking the frames."""
    data = path.read_bytes()
    assert data[:8] == MAGIC
    sync = data[8:24]
    out = []
    pos = 8
    while pos + _records.FRAME_HEAD_SIZE <= len(data):
        kind, length = _records.parse_frame_head(data[pos : pos + _records.FRAME_HEAD_SIZE], sync)
        out.append((pos, kind, _records.FRAME_OVERHEAD + length))
        pos += _records.FRAME_OVERHEAD + length
    return out


def batches_by_stream(
    batches: Iterable[tuple[int, str, dict[str, np.ndarray]]],
) -> dict[tuple[int, str], dict[str, Any]]:
    """Concatenate batches per (rank, table)."""
    parts: dict[tuple[int, str], list[dict[str, np.ndarray]]] = {}
    for rank, tbl, cols in batches:
        parts.setdefault((rank, tbl), []).append(cols)
    return {key: {c: np.concatenate([p[c] for p in chunks]) for c in chunks[0]} for key, chunks in parts.items()}


def assert_columns_equal(actual: dict[str, np.ndarray], expected: dict[str, Any]) -> None:
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        if isinstance(want, list) or (isinstance(want, np.ndarray) and want.dtype == object):
            assert got.dtype == object
            assert list(got) == list(want), name
        else:
            assert got.dtype == want.dtype, name
            assert got.tobytes() == want.tobytes(), name  # bit-exact: nan payloads, -0.0, extremes


def writer(path: Path, clock: FakeClock | None = None, **kwargs: Any) -> TmlWriter:
    kwargs.setdefault("fsync_interval_s", None)
    return TmlWriter(path, run_meta=kwargs.pop("run_meta", {"run_id": "test"}), clock=clock or FakeClock(), **kwargs)


# --- round trip (hypothesis) -------------------------------------------------------------

CODES = ["i8", "i4", "u1", "f8", "f4", "str"]


def _values(code: str, n: int) -> st.SearchStrategy[Any]:
    if code == "str":
        # any Unicode a label may hold (traceml.names): control characters are refused by the writer
        labels = st.text(max_size=12).filter(lambda v: label_problem(v, "value") is None)
        return st.lists(labels, min_size=n, max_size=n)
    if code == "f8":
        elems = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
            [0.0, -0.0, 5e-324, 1.7976931348623157e308]
        )
        return st.lists(elems, min_size=n, max_size=n).map(lambda v: np.array(v, dtype="<f8"))
    if code == "f4":
        return st.lists(st.floats(width=32, allow_nan=True), min_size=n, max_size=n).map(
            lambda v: np.array(v, dtype="<f4")
        )
    info = np.iinfo(NUMPY_DTYPES[code])
    extremes = st.sampled_from(sorted({int(info.min), int(info.max), max(int(info.min), -1), 0}))
    elems = st.integers(int(info.min), int(info.max)) | extremes
    dt = NUMPY_DTYPES[code]
    return st.one_of(
        st.lists(elems, min_size=n, max_size=n).map(lambda v: np.array(v, dtype=dt)),
        # monotone runs exercise the delta encoding
        st.tuples(st.integers(-1000, 1000), st.integers(0, 5)).map(
            lambda a: (a[0] + a[1] * np.arange(n)).astype(dt) if code != "u1" else np.arange(n).astype(dt)
        ),
    )


@st.composite
def recordings(draw: st.DrawFn) -> tuple[list[TableSchema], list[tuple[int, str, dict[str, Any]]]]:
    schemas = []
    for t in range(draw(st.integers(1, 3))):
        names = draw(
            st.lists(st.sampled_from(["step", "ts_ns", "a", "b", "c", "x.min+1"]), min_size=1, max_size=5, unique=True)
        )
        schemas.append(table(f"t{t}", *((n, draw(st.sampled_from(CODES))) for n in names)))
    ranks = draw(st.lists(st.integers(-1, 2**31), min_size=1, max_size=3, unique=True))
    appends = []
    for _ in range(draw(st.integers(1, 8))):
        schema = draw(st.sampled_from(schemas))
        n = draw(st.integers(0, 40))
        cols = {c.name: draw(_values(c.dtype, n)) for c in schema.columns}
        appends.append((draw(st.sampled_from(ranks)), schema.name, cols))
    return schemas, appends


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=recordings(), segment_bytes=st.sampled_from([64, 300, 1 << 20]), tick_every=st.integers(1, 4))
def test_round_trip_every_type_exactly(rec: Any, segment_bytes: int, tick_every: int) -> None:
    schemas, appends = rec
    expected: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rt.tml"
        clock = FakeClock()
        with writer(path, clock, schemas=schemas, segment_max_bytes=segment_bytes, checkpoint_every_segments=2) as w:
            for i, (rank, name, cols) in enumerate(appends):
                w.append(rank, name, cols)
                if len(next(iter(cols.values()))):
                    expected.setdefault((rank, name), []).append(cols)
                if i % tick_every == 0:
                    clock.advance(0.6)
                    w.tick()
        want = {
            key: {
                c: (
                    sum((list(p[c]) for p in parts), [])
                    if isinstance(parts[0][c], list)
                    else np.concatenate([p[c] for p in parts])
                )
                for c in parts[0]
            }
            for key, parts in expected.items()
        }
        with open_recording(path) as r:
            assert r.integrity["status"] == "complete"
            got = batches_by_stream(r.iter_batches())
            rolled = {key for key in got if is_rollup(key[1])}
            assert {key for key in got if key not in rolled} == set(want)
            for key, cols in want.items():
                assert_columns_equal(got[key], cols)
            for schema in schemas:
                per_rank = r.read_table(schema.name)
                assert set(per_rank) == {rank for rank, name in want if name == schema.name}
                for rank, cols in per_rank.items():
                    assert_columns_equal(cols, want[(rank, schema.name)])
                # the stored rollup is the rollup of every row, whatever the appends and segments were
                summaries = r.read_rollup(schema.name)
                if rollup_schema(schema) is None:
                    assert summaries == {} and not any(name == rollup_name(schema.name) for _, name in rolled)
                    continue
                assert set(summaries) == set(per_rank)
                for rank, cols in per_rank.items():
                    assert_columns_equal(summaries[rank], rollup.rollup(schema, cols))
                    assert summaries[rank]["rows"].sum() == len(cols["step"])
                assert r.schemas[schema.name] == schema
            assert r.ranks == sorted({rank for rank, _ in want})


# --- segments, index, durability knobs ---------------------------------------------------


def test_size_bound_splits_segments_and_time_bound_closes_on_append_and_tick(tmp_path: Path) -> None:
    path = tmp_path / "bounds.tml"
    clock = FakeClock()
    w = writer(path, clock, segment_max_bytes=1000, segment_max_age_s=1.0)
    w.append(0, "step_time", step_columns(0, 100))  # 73 B/row: split across ~8 segments
    assert w.rows_written >= 13 * 7
    assert w.rows_appended == 100
    pending = w.rows_appended - w.rows_written
    clock.advance(0.9)
    w.tick()
    assert w.rows_appended - w.rows_written == pending  # younger than the bound: still open
    clock.advance(0.2)
    w.tick()
    assert w.rows_written == 100
    w.append(1, "step_time", step_columns(0, 3, rank=1))
    clock.advance(1.5)
    w.append(1, "step_time", step_columns(3, 2, rank=1))  # append checks the age too
    assert w.rows_written == 105
    w.close()
    with open_recording(path) as r:
        assert all(sum(seg.rows.values()) <= 1000 // 73 + 1 for seg in r.segments)
        assert [s.offset for s in r.segments] == sorted(s.offset for s in r.segments)
        seg0 = r.segments[0]
        assert seg0.step_min == 0 and seg0.ranks == (0,) and seg0.rows == {(0, "step_time"): seg0.step_max + 1}
        assert seg0.t_min == 1_760_000_000_000_000_000
        np.testing.assert_array_equal(r.read_table("step_time")[1]["step"], np.arange(5))


def test_checkpoints_every_n_segments_and_by_interval(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.tml"
    clock = FakeClock()
    w = writer(path, clock, checkpoint_every_segments=3, checkpoint_interval_s=30.0, rollup_steps=None)
    for i in range(7):
        w.append(0, "step_time", step_columns(i * 10, 10))
        clock.advance(1.0)
        w.tick()
    kinds = [k for _, k, _ in record_kinds(path)]
    assert kinds.count(RecordKind.SEGMENT) == 7
    assert kinds.count(RecordKind.INDEX) == 2  # after segments 3 and 6
    clock.advance(31.0)
    w.attach("note", {"x": 1})
    w.tick()  # interval elapsed with an unindexed record pending
    assert [k for _, k, _ in record_kinds(path)].count(RecordKind.INDEX) == 3
    w.close()
    kinds = [k for _, k, _ in record_kinds(path)]
    assert kinds[0] == RecordKind.HEADER
    assert kinds[-3:] == [RecordKind.INDEX, RecordKind.SUMMARY, RecordKind.FOOTER]
    with open_recording(path) as r:
        assert len(r.segments) == 7
        assert r.summary is not None and r.summary["rows"] == {"step_time": 70}
        assert r.summary["step_min"] == 0 and r.summary["step_max"] == 69


def test_fdatasync_at_interval_checkpoint_and_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import traceml.format.writer as writer_module

    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(writer_module.os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    clock = FakeClock()
    w = writer(tmp_path / "sync.tml", clock, fsync_interval_s=5.0, checkpoint_every_segments=100)
    w.append(0, "step_time", step_columns(0, 5))
    clock.advance(1.0)
    w.tick()
    assert calls == []
    clock.advance(4.5)
    w.tick()  # 5.5 s since the last sync, bytes written since
    assert len(calls) == 1
    clock.advance(31.0)
    w.append(0, "step_time", step_columns(5, 5))
    clock.advance(1.0)
    w.tick()  # closes the segment; 30 s interval -> checkpoint, which syncs
    assert len(calls) == 2
    w.close()
    assert len(calls) == 3
    calls.clear()
    with writer(tmp_path / "nosync.tml", FakeClock(), fsync_interval_s=None) as w2:
        w2.append(0, "step_time", step_columns(0, 5))
    assert calls == []


def test_header_attachments_and_schemas(tmp_path: Path) -> None:
    path = tmp_path / "meta.tml"
    meta = {
        "run_id": "r-42",
        "hosts": ["a", "b"],
        "world_size": 4,
        "command": ["train.py", "--lr", "1"],
        "x": {"y": [1, 2]},
    }
    with writer(path, run_meta=meta) as w:
        w.attach("environment/rank0", {"python": "3.11"})
        w.attach("exit", {"status": "running"})
        w.append(2, "custom", {"v": np.array([1.5, 2.5]), "tag": ["a", "ß"]})
        w.add_schema(table("later", ("k", "i4")))
        w.attach("exit", {"status": "ok"})
        w.close(summary={"steps": 10})
    with open_recording(path) as r:
        h = r.header
        assert (h["run_id"], h["hosts"], h["world_size"], h["command"]) == (
            "r-42",
            ["a", "b"],
            4,
            ["train.py", "--lr", "1"],
        )
        assert h["meta"] == meta and h["format_version"] == "1.2" and h["writer"].startswith("traceml ")
        assert set(STEP_TIME.names) == set(r.schemas["step_time"].names)
        assert r.schemas["custom"] == table("custom", ("v", "f8"), ("tag", "str"))
        assert r.schemas["later"] == table("later", ("k", "i4"))
        assert r.attachments == {
            "environment/rank0": {"python": "3.11"},
            "exit": {"status": "ok"},
            "summary": {"steps": 10},
        }
        assert r.tables == ["custom"] and r.ranks == [2]


def test_append_validation_errors(tmp_path: Path) -> None:
    with writer(tmp_path / "bad.tml") as w:
        good = step_columns(0, 3)
        with pytest.raises(ConfigError, match="missing \\['ts_ns'\\]"):
            w.append(0, "step_time", {k: v for k, v in good.items() if k != "ts_ns"})
        with pytest.raises(ConfigError, match="float64"):
            w.append(0, "step_time", {**good, "step": good["step"].astype(float)})
        with pytest.raises(ConfigError, match="1-d"):
            w.append(0, "step_time", {**good, "step": good["step"].reshape(3, 1)})
        with pytest.raises(ConfigError, match="rows"):
            w.append(0, "step_time", {**good, "step": good["step"][:2]})
        with pytest.raises(ConfigError, match="strings"):
            w.append(0, "labels", {"s": ["a", 3]})
        with pytest.raises(ConfigError, match="cannot change"):
            w.add_schema(table("step_time", ("step", "i8")))
        with pytest.raises(ConfigError, match="msgpack"):
            w.attach("x", {"f": object()})
        with pytest.raises(ConfigError, match="map"):
            w.attach("x", [1, 2])  # type: ignore[arg-type]
        w.append(0, "step_time", {**good, "failed": [True, False, True]})  # lists and safe casts are fine
        w.append(0, "step_time", {k: v[:0] for k, v in good.items()})  # no rows: nothing happens
        assert w.rows_appended == 3
    with pytest.raises(WriterClosedError, match="closed"):
        w.append(0, "step_time", good)
    w.close()  # idempotent
    with pytest.raises(ConfigError, match="segment_max_bytes"):
        TmlWriter(tmp_path / "x.tml", run_meta={}, segment_max_bytes=1 << 30)
    with pytest.raises(ConfigError, match="msgpack"):
        TmlWriter(tmp_path / "y.tml", run_meta={"bad": object()})


# --- reading with ranges -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ranged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, np.ndarray]]]:
    path = tmp_path_factory.mktemp("ranged") / "ranged.tml"
    clock = FakeClock()
    full: dict[int, list[dict[str, np.ndarray]]] = {}
    with writer(path, clock, segment_max_bytes=4096) as w:
        for start in range(0, 400, 20):
            for rank in range(3):
                cols = step_columns(start, 20, rank)
                w.append(rank, "step_time", cols)
                full.setdefault(rank, []).append(cols)
            w.append(0, "process", {"ts_ns": np.array([1_760_000_000_000_000_000 + start * 100_000_000]),
                                    "cpu_pct": np.array([50.0], "f4"), "rss_bytes": np.array([1 << 30]),
                                    "threads": np.array([8], "i4"), "fds": np.array([20], "i4"),
                                    "gpu_alloc_bytes": np.array([-1]), "gpu_reserved_bytes": np.array([-1]),
                                    "gpu_total_bytes": np.array([-1])})  # fmt: skip
            clock.advance(0.3)
    return path, {rank: {c: np.concatenate([p[c] for p in parts]) for c in parts[0]} for rank, parts in full.items()}


@pytest.mark.parametrize(
    ("ranks", "steps", "times"),
    [
        (None, None, None),
        ([1], None, None),
        ([0, 2], (57, 211), None),
        (None, (None, 30), None),
        (None, (390, None), None),
        (None, None, (1_760_000_000_000_000_000 + 100 * 200_000_000, 1_760_000_000_000_000_000 + 150 * 200_000_000)),
        ([2], (10, 300), (1_760_000_000_000_000_000 + 200 * 200_000_000, None)),
        (None, (1000, 2000), None),
    ],
)
def test_read_table_ranges_match_a_mask_on_all_rows(ranged: Any, ranks: Any, steps: Any, times: Any) -> None:
    path, full = ranged
    with open_recording(path) as r:
        got = r.read_table("step_time", ranks=ranks, step_range=steps, time_range=times)
        assert r.integrity["status"] == "complete"
        via_batches = batches_by_stream(
            (rank, t, c) for rank, t, c in r.iter_batches(step_range=steps, time_range=times) if t == "step_time"
        )
    expected = {}
    for rank, cols in full.items():
        if ranks is not None and rank not in ranks:
            continue
        keep = np.ones(len(cols["step"]), bool)
        for col, rng in (("step", steps), ("ts_ns", times)):
            if rng is not None:
                lo, hi = rng
                keep &= (cols[col] >= (lo if lo is not None else -(2**63))) & (
                    cols[col] <= (hi if hi is not None else 2**63 - 1)
                )
        if keep.any():
            expected[rank] = {c: v[keep] for c, v in cols.items()}
    assert set(got) == set(expected)
    for rank, cols in expected.items():
        assert_columns_equal(got[rank], cols)
        if ranks is None:
            assert_columns_equal(via_batches[(rank, "step_time")], cols)


def test_read_table_skips_segments_outside_the_range_without_reading_them(ranged: Any, tmp_path: Path) -> None:
    path, full = ranged
    data = bytearray(path.read_bytes())
    with open_recording(path) as r:
        late = [s for s in r.segments if s.step_min is not None and s.step_min > 300]
    victim = late[0]
    data[victim.offset + victim.length // 2] ^= 0x40  # damage a segment the query does not need
    broken = tmp_path / "broken.tml"
    broken.write_bytes(bytes(data))
    with open_recording(broken) as r:
        early = r.read_table("step_time", step_range=(0, 100))
        assert r.integrity["status"] == "complete"  # the damaged segment was never read
        np.testing.assert_array_equal(early[0]["step"], np.arange(101))
        r.read_table("step_time")
        assert r.integrity["status"] == "damaged"
        assert r.integrity["skipped"][0]["offset"] == victim.offset


def test_tables_without_the_range_column_are_not_filtered(ranged: Any) -> None:
    path, _ = ranged
    with open_recording(path) as r:
        proc = r.read_table("process", step_range=(0, 10))
        assert len(proc[0]["ts_ns"]) == 20  # process has no step column
        tables = {t for _, t, _ in r.iter_batches(step_range=(0, 10))}
        assert tables == {"step_time", "process"}
        assert r.read_table("nope") == {}
