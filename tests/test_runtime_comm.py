"""The communication timer's per-step row (``traceml.runtime.comm.CommTimer``) from hand-made
spans and fake CUDA events, and the patched ``torch.distributed`` calls on a one-rank gloo group;
the real DDP hook, FSDP2 and async collectives on 2 gloo ranks are in tests/test_corpus.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from traceml.runtime import patches
from traceml.runtime.comm import CommTimer, install_collectives


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
    timer.synchronous(0, 2_000_000)
    timer.synchronous(3_000_000, 4_000_000)
    b = timer.launched()
    b[:] = [10_000_000, 12_000_000]
    timer.flush()
    ((s, _ts, comm_us, exposed_us, calls),) = rows
    assert (s, comm_us, exposed_us, calls) == (4, 5000, 5000, 3)


class _Future:
    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def add_done_callback(self, fn: Any) -> None:
        self.callbacks.append(fn)


class _Work:
    def __init__(self) -> None:
        self.future = _Future()

    def get_future(self) -> _Future:
        return self.future


def test_async_collective_is_communication_and_only_its_wait_is_exposed() -> None:
    rows: list[tuple[int, ...]] = []
    timer = CommTimer(lambda: 2, rows.append)
    overlapped, waited, never = _Work(), _Work(), _Work()
    timer.issued(overlapped, 1_000_000)
    timer.issued(waited, 2_000_000)
    timer.issued(never, 3_000_000)
    assert all(len(w.future.callbacks) == 1 for w in (overlapped, waited, never))
    # the first completed long before anyone waited: no exposure
    cell = timer.waiting(overlapped)
    assert cell is not None and timer.waiting(overlapped) is None  # a work is waited for once
    cell[1], cell[2], cell[3] = 4_000_000, 9_000_000, 9_000_010
    # the second was waited for at 6 ms and completed at 8 ms: 2 ms exposed
    cell = timer.waiting(waited)
    assert cell is not None
    cell[2], cell[3] = 6_000_000, 8_000_100
    waited.future.callbacks[0](None)  # the real completion callback stamps "done"
    assert cell[1] > 0
    cell[1] = 8_000_000
    # the third neither completed nor was waited for in its step: not counted
    timer.flush()
    ((s, _ts, comm_us, exposed_us, count),) = rows
    assert (s, comm_us, exposed_us, count) == (2, 7000, 2000, 2)


class _Event:
    def __init__(self, t_ms: float) -> None:
        self.t_ms = t_ms
        self.done = False

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: _Event) -> float:
        return end.t_ms - self.t_ms


def test_gpu_collectives_wait_for_their_events_without_a_synchronize() -> None:
    rows: list[tuple[int, ...]] = []
    step = [0]
    timer = CommTimer(lambda: step[0], rows.append)
    ends = []
    for t0, t1, compute in ((0.0, 1.0, False), (2.0, 5.0, True), (6.0, 8.0, False)):
        start, end = _Event(t0), _Event(t1)
        ends.append(end)
        timer.gpu(start, end, compute)
    step[0] = 1
    ends[0].done = ends[1].done = True
    timer.synchronous(0, 1_000)  # the next step starts: step 0's last event is still running
    assert rows == []
    ends[2].done = True
    step[0] = 2
    timer.synchronous(0, 1_000)  # step 1's row is written, then step 0's (events done)
    assert [r[0] for r in rows] == [0, 1]
    _s, _ts, comm_us, exposed_us, count = rows[0]
    # 1 + 3 + 2 ms on the GPU; exposed: the compute-stream one (3) and the side stream's last (2)
    assert (comm_us, exposed_us, count) == (6000, 5000, 3)


def test_gpu_rows_never_completed_are_dropped_and_counted() -> None:
    rows: list[tuple[int, ...]] = []
    timer = CommTimer(lambda: 0, rows.append)
    timer.gpu(_Event(0.0), _Event(1.0), True)
    timer.flush()
    assert rows == [] and timer.late_dropped == 1


@pytest.fixture
def gloo_one_rank() -> Iterator[Any]:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_patched_collectives_time_blocking_async_and_fsdp_calls(gloo_one_rank: Any) -> None:
    import threading

    import torch

    dist = gloo_one_rank
    rows: list[tuple[int, ...]] = []
    step = [0]
    in_step = [True]
    timer = CommTimer(lambda: step[0], rows.append)
    me = threading.get_ident()
    original = dist.all_reduce
    names = install_collectives(lambda: timer if in_step[0] else None, lambda: me, tag="test")
    try:
        assert dist.all_reduce is not original and dist.all_gather_single.__name__ == "all_gather_single"
        t = torch.ones(8)
        out = torch.empty(8)
        dist.all_reduce(t)  # blocking
        dist.all_gather_single(out, t)  # FSDP2's all-gather
        dist.reduce_scatter_single(out, t)  # FSDP2's reduce-scatter (positional, blocking)
        work = dist.all_reduce(t, dist.ReduceOp.SUM, None, True)  # async_op given positionally
        work.wait()
        assert torch.equal(out, torch.ones(8))
        in_step[0] = False
        dist.all_reduce(t)  # outside a step: not timed
        step[0] = 1
        in_step[0] = True
        dist.barrier()
        timer.flush()
    finally:
        for name in names:
            patches.undo(name)
    assert dist.all_reduce is original
    assert [r[0] for r in rows] == [0, 1]
    _s, _ts, comm_us, exposed_us, count = rows[0]
    assert count == 4 and 0 < exposed_us <= comm_us
