"""The live verdict (``traceml.diagnosis.live``): the last seconds of steps, so a rank that slows
down mid-run is named within seconds; and the live terminal view showing it."""

from __future__ import annotations

from rich.console import Console

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.live import live_verdict, live_window_steps
from traceml.drivers.terminal import TerminalDriver
from traceml.schema import STEP_TIME, rows_to_columns
from traceml.store import ColumnStore

T0 = 10**18


def _run(steps_per_s: float, healthy_s: float, slow_s: float) -> ColumnStore:
    """2 DDP ranks; after ``healthy_s`` rank 1 takes 20 % of a step more before its forward."""
    store = ColumnStore()
    step_us = 1e6 / steps_per_s
    rows: dict[int, list[tuple[int, ...]]] = {0: [], 1: []}
    t, step = T0, 0
    while t - T0 < (healthy_s + slow_s) * 1e9:
        extra = 0.2 * step_us if t - T0 >= healthy_s * 1e9 else 0.0
        whole = step_us + extra
        t += int(whole * 1000)
        jitter = 1 + 0.01 * (step % 3)
        for r in (0, 1):
            f, b, o = 0.3 * step_us * jitter, 0.6 * step_us, 0.1 * step_us
            f, b = (f + extra, b) if r == 1 else (f, b + extra)
            rows[r].append((step, t, 0, int(whole), 0, 0, int(f), int(b), int(o), max(0, int(whole - f - b - o))))
        step += 1
    for r, rs in rows.items():
        store.append(r, "step_time", rows_to_columns(STEP_TIME, rs), schema=STEP_TIME)
    return store


def test_the_window_is_the_last_seconds_clamped() -> None:
    assert live_window_steps(_run(10, 60, 0).snapshot()) == 50  # 5 s at 10 steps/s
    assert live_window_steps(_run(1, 60, 0).snapshot()) == th.LIVE_MIN_STEPS
    assert live_window_steps(_run(100, 20, 0).snapshot()) == th.RECENT_STEPS


def test_a_rank_slowing_mid_run_is_named_within_seconds() -> None:
    before = live_verdict(_run(10, 60, 1).snapshot())
    assert before is not None and before.kind != "STRAGGLER"
    after = live_verdict(_run(10, 60, 5).snapshot())
    assert after is not None and after.kind == "STRAGGLER" and after.rank == 1, after


def test_the_live_terminal_view_shows_the_current_verdict() -> None:
    store = _run(10, 60, 5)
    console = Console(width=160, record=True, color_system=None)
    driver = TerminalDriver(store.snapshot, console=console)
    console.print(driver._render())
    text = console.export_text()
    assert "now: STRAGGLER [" in text and "rank 1 is a straggler" in text


def test_the_live_dashboard_shows_the_current_verdict() -> None:
    from traceml.drivers.web.panels import now_children

    children = now_children(_run(10, 60, 5).snapshot())
    bold = children[1].children[0]
    assert bold.id == "diagnosis-now" and bold.children == "STRAGGLER"
    assert now_children(ColumnStore().snapshot()) == []
