"""The all-reduce timer's per-step row (``traceml.runtime.comm.CommTimer``) from hand-made bucket spans;
the real DDP hook on 2 gloo ranks is in tests/test_corpus.py (``ddp-many-buckets``)."""

from __future__ import annotations

from traceml.runtime.comm import CommTimer


def test_one_row_per_step_with_union_and_exposed_tail() -> None:
    rows: list[tuple[int, ...]] = []
    step = [0]
    timer = CommTimer(lambda: step[0], rows.append)
    a, b = timer.launched(), timer.launched()
    a[:] = [1_000_000, 3_000_000]  # 1..3 ms
    b[:] = [2_000_000, 4_000_000]  # 2..4 ms, overlapping
    c = timer.launched()
    c[:] = [6_000_000, 9_000_000]  # the last bucket: 6..9 ms
    step[0] = 1
    d = timer.launched()  # the next step's first bucket writes step 0's row
    assert len(rows) == 1
    s, _ts, comm_us, exposed_us, buckets = rows[0]
    assert (s, comm_us, exposed_us, buckets) == (0, 3000 + 3000, 3000, 3)
    d[:] = [0, 0]  # never completed (the run ended): no row
    timer.flush()
    assert len(rows) == 1 and timer.rows == 1


def test_blocking_collectives_add_to_the_step_and_are_all_exposed() -> None:
    rows: list[tuple[int, ...]] = []
    step = [4]
    timer = CommTimer(lambda: step[0], rows.append)
    timer.synchronous(2_000_000)
    timer.synchronous(1_000_000)
    b = timer.launched()
    b[:] = [10_000_000, 12_000_000]
    timer.flush()
    ((s, _ts, comm_us, exposed_us, calls),) = rows
    assert (s, comm_us, exposed_us, calls) == (4, 5000, 5000, 3)
