"""The residual's stack sampler (``traceml.runtime.stacks``) on a real training thread, and the
diagnosis that reads its rows (``traceml.diagnosis.stacks``) on hand-built stores."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np

from traceml.diagnosis import diagnose
from traceml.runtime.stacks import MAX_NAME, StackSampler
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
        clock.phase = FORWARD
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
    assert (func, is_input, samples, total) == ("get_batch", 1, 10, 11)
    assert site == f"test_runtime_stacks.py:{get_batch.__code__.co_firstlineno}"
    assert (first, step) == (0, 2)
    assert by_phase[FORWARD][6] == 1
    assert sampler.samples == 11


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
