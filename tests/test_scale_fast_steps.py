"""Fast steps lose nothing: a burst wakes the sender, a table that fills grows within its bound,
and microsecond steps never make a straggler out of jitter."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_diagnosis_support import RunBuilder

import replay
from traceml.diagnosis import STRAGGLER, diagnose
from traceml.runtime.sender import Sender
from traceml.schema import STEP_TIME
from traceml.store import BoundedTable

ROOT = Path(__file__).resolve().parents[1]

FAST_LOOP = """
import sys, traceml
for _ in range(int(sys.argv[1])):
    with traceml.trace_step():
        pass
"""


def row(i: int) -> tuple[int, ...]:
    return (i, 1_700_000_000_000_000_000 + i, 0, 10, 0, 0, 0, 0, 0, 10)


def test_high_water_calls_once_per_crossing_and_grow_keeps_rows() -> None:
    calls = []
    table = BoundedTable(STEP_TIME, 8, on_high_water=lambda: calls.append(table.unsent))
    for i in range(6):
        table.append(row(i))
    assert calls == [4]
    assert len(table.take_unsent()) == 6
    for i in range(6, 10):
        table.append(row(i))
    assert calls == [4, 4]
    assert table.grow(32) and not table.grow(16)
    for i in range(10, 30):
        table.append(row(i))
    taken = table.take_unsent()
    assert [r[0] for r in taken] == list(range(6, 30)) and table.lost == 0
    assert table.capacity == 32


def test_a_burst_wakes_the_sender_and_nothing_is_lost() -> None:
    """A sender with a period far longer than the burst still drains it: every row arrives."""

    class Count:
        name = "count"

        def __init__(self) -> None:
            self.rows = 0

        def write(self, tables, drops) -> None:  # type: ignore[no-untyped-def]
            self.rows += len(tables["step_time"][1]["step"])

        def attach(self, name, data) -> None:  # type: ignore[no-untyped-def]
            pass

        def idle(self, now: float) -> None:
            pass

        def finish(self, status, drops, drain_timeout_s) -> None:  # type: ignore[no-untyped-def]
            pass

    table = BoundedTable(STEP_TIME, 1024)
    sink = Count()
    sender = Sender({"step_time": table}, [sink], period_s=60.0, max_capacity={"step_time": 4096})
    sender.start()
    try:
        step = 0
        for _ in range(40):  # bursts past the high-water mark; the 60 s period never comes
            flushes = sender.flushes
            for _ in range(table.capacity // 2 + 100):
                table.append(row(step))
                step += 1
            deadline = time.monotonic() + 20
            while sender.flushes == flushes and time.monotonic() < deadline:
                time.sleep(0.001)  # no timing assumed: only that the half-full table woke the sender
            assert sender.flushes > flushes, "the sender did not wake up for a half-full table"
            sender.flush()  # the burst's tail, so that each burst starts from an empty table
    finally:
        sender.close("ok")
    assert table.lost == 0
    assert sink.rows == step
    assert 1024 < table.capacity <= 4096  # grew for the bursts, within its bound
    assert not [t for t in threading.enumerate() if t.name == "traceml-sender"]


def test_200k_steps_as_fast_as_python_goes_are_all_recorded(tmp_path: Path) -> None:
    """Before: 16,384 rows kept, the rest counted as lost (20,000 steps lost 3,616)."""
    script = tmp_path / "fast.py"
    script.write_text(FAST_LOOP)
    out = tmp_path / "fast.tml"
    env = {"PYTHONPATH": str(ROOT), "TRACEML_OUT": str(out), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, str(script), "200000"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    with replay.open(out) as rec:
        steps = rec.columns("step_time", rank=0)["step"]
        drops = {rank: info.drops for rank, info in rec.view().rank_info.items()}
    assert drops == {0: {}}
    assert len(steps) == 200_000 and int(steps.min()) == 0 and int(steps.max()) == 199_999


def test_microsecond_steps_make_no_straggler_of_jitter() -> None:
    b = RunBuilder()
    b.steps(0, 200, dataloader=1.0, forward=2.0, backward=2.0, optimizer=1.0, residual=1.0)
    b.steps(1, 200, dataloader=1.0, forward=6.0, backward=2.0, optimizer=1.0, residual=1.0)  # +4 µs: 57 %
    assert diagnose(b.view()).by_kind(STRAGGLER) == []
    # the same shares on millisecond steps are a straggler
    b = RunBuilder()
    b.steps(0, 200, dataloader=1e3, forward=2e3, backward=2e3, optimizer=1e3, residual=1e3)
    b.steps(1, 200, dataloader=1e3, forward=6e3, backward=2e3, optimizer=1e3, residual=1e3)
    (finding,) = diagnose(b.view()).by_kind(STRAGGLER)
    assert finding.rank == 1


def test_a_sender_that_never_drains_costs_one_short_yield_per_64_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from traceml.runtime import steprows

    naps: list[float] = []
    monkeypatch.setattr(steprows, "_sleep", naps.append)
    rows = steprows.StepRows(256)  # high water at 128; nobody takes the rows
    n = 10_000
    for i in range(n):
        rows.append(steprows.pack_row(i, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert 0 < len(naps) <= n // steprows.YIELD_EVERY  # full all along: still at most one per 64 rows
    assert all(s == steprows.YIELD_S for s in naps)
    assert len(rows.take_unsent()) == 256  # the newest kept, the rest counted as lost
    assert rows.lost == n - 256
