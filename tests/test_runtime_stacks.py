"""The residual's stack sampler (``traceml.runtime.stacks``) on a real training thread, and the
diagnosis that reads its rows (``traceml.diagnosis.stacks``) on hand-built stores."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from traceml.diagnosis import diagnose
from traceml.runtime.stacks import MAX_NAME, StackSampler, _native_timer
from traceml.runtime.step import FORWARD, NO_PHASE, PhaseClock
from traceml.schema import STEP_STACK, STEP_TIME, rows_to_columns
from traceml.store import ColumnStore


class FakeTracker:
    def __init__(self) -> None:
        self.depth = 1
        self.step = 0


def get_batch(stop: threading.Event) -> None:
    while not stop.is_set():
        time.sleep(0.001)


def train_loop(stop: threading.Event, clock: PhaseClock) -> None:
    clock.owner = threading.get_ident()
    get_batch(stop)


def test_samples_name_the_user_function_and_flag_data_reading() -> None:
    clock, tracker, rows = PhaseClock(), FakeTracker(), []
    stop = threading.Event()
    t = threading.Thread(target=train_loop, args=(stop, clock))
    t.start()
    try:
        time.sleep(0.05)
        sampler = StackSampler(clock, tracker, rows.append, hz=100)
        for _ in range(10):
            sampler.sample()
        tracker.step = 3
        clock.phase = FORWARD  # a timed phase: measured already, not sampled
        sampler.sample()
        clock.phase = NO_PHASE
        tracker.depth = 0  # between steps: not counted
        sampler.sample()
        sampler.flush()
    finally:
        stop.set()
        t.join()
    by_phase = {r[3]: r for r in rows}
    step, _ts, first, phase, func, site, samples, is_input, total = by_phase[-1]
    assert (func, is_input, samples, total) == ("get_batch", 1, 10, 10)
    assert site == f"test_runtime_stacks.py:{get_batch.__code__.co_firstlineno}"
    assert (first, step) == (0, 2)
    assert FORWARD not in by_phase
    assert sampler.samples == 10


def test_names_are_bounded_and_stripped_and_the_thread_stops() -> None:
    clock, tracker, rows = PhaseClock(), FakeTracker(), []
    ns: dict[str, Any] = {}
    long_name = "f" * 300
    exec(compile(f"def {long_name}(s):\n    return s._getframe()\n", "evil\x1b[31m.py", "exec"), ns)
    frame = ns[long_name](sys)
    sampler = StackSampler(clock, tracker, rows.append, hz=500, frames=lambda: {clock.owner: frame})
    sampler.start()
    time.sleep(0.1)
    sampler.stop()
    assert not sampler.alive
    assert rows, "no row after stop()"
    func, site = rows[0][4], rows[0][5]
    assert len(func) == MAX_NAME and func.endswith("…")
    assert "\x1b" not in site and site.startswith("evil?[31m.py:")
    assert sum(r[6] for r in rows) == sampler.samples > 5


def _view(residual_us: int, stacks: list[tuple[Any, ...]], steps: int = 40) -> Any:
    store = ColumnStore()
    rows = []
    for s in range(steps):
        # step, ts, failed, step_us, dl, h2d, fwd, bwd, opt, residual
        rows.append(
            (s, 1_000_000_000 + s * 10**7, 0, 10_000, 0, 0, 2_000, 10_000 - 2_000 - 500 - residual_us, 500, residual_us)
        )
    cols = rows_to_columns(STEP_TIME, [r[: len(STEP_TIME.columns)] for r in rows])
    store.append(0, "step_time", cols, schema=STEP_TIME)
    if stacks:
        store.append(0, "step_stack", rows_to_columns(STEP_STACK, stacks), schema=STEP_STACK)
    return store.snapshot()


def _stack(func: str, site: str, n: int, is_input: int, phase: int = -1) -> tuple[Any, ...]:
    return (39, 0, 0, phase, func, site, n, is_input, 200)


def test_residual_reading_data_is_input_bound() -> None:
    view = _view(6_000, [_stack("get_batch", "train.py:118", 90, 1), _stack("main", "train.py:40", 10, 0)])
    d = diagnose(view)
    assert d.primary.kind == "INPUT_BOUND", d.primary.summary
    assert d.primary.labels == {"source": "stack", "function": "get_batch", "site": "train.py:118"}
    assert "get_batch (train.py:118) reads data in 90% of the residual samples" in d.primary.summary
    assert np.isclose(d.primary.evidence["share"], 0.6 * 0.9)
    assert "RESIDUAL_HEAVY" not in {f.kind for f in d.findings}


def test_residual_not_reading_data_is_named_in_the_residual_finding() -> None:
    view = _view(6_000, [_stack("log_metrics", "train.py:77", 80, 0), _stack("main", "train.py:40", 20, 0)])
    d = diagnose(view)
    assert d.primary.kind == "RESIDUAL_HEAVY"
    assert "residual 60% of the step: log_metrics (train.py:77) 80%, main (train.py:40) 20% of residual samples" in (
        d.primary.summary
    )
    assert d.primary.labels["function"] == "log_metrics"


def test_without_samples_or_with_too_few_the_verdict_is_unchanged() -> None:
    plain = diagnose(_view(6_000, []))
    few = diagnose(_view(6_000, [_stack("get_batch", "train.py:118", 5, 1)]))
    for d in (plain, few):
        assert d.primary.kind == "RESIDUAL_HEAVY" and "of residual samples" not in d.primary.summary


def test_report_and_summary_show_the_residual_table_escaped() -> None:
    from replay.report import build_report

    view = _view(6_000, [_stack("<script>x</script>", "train.py:9", 70, 1), _stack("main", "train.py:40", 30, 0)])
    report = build_report(view, source="t")
    assert report.summary["residual"]["top"][0] == {
        "func": "<script>x</script>",
        "site": "train.py:9",
        "samples": 70,
        "share": 0.7,
        "reads_data": True,
    }
    assert "Where the residual goes" in report.html and "<script>x" not in report.html
    assert "&lt;script&gt;x&lt;/script&gt;" in report.html
    assert "| residual spent in |" in report.markdown and "train.py\\:9" in report.markdown


def test_dashboard_diagnosis_panel_has_the_residual_table() -> None:
    from traceml.drivers.web.panels import diagnosis_children

    view = _view(6_000, [_stack("get_batch", "train.py:118", 90, 1), _stack("main", "train.py:40", 10, 0)])
    children = diagnosis_children(view)
    (table,) = [c for c in children if getattr(c, "id", None) == "residual-table"]
    first_row = table.children[1].children[0]
    assert [td.children for td in first_row.children] == ["get_batch", "train.py:118", "90", "90%", "yes"]
    assert diagnosis_children(_view(6_000, []))[-1].__class__.__name__ != "Table"


# -- the native timer: the training thread (here pytest's main thread) samples itself ----------


def _real_clock() -> tuple[PhaseClock, Any]:
    from traceml.runtime.step import FAST, StepTracker
    from traceml.runtime.steprows import StepRows
    from traceml.schema import STEP_REGION
    from traceml.store import BoundedTable

    if FAST is None or _native_timer() is None:
        pytest.skip("the C fast path is not built (or TRACEML_PURE_PYTHON=1)")
    clock = PhaseClock()
    return clock, StepTracker(clock, StepRows(1 << 12), BoundedTable(STEP_REGION, 64))


def read_batch_busy(until: float) -> int:
    n = 0
    while time.perf_counter() < until:
        n += sum(range(200))
    return n


def test_native_timer_samples_the_main_thread_in_the_residual_of_steps_only() -> None:
    clock, tracker = _real_clock()
    rows: list[tuple[Any, ...]] = []
    sampler = StackSampler(clock, tracker, rows.append, hz=200)
    sampler.start()
    try:
        assert sampler.native
        clock.owner = threading.get_ident()
        read_batch_busy(time.perf_counter() + 0.1)  # no step open: nothing sampled
        assert sampler.samples == 0
        with tracker:
            clock.phase = FORWARD  # a timed phase: measured already, nothing sampled
            read_batch_busy(time.perf_counter() + 0.1)
            in_phase = sampler.samples
            clock.phase = NO_PHASE
            read_batch_busy(time.perf_counter() + 0.3)
        tracker_step = tracker.step
    finally:
        sampler.stop()
    assert in_phase == 0
    assert not sampler.alive and not sampler.native
    assert 20 <= sampler.samples <= 80, sampler.samples
    assert sampler.native_ns > 0
    assert sum(r[6] for r in rows) == sampler.samples
    top = max(rows, key=lambda r: r[6])
    assert (top[3], top[4], top[7]) == (NO_PHASE, "read_batch_busy", 1)
    assert top[5] == f"test_runtime_stacks.py:{read_batch_busy.__code__.co_firstlineno}"
    assert top[2] == tracker_step - 1 or top[2] == tracker_step


def test_native_timer_hands_over_to_the_thread_when_another_thread_trains() -> None:
    clock, tracker = _real_clock()
    rows: list[tuple[Any, ...]] = []
    stop = threading.Event()
    sampler = StackSampler(clock, tracker, rows.append, hz=200, flush_s=0.05)
    t = threading.Thread(target=train_loop, args=(stop, clock))
    sampler.start()
    t.start()
    try:
        with tracker:  # the step is open, but another thread trains: the main thread's callbacks skip
            clock.owner = t.ident or 0
            deadline = time.perf_counter() + 5
            while sampler.native and time.perf_counter() < deadline:
                read_batch_busy(time.perf_counter() + 0.01)
            assert not sampler.native, "the native timer kept sampling the wrong thread"
            time.sleep(0.2)
            clock.owner = t.ident or 0
    finally:
        stop.set()
        t.join()
        sampler.stop()
    funcs = {r[4] for r in rows}
    assert "get_batch" in funcs and "read_batch_busy" not in funcs, funcs


def test_native_timer_errors_never_reach_the_training_thread() -> None:
    clock, tracker = _real_clock()
    timer_type = _native_timer()

    def resolve(code: Any) -> Any:
        raise RuntimeError("broken resolver")

    timer = timer_type(clock, tracker, resolve, 500.0, 8)
    clock.owner = threading.get_ident()
    assert timer.start() is True and timer.start() is False
    try:
        with tracker:
            deadline = time.perf_counter() + 5
            while timer.running and time.perf_counter() < deadline:
                read_batch_busy(time.perf_counter() + 0.01)  # no exception surfaces here
    finally:
        timer.stop()
        timer.stop()
    assert timer.errors == 16 and not timer.running and timer.samples == 0
    counts, total, first = timer.take()
    assert (counts, total, first) == ({}, 0, -1)


def test_native_timer_refuses_a_pure_python_clock() -> None:
    timer_type = _native_timer()
    if timer_type is None:
        pytest.skip("the native timer is not built")
    with pytest.raises(TypeError, match="native 64-bit integer member"):
        timer_type(object(), FakeTracker(), lambda c: None, 67.0)
    with pytest.raises(ValueError, match="hz > 0"):
        timer_type(object(), FakeTracker(), lambda c: None, 0.0)
