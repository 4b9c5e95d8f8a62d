"""The step context's common path and its full path record the same rows (issue 19).

``StepTracker.__enter__``/``__exit__`` take a short path on most steps and the full one for the
rare work (sampled steps, memory steps, regions, failures, a disabled tracker, nesting); these
tests drive the steps where the two alternate and check every row, call and counter.
"""

from __future__ import annotations

import pytest

from traceml.runtime.step import (
    BACKWARD,
    CARRY,
    DATALOADER,
    SAMPLE_EVERY,
    STEP,
    PhaseClock,
    StepTracker,
)
from traceml.runtime.steprows import StepRows, raw_array
from traceml.runtime.timed import timed
from traceml.schema import STEP_REGION
from traceml.store import BoundedTable


class Memory:
    begins = False

    def __init__(self, every: int) -> None:
        self.every = every
        self.ended: list[int] = []

    def step_begin(self) -> None:  # pragma: no cover - begins = False: never called
        raise AssertionError("step_begin called although begins is False")

    def step_end(self, step: int, ts: int) -> None:
        self.ended.append(step)


def make(capacity: int = 4096) -> tuple[PhaseClock, StepTracker, StepRows]:
    clock = PhaseClock()
    rows = StepRows(capacity)
    return clock, StepTracker(clock, rows, BoundedTable(STEP_REGION, 4096)), rows


def test_every_step_gets_one_row_with_sampling_and_memory_on_their_steps() -> None:
    clock, tracker, rows = make()
    mem = Memory(every=3)
    tracker.memory = mem
    n = 3 * SAMPLE_EVERY + 5
    gates = []
    for _ in range(n):
        with tracker:
            gates.append(clock.gate)
    raw = raw_array(rows.take_unsent())
    assert raw[:, 0].tolist() == list(range(n))
    assert not raw[:, 1].any()  # none failed
    assert (raw[:, 3] >= raw[:, 2]).all()
    assert mem.ended == [s for s in range(n) if s % 3 == 0]
    sampled = [s for s in range(n) if s == 1 or (s > 1 and s % SAMPLE_EVERY == 1)]
    assert [s for s, g in enumerate(gates) if g != CARRY | STEP] == sampled
    assert tracker.cost_steps == len(sampled)
    assert clock.gate == clock.base == CARRY  # after step n - 1 (not before a sampled one)


def test_the_sender_is_woken_at_half_capacity_by_the_inline_append() -> None:
    clock, tracker, rows = make(capacity=8)
    woken = []
    rows.on_high_water = lambda: woken.append(len(rows._rows))
    for _ in range(4):
        with tracker:
            pass
    assert woken == [4]
    rows.take_unsent()
    for _ in range(4):
        with tracker:
            pass
    assert woken == [4, 4]
    assert rows.appended == 8 and rows.lost == 0

    def broken() -> None:
        raise RuntimeError("sender gone")

    rows.on_high_water = broken
    rows.take_unsent()
    for _ in range(5):
        with tracker:
            pass
    assert rows.on_high_water is None  # dropped, the steps go on
    assert raw_array(rows.take_unsent())[:, 0].tolist() == [8, 9, 10, 11, 12]


def test_phases_carried_time_and_first_starts_land_in_the_row() -> None:
    clock, tracker, rows = make()
    calls = []
    back = timed(clock, BACKWARD, lambda: calls.append(1))
    for _ in range(70):  # through a sampled step and back
        clock.add_carried(DATALOADER, 0, 1000, 5000)  # the training loader (train_src 0)
        with tracker:
            back()
        back()  # outside: not timed
    raw = raw_array(rows.take_unsent())
    assert len(calls) == 140
    assert (raw[:, 4] == 5000).all()  # the carried dataloader wait
    assert (raw[:, 9] == 1000).all()  # where it began
    assert (raw[:, 7] > 0).all() and (raw[:, 12] >= raw[:, 2]).all()  # backward timed, in the step
    assert (raw[:, 2] == raw[:, 2].min()).sum() == 1
    assert not clock.acc[BACKWARD] and not any(clock.carry)


def test_failed_steps_regions_nesting_and_a_disabled_tracker() -> None:
    clock, tracker, rows = make()
    with tracker:
        pass
    with pytest.raises(KeyError, match="boom"), tracker:
        raise KeyError("boom")
    with tracker:
        tracker.add_region("eval", 2000, 0)
    with tracker, tracker:  # nested: one step
        pass
    tracker.enabled = False
    with tracker:
        pass
    tracker.enabled = True
    with tracker:
        pass
    raw = raw_array(rows.take_unsent())
    assert raw[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert raw[:, 1].tolist() == [0, 1, 0, 0, 0]
    assert tracker.steps_failed == 1
    assert [r[0] for r in tracker.region_table.take_unsent()] == [2]
    assert tracker.depth == 0 and clock.gate == CARRY


def test_a_bounded_table_that_is_not_step_rows_still_gets_every_row() -> None:
    from traceml.schema import STEP_TIME

    clock = PhaseClock()
    table = BoundedTable(STEP_TIME, 4096)
    tracker = StepTracker(clock, table, BoundedTable(STEP_REGION, 16))
    for _ in range(10):
        with tracker:
            pass
    assert raw_array(table.take_unsent())[:, 0].tolist() == list(range(10))


def test_sampled_steps_thin_out_after_the_warm_up() -> None:
    from traceml.runtime.step import SAMPLE_EVERY_LATER, SAMPLE_WARM, sampled_step

    clock, tracker, rows = make()
    n = SAMPLE_WARM + 2 * SAMPLE_EVERY_LATER + 3
    for _ in range(n):
        with tracker:
            pass
        rows.take_unsent()
    expected = [s for s in range(n) if sampled_step(s)]
    assert expected[:3] == [1, SAMPLE_EVERY + 1, 2 * SAMPLE_EVERY + 1]
    assert expected[-3:] == [
        SAMPLE_WARM + 1,
        SAMPLE_WARM + SAMPLE_EVERY_LATER + 1,
        SAMPLE_WARM + 2 * SAMPLE_EVERY_LATER + 1,
    ]
    assert tracker.cost_steps == len(expected)  # every planned sample was taken, no other
