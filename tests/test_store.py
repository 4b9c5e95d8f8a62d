"""Unit tests of the store room: bounded rank tables, the column store and its view."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traceml.errors import StoreError
from traceml.schema import PROCESS, STEP_TIME, rows_to_columns, table
from traceml.store import BoundedTable, ColumnStore, StoreView


def _step_row(i: int) -> tuple:
    return (i, 1_000 + i, 0, 100, 10, 0, 40, 30, 10, 10)


def test_bounded_table_takes_only_new_rows_and_counts_evictions() -> None:
    t = BoundedTable(STEP_TIME, capacity=4)
    for i in range(3):
        t.append(_step_row(i))
    assert [r[0] for r in t.take_unsent()] == [0, 1, 2]
    assert t.take_unsent() == []
    for i in range(3, 13):  # 10 new rows into a table of 4
        t.append(_step_row(i))
    assert [r[0] for r in t.take_unsent()] == [9, 10, 11, 12]
    assert t.lost == 6
    assert t.appended == 13


def test_bounded_table_concurrent_append_and_take_loses_nothing_uncounted() -> None:
    t = BoundedTable(STEP_TIME, capacity=64)
    n = 20_000
    got: list[int] = []
    done = threading.Event()

    def taker() -> None:
        while not done.is_set():
            got.extend(r[0] for r in t.take_unsent())
        got.extend(r[0] for r in t.take_unsent())

    th = threading.Thread(target=taker)
    th.start()
    for i in range(n):
        t.append(_step_row(i))
    done.set()
    th.join()
    assert len(got) + t.lost == n
    assert got == sorted(got)  # oldest first, never duplicated
    assert len(set(got)) == len(got)


def test_bounded_table_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        BoundedTable(STEP_TIME, capacity=0)


def test_column_store_evicts_oldest_and_counts() -> None:
    store = ColumnStore(capacity=10)
    for start in range(0, 25, 5):
        rows = [_step_row(i) for i in range(start, start + 5)]
        store.append(1, "step_time", rows_to_columns(STEP_TIME, rows))
    view = store.snapshot()
    steps = view.columns("step_time", 1)["step"]
    assert list(steps) == list(range(15, 25))
    assert view.evicted[("step_time", 1)] == 15
    assert view.latest_ns == 1_000 + 24


def test_column_store_partial_chunk_eviction() -> None:
    store = ColumnStore(capacity=7)
    store.append(0, "step_time", rows_to_columns(STEP_TIME, [_step_row(i) for i in range(5)]))
    store.append(0, "step_time", rows_to_columns(STEP_TIME, [_step_row(i) for i in range(5, 10)]))
    assert list(store.snapshot().columns("step_time", 0)["step"]) == list(range(3, 10))


def test_snapshot_is_read_only_and_stable() -> None:
    store = ColumnStore(capacity=None)
    store.append(0, "step_time", rows_to_columns(STEP_TIME, [_step_row(i) for i in range(3)]))
    v1 = store.snapshot()
    with pytest.raises(ValueError):
        v1.columns("step_time", 0)["step"][0] = 99  # type: ignore[index]
    store.append(0, "step_time", rows_to_columns(STEP_TIME, [_step_row(3)]))
    v2 = store.snapshot()
    assert v1.rows("step_time", 0) == 3
    assert v2.rows("step_time", 0) == 4


def test_ragged_batch_is_refused_with_store_error() -> None:
    store = ColumnStore()
    with pytest.raises(StoreError, match="different lengths"):
        store.append(0, "step_time", {"step": np.arange(3), "ts_ns": np.arange(2)})


def test_view_ranks_tables_and_drops() -> None:
    store = ColumnStore()
    store.append(0, "process", rows_to_columns(PROCESS, [(5, 1.0, 100, 3, 4, -1, -1, -1)]))
    store.update_rank(1, host="h", state="connected", drops={"step_time": 3})
    store.update_rank(1, state="died")
    view = store.snapshot()
    assert isinstance(view, StoreView)
    assert view.ranks == [0, 1]
    assert view.table_names() == ["process"]
    assert view.has("process") and not view.has("step_time")
    assert view.rank_info[1].state == "died"
    assert view.rank_info[1].host == "h"
    assert view.dropped() == 3
    empty = view.columns("step_time", 5)
    assert set(empty) == set(STEP_TIME.names) and all(len(a) == 0 for a in empty.values())


def test_unknown_table_schema_is_inferred_and_str_columns_kept() -> None:
    store = ColumnStore()
    custom = table("custom", ("k", "str"), ("v", "f8"))
    store.append(2, "custom", rows_to_columns(custom, [("a", 1.5), ("b", 2.5)]))
    view = store.snapshot()
    cols = view.columns("custom", 2)
    assert list(cols["k"]) == ["a", "b"]
    assert cols["v"].dtype == np.float64
    assert view.schemas["custom"].names == ("k", "v")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(-1, 10**6)), min_size=5, max_size=5))
def test_phase_gaps_and_starts_round_trip(pairs: list[tuple[int, int]]) -> None:
    """STEP_TIMELINE stores gaps; phase_starts gives the recorded start offsets back, scalar and column-wise."""
    from traceml.schema import phase_gaps, phase_starts

    durations = [d for d, _ in pairs]
    starts = [abs(s) if d > 0 else -1 for d, s in pairs]  # a phase that did not run has no start
    gaps = phase_gaps(durations, starts)
    assert [g for g, d in zip(gaps, durations, strict=True) if d == 0] == [0] * durations.count(0)
    assert phase_starts(durations, gaps) == starts
    cols = phase_starts(
        [np.array([d, d]) for d in durations],
        phase_gaps([np.array([d, d]) for d in durations], [np.array([s, s]) for s in starts]),
    )
    assert [int(c[1]) for c in cols] == phase_starts(durations, gaps)
