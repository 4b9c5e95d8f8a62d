"""The terminal driver on a real (in-memory) Rich console: refreshes, output above the region,
overflow accounting, the end summary, and a rendering failure that does not stop the driver."""

from __future__ import annotations

import io
import re
import threading
import time

from rich.console import Console

from traceml.drivers import terminal as terminal_driver
from traceml.drivers.terminal import TerminalDriver
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.store import ColumnStore, StoreView

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100, color_system=None, legacy_windows=False), buf


def wait_for(predicate, what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def store_with_steps() -> ColumnStore:
    store = ColumnStore(meta={"run_name": "drv", "expected_ranks": 1})
    rows = [(i, 1_000 + i, 0, 1000, *([100] * len(PHASES))) for i in range(5)]
    store.append(0, "step_time", rows_to_columns(STEP_TIME, rows))
    store.update_rank(0, state="connected")
    return store


def test_driver_refreshes_prints_output_above_and_ends_with_the_summary() -> None:
    con, buf = console()
    store = store_with_steps()
    driver = TerminalDriver(store.snapshot, console=con, refresh_s=0.05)
    driver.start()
    try:
        driver.print_output("stdout", "epoch 1 loss 0.5\n")
        driver.print_output("stderr", "warning: \x1b[31mred\x1b[0m text\nsecond line\n")
        driver.notify("recording stopped (disk full)")
        wait_for(lambda: driver.refreshes >= 3, "three refreshes")
    finally:
        store.attach("exit", {"exit_code": 0, "status": "ok", "duration_s": 1.0, "signal": ""})
        driver.stop(store.snapshot())
    out = ANSI.sub("", buf.getvalue())
    lines = [line.strip() for line in out.splitlines()]
    order = [lines.index(s) for s in ("epoch 1 loss 0.5", "warning: red text", "second line")]
    assert order == sorted(order)
    assert "traceml: recording stopped (disk full)" in lines
    assert "drv  running" in out  # the live region was drawn
    assert "traceml summary" in out and "ok (exit 0)" in out
    assert out.rstrip().endswith("╯")  # the summary is the last thing printed


def test_driver_skips_the_oldest_lines_when_flooded(monkeypatch) -> None:
    monkeypatch.setattr(terminal_driver, "MAX_PENDING_LINES", 10)
    con, buf = console()
    driver = TerminalDriver(ColumnStore().snapshot, console=con, refresh_s=60)
    driver.start()
    driver._stop.set()  # freeze the loop: everything stays queued until stop()
    driver._wake.set()
    driver._thread.join()  # type: ignore[union-attr]
    for i in range(25):
        driver.print_output("stdout", f"line {i}\n")
    driver.stop(None)
    out = ANSI.sub("", buf.getvalue())
    assert "traceml: 15 output lines not shown here" in out
    assert "line 14\n" not in out and "line 15" in out and "line 24" in out


def test_driver_survives_a_failing_snapshot(caplog) -> None:
    calls = {"n": 0}
    ok_store = store_with_steps()

    def flaky() -> StoreView:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("boom")
        return ok_store.snapshot()

    con, buf = console()
    driver = TerminalDriver(flaky, console=con, refresh_s=0.02)
    driver.start()
    try:
        wait_for(lambda: driver.refreshes >= 4, "four refreshes")
    finally:
        driver.stop(None)
    out = ANSI.sub("", buf.getvalue())
    assert "live view unavailable (boom)" in out
    assert sum("live view failed to render" in r.getMessage() for r in caplog.records) == 1
    assert not [t for t in threading.enumerate() if t.name == "traceml-terminal"]
