"""The per-step host memory signal (``traceml.runtime.hostmem``) and the creep rule reading it."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from traceml.diagnosis import diagnose
from traceml.runtime.hostmem import EVERY, HostStepMemory
from traceml.schema import STEP_HOST, STEP_TIME, rows_to_columns
from traceml.store import ColumnStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm is Linux")


def test_reads_resident_memory_every_few_steps_and_closes_its_fd() -> None:
    rows: list[tuple[int, ...]] = []
    mem = HostStepMemory(rows.append)
    for step in range(10):
        mem.step_begin()
        mem.step_end(step, 1000 + step)
    assert [r[0] for r in rows] == [s for s in range(10) if s % EVERY == 0]
    assert all(r[2] > 10 * 2**20 for r in rows)  # a Python process with numpy holds more than 10 MiB
    fd = mem._fd
    mem.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    mem.step_end(12, 0)  # closed: nothing, no error
    assert len(rows) == 3


def _view(rss: list[float]) -> Any:
    store = ColumnStore()
    n = len(rss) * EVERY
    steps = [(s, 10**9 + s * 10**6, 0, 3000, 0, 0, 1000, 1500, 300, 200) for s in range(n)]
    store.append(0, "step_time", rows_to_columns(STEP_TIME, steps), schema=STEP_TIME)
    host = [(i * EVERY, 10**9 + i * EVERY * 10**6, int(v)) for i, v in enumerate(rss)]
    store.append(0, "step_host", rows_to_columns(STEP_HOST, host), schema=STEP_HOST)
    return store.snapshot()


def test_a_leak_of_1_mib_per_step_is_a_confirmed_creep_over_300_steps() -> None:
    base = 400 * 2**20
    d = diagnose(_view([base + i * EVERY * 2**20 for i in range(75)]))
    (creep,) = [f for f in d.findings if f.kind == "MEMORY_CREEP"]
    assert creep.labels == {"source": "rss_step", "stage": "confirmed"} and creep.severity == "warn"
    assert "host RSS every few steps" in creep.summary


def test_warm_up_growth_then_flat_is_not_a_creep() -> None:
    base = 400 * 2**20
    rss = [base + min(i, 5) * 64 * 2**20 + (i % 3) * 4096 for i in range(75)]
    d = diagnose(_view(rss))
    assert "MEMORY_CREEP" not in [f.kind for f in d.findings]


def test_the_stride_widens_on_fast_steps_after_the_warm_up_and_narrows_again() -> None:
    from traceml.runtime.hostmem import MAX_EVERY, MIN_GAP_NS, WARM_STEPS

    rows: list[tuple[int, ...]] = []
    mem = HostStepMemory(rows.append)
    ms = 1_000_000

    def run(steps: range, step_ns: int, t0: int = 0) -> int:
        # as the step tracker calls it: on the steps divisible by the reader's current stride
        for step in steps:
            if step % mem.every == 0:
                mem.step_end(step, t0 + (step - steps.start) * step_ns)
                if step < WARM_STEPS:
                    assert mem.every == EVERY  # the warm-up reads every EVERY-th step, whatever the rate
        return t0 + len(steps) * step_ns

    t = run(range(20_000), ms)  # 1 ms steps: then reads no closer than MIN_GAP_NS
    assert mem.every * ms >= MIN_GAP_NS and mem.every <= MAX_EVERY
    assert (mem.every // 2) * ms < MIN_GAP_NS  # not wider than needed
    run(range(20_000, 20_000 + 4096), 100 * ms, t)  # 100 ms steps: back to every EVERY-th step
    assert mem.every == EVERY
    mem.close()


def test_the_step_tracker_follows_the_readers_stride() -> None:
    from traceml.runtime.hostmem import WARM_STEPS
    from traceml.runtime.step import PhaseClock, StepTracker
    from traceml.runtime.steprows import StepRows
    from traceml.schema import STEP_REGION
    from traceml.store import BoundedTable

    rows: list[tuple[int, ...]] = []
    tracker = StepTracker(PhaseClock(), StepRows(8192), BoundedTable(STEP_REGION, 64))
    tracker.memory = mem = HostStepMemory(rows.append)
    n = 4000
    for _ in range(n):  # steps of microseconds: the stride widens after the warm-up
        with tracker:
            pass
    steps = [r[0] for r in rows]
    assert steps[: WARM_STEPS // EVERY] == list(range(0, WARM_STEPS, EVERY))
    assert mem.every > EVERY and len(rows) < WARM_STEPS // EVERY + (n - WARM_STEPS) // EVERY // 4
    later = steps[WARM_STEPS // EVERY :]
    assert later and all(s % EVERY == 0 for s in later) and len(later) < (n - WARM_STEPS) // EVERY
    mem.close()


def test_no_sampled_step_reads_memory_and_the_reads_are_counted_apart() -> None:
    """The sampled steps (traceml's own cost) never coincide with a memory read: a read takes the
    slow exit, which counted on every sampled step made the cost report 2-4x too high; the reads'
    time is summed in ``rare_ns`` instead (per step over all steps in the report)."""
    from traceml.runtime.step import PhaseClock, StepTracker, sampled_step
    from traceml.runtime.steprows import StepRows
    from traceml.schema import STEP_REGION
    from traceml.store import BoundedTable

    rows: list[tuple[int, ...]] = []
    tracker = StepTracker(PhaseClock(), StepRows(8192), BoundedTable(STEP_REGION, 64))
    tracker.memory = mem = HostStepMemory(rows.append)
    n = 1000
    for _ in range(n):
        with tracker:
            pass
    mem.close()
    read = {r[0] for r in rows}
    sampled = {s for s in range(n) if sampled_step(s)}
    assert len(read) > 64 and len(sampled) == 16
    assert not read & sampled
    assert tracker.cost_steps == len(sampled)
    assert tracker.rare_ns > 0  # the reads' slow exits, each counted once


def _tracker_with_memory(rows: list[tuple[int, ...]]) -> tuple[Any, HostStepMemory]:
    from traceml.runtime.step import PhaseClock, StepTracker
    from traceml.runtime.steprows import StepRows
    from traceml.schema import STEP_REGION
    from traceml.store import BoundedTable

    tracker = StepTracker(PhaseClock(), StepRows(8192), BoundedTable(STEP_REGION, 64))
    tracker.memory = mem = HostStepMemory(rows.append)
    return tracker, mem


def _needs_c() -> None:
    from traceml.runtime import hostmem

    if hostmem._Base is object:
        pytest.skip("the C fast path is not built (or TRACEML_PURE_PYTHON=1)")


def test_the_c_exit_reads_memory_itself_on_the_readers_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C fast path the step context's exit reads ``/proc/self/statm`` itself (a memory
    step's Python exit cost ~39 µs in the tiny loop of ``bench_vs_upstream.py``, the C read ~3):
    the rows and the stride are the reference's, and ``step_end`` in Python is not called."""
    from traceml.runtime.hostmem import WARM_STEPS

    _needs_c()
    python_reads: list[int] = []
    reference = HostStepMemory.step_end
    monkeypatch.setattr(
        HostStepMemory, "step_end", lambda self, s, ts: python_reads.append(s) or reference(self, s, ts)
    )
    rows: list[tuple[int, ...]] = []
    tracker, mem = _tracker_with_memory(rows)
    n = 4000
    for _ in range(n):
        with tracker:
            pass
    assert python_reads == [0]  # step 0's exit is the full path (it plans the next slow step)
    steps = [r[0] for r in rows]
    assert steps[: WARM_STEPS // EVERY] == list(range(0, WARM_STEPS, EVERY))
    assert all(r[2] > 10 * 2**20 and r[1] > 10**18 for r in rows)  # bytes resident; a wall-clock ns stamp
    assert mem.every > EVERY and all(s % EVERY == 0 for s in steps)  # it widened on these µs steps
    assert tracker.rare_ns > 0
    mem.close()
    assert mem._fd == -1
    with tracker:  # closed: no more rows, no error
        pass
    assert len(rows) == len(steps)


def test_the_c_and_python_stride_rules_agree() -> None:
    _needs_c()
    import random

    rng = random.Random(7)
    for _ in range(20):
        py, c = HostStepMemory(lambda row: None), HostStepMemory(lambda row: None)
        step, ts = 0, 0
        for _ in range(300):
            step += py.every * rng.choice([1, 1, 2, 3])
            ts += rng.choice([10**3, 10**6, 10**7, 4 * 10**7, 3 * 10**8, 10**9])
            py._adapt(step, ts)
            c._adapt_c(step, ts)
            assert (c.every, c._last_step, c._last_ts) == (py.every, py._last_step, py._last_ts)
        py.close()
        c.close()


def test_a_failing_read_in_c_falls_back_to_the_reference_which_turns_it_off() -> None:
    _needs_c()
    rows: list[tuple[int, ...]] = []
    tracker, mem = _tracker_with_memory(rows)
    for _ in range(8):
        with tracker:
            pass
    assert len(rows) == 2
    real = mem._fd
    mem._fd = 10**6  # not an open file: the C read fails, the reference's read too
    for _ in range(8):
        with tracker:
            pass
    os.close(real)
    assert mem._fd == -1 and len(rows) == 2  # turned off (logged once), the steps went on
    assert tracker.step == 16 and tracker.enabled
